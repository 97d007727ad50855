"""Consumer lag of every partition a worker owns, exported whether or not records arrive.

A worker that stops consuming (a stuck batch, a paused partition, a restore that never
ends) takes no batches, so a lag updated after each batch would freeze at its last value
and look healthy. Here a periodic task asks the broker for the end of every owned partition
and compares it with the consumer's position (the next offset it will take); a partition
without a position yet (just assigned, restoring) counts from its committed offset, or
from its start, where the consumer will begin. Series of a partition leave with it: on
revoke, every partition-labelled series is removed, so that no stale lag or store size of
a partition another worker now owns is scraped from this one.

``vql_last_batch_timestamp_seconds`` says when the worker last applied a batch of each
partition (its assignment until the first): with a positive lag, an old value means the
worker owns records it does not consume (deploy/prometheus/alerts.yml, VqlWorkerStalled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

import mode
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from vql.streams.metrics import WorkerMetrics

log = logging.getLogger("vql.worker")

# How long a position may take to be known before the committed offset stands in for it.
POSITION_WAIT_S = 0.1


def lag_records(end_offset: int, next_offset: int) -> int:
    """Records from ``next_offset`` (the next one the worker takes) to the partition's end
    (the offset the next produced record gets); never negative, since a position read
    before the end offset may already be past it."""
    return max(0, end_offset - next_offset)


class PartitionSeries:
    """Which partitions have series, and their last-batch times.

    The consumer group revokes every partition at each rebalance and assigns the new set
    (the eager protocol), so a partition a worker keeps is revoked and assigned again: it
    keeps its last-batch time then, and only a partition new to the worker starts from its
    assignment time. Otherwise every rebalance would reset the stall clock of a stuck one.
    """

    def __init__(self, metrics: WorkerMetrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.owned: set[int] = set()
        self._last_batch: dict[int, float] = {}
        self._just_revoked: dict[int, float] = {}  # last-batch times of the latest revoke

    def assigned(self, partitions: Iterable[int]) -> None:
        now = self.clock()
        for partition in partitions:
            self.owned.add(partition)
            self._last_batch[partition] = self._just_revoked.get(partition, now)
            self.metrics.last_batch.labels(partition=str(partition)).set(self._last_batch[partition])
        self._just_revoked.clear()

    def revoked(self, partitions: Iterable[int]) -> None:
        self._just_revoked.clear()
        for partition in partitions:
            self.owned.discard(partition)
            if partition in self._last_batch:
                self._just_revoked[partition] = self._last_batch.pop(partition)
            self.metrics.forget_partition(partition)

    def batch_applied(self, partitions: Iterable[int]) -> None:
        now = self.clock()
        for partition in partitions:
            if partition in self.owned:
                self._last_batch[partition] = now
                self.metrics.last_batch.labels(partition=str(partition)).set(now)

    def set_lags(self, lags: Mapping[int, int]) -> None:
        """Export ``lags``, but only of partitions still owned: one revoked while the offsets
        were read must not come back."""
        for partition, lag in lags.items():
            if partition in self.owned:
                self.metrics.lag.labels(partition=str(partition)).set(lag)


class LagMonitor(mode.Service):
    """Every ``interval_s``, the lag of each owned partition from the broker's end offsets."""

    def __init__(self, series: PartitionSeries, topic: str, interval_s: float,
                 kafka: Callable[[], AIOKafkaConsumer | None], **kwargs) -> None:
        super().__init__(**kwargs)
        self.series = series
        self.topic = topic
        self.interval_s = interval_s
        self.kafka = kafka  # the worker's group consumer, once started

    @mode.Service.task
    async def _refresh_every_interval(self) -> None:
        while not self.should_stop:
            try:
                self.series.set_lags(await self.lags())
            except KafkaError as exc:  # the broker away: the gauges keep their last values
                log.warning("consumer lag not read: %s", exc)
            except Exception:  # a metric must never stop the worker; the log says why it is missing
                log.exception("consumer lag not read")
            await self.sleep(self.interval_s)

    async def lags(self) -> dict[int, int]:
        """The lag of every partition the consumer is assigned now."""
        kafka = self.kafka()
        owned = sorted(tp for tp in (kafka.assignment() if kafka is not None else ()) if tp.topic == self.topic)
        if not owned:
            return {}
        ends = await kafka.end_offsets(owned)
        starts = await self._next_offsets(kafka, owned)
        return {tp.partition: lag_records(ends[tp], starts[tp]) for tp in owned if tp in starts and tp in ends}

    async def _next_offsets(self, kafka: AIOKafkaConsumer, owned: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset each partition will be consumed from next: the consumer's position,
        else the committed offset, else the partition's start (auto_offset_reset earliest)."""
        positions = await asyncio.gather(*(self._position(kafka, tp) for tp in owned))
        found = {tp: p for tp, p in zip(owned, positions) if p is not None}
        missing = [tp for tp in owned if tp not in found]
        if missing:
            committed = await asyncio.gather(*(kafka.committed(tp) for tp in missing))
            found.update({tp: c for tp, c in zip(missing, committed) if c is not None})
            never = [tp for tp in missing if tp not in found]
            if never:
                found.update(await kafka.beginning_offsets(never))
        return found

    @staticmethod
    async def _position(kafka: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
        try:
            return await asyncio.wait_for(kafka.position(tp), POSITION_WAIT_S)
        except (asyncio.TimeoutError, IllegalStateError):  # not known yet, or revoked meanwhile
            return None
