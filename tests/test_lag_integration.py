"""Consumer lag against the real broker: exported for every owned partition whether or not
its records arrive, with the right value while the worker does not consume them, and gone
from a worker once its partition moves to another (streams/lag.py)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry

from harness import Pipeline
from test_lag import partitions_exported
from test_pipeline_integration import free_port, http_get
from vql.streams.consumer import BehaviorConsumer
from vql.streams.kafka_security import aiokafka_security
from vql.streams.lag import LagMonitor, PartitionSeries
from vql.streams.metrics import WorkerMetrics
from vql.streams.settings import Settings
from vql.streams.worker import load_processor

pytestmark = pytest.mark.integration

WAIT_S = 90.0


class InProcessWorker:
    """A worker's consumer, lag monitor and metrics in this event loop, wired as the app
    wires them (streams/app.py), with its own data dir as on a host of its own."""

    def __init__(self, settings: Settings, data_dir: Path) -> None:
        self.registry = CollectorRegistry()
        processor = load_processor(settings.model_copy(update={"data_dir": data_dir}))
        cfg = processor.model.config
        self.series = PartitionSeries(WorkerMetrics(self.registry, cfg.groups, cfg.codes))
        self.batches: list[int] = []  # partitions of the batches applied, in order

        def on_batch(result, *_timings) -> None:  # noqa: ANN001 - BehaviorConsumer's callback
            partitions = [partition for partition, _states, _offset in result.writes]
            self.batches += partitions
            self.series.batch_applied(partitions)

        self.consumer = BehaviorConsumer(settings, processor, on_batch, on_assigned=self.series.assigned,
                                         on_revoked=self.series.revoked)
        self.monitor = LagMonitor(self.series, settings.behaviors_topic, settings.lag_interval_s,
                                  lambda: self.consumer.kafka)

    async def start(self) -> None:
        await self.consumer.start()
        await self.monitor.start()

    async def stop(self) -> None:
        await self.monitor.stop()
        await self.consumer.stop()

    def owned(self) -> set[int]:
        kafka = self.consumer.kafka
        return {tp.partition for tp in kafka.assignment()} if kafka is not None and self.consumer.status == "ready" else set()

    def lag(self, partition: int) -> float | None:
        return self.registry.get_sample_value("vql_consumer_lag_records", {"partition": str(partition)})

    def last_batch(self, partition: int) -> float | None:
        return self.registry.get_sample_value("vql_last_batch_timestamp_seconds", {"partition": str(partition)})

    def exports_only_what_it_owns(self) -> bool:
        """Lag and last-batch series of exactly its partitions, and no other series of any other."""
        owned, exported = {str(p) for p in self.owned()}, partitions_exported(self.registry)
        return (bool(owned) and all(found <= owned for found in exported.values())
                and all(exported.get(name) == owned
                        for name in ("vql_consumer_lag_records", "vql_last_batch_timestamp_seconds")))


async def until(condition: Callable[[], bool], what: Callable[[], str]) -> None:
    """Wait for ``condition``; fail with ``what()`` if it does not come within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(what())
        await asyncio.sleep(0.2)


def events_for(partition: int, count: int, partitions: int, now_ms: int) -> list[tuple[bytes, bytes]]:
    """``count`` valid events keyed by users whose key the default partitioner (murmur2)
    puts on ``partition``."""
    chooser, out, user = DefaultPartitioner(), [], 0
    while len(out) < count:
        key = f"lag-user-{user}".encode()
        if chooser(key, list(range(partitions)), list(range(partitions))) == partition:
            out.append((key, orjson.dumps({
                "event_id": f"e-{user}-{len(out)}", "user_id": key.decode(), "item_id": len(out), "action": "click",
                "event_time_ms": now_ms - 60_000, "context": {"category": 3, "modality": "video"}})))
        user += 1
    return out


async def produce(settings: Settings, per_partition: dict[int, int]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", **aiokafka_security())
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        for partition, count in per_partition.items():
            for key, value in events_for(partition, count, settings.partitions, now_ms):
                await producer.send(settings.behaviors_topic, value, key=key, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


def test_a_stalled_partitions_lag_is_exported_and_leaves_with_the_partition(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    settings = pipeline.settings.model_copy(update={"lag_interval_s": 0.5})

    async def scenario() -> None:
        first = InProcessWorker(settings, tmp_path / "host-a")
        second = None
        try:
            await first.start()
            await until(lambda: first.owned() == {0, 1}, lambda: f"the first worker owns {first.owned()}")
            assigned_by = time.time()
            # Partition 0 stalls: the worker owns it but takes none of its records (as while a
            # batch hangs or a restore runs); partition 1 flows.
            first.consumer.kafka.pause(TopicPartition(settings.behaviors_topic, 0))
            await produce(settings, {0: 30, 1: 20})
            await until(lambda: first.lag(0) == 30 and first.lag(1) == 0 and 1 in first.batches,
                        lambda: f"lag {first.lag(0)}, {first.lag(1)}; batches of {set(first.batches)}")
            assert 0 not in first.batches
            assert first.last_batch(0) <= assigned_by < first.last_batch(1)  # the stall clock runs

            # A second worker joins: the partition that moves leaves no series behind.
            second = InProcessWorker(settings, tmp_path / "host-b")
            await second.start()
            await until(lambda: (first.owned() | second.owned() == {0, 1} and not first.owned() & second.owned()
                                 and first.exports_only_what_it_owns() and second.exports_only_what_it_owns()),
                        lambda: f"first owns {first.owned()}, exports {partitions_exported(first.registry)}; "
                                f"second owns {second.owned()}, exports {partitions_exported(second.registry)}")
            # Both consume now (an assignment resumes a paused partition): nothing is left behind.
            await until(lambda: all(w.lag(p) == 0 for w in (first, second) for p in w.owned()),
                        lambda: f"lags {[(p, w.lag(p)) for w in (first, second) for p in w.owned()]}")
        finally:
            if second is not None:
                await second.stop()
            await first.stop()

    asyncio.run(scenario())


def metric_partitions(text: str, name: str) -> dict[str, float]:
    """The partitions of a metric in Prometheus text, with their values."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}{{partition="(\d+)"}} (\S+)$', text, re.M)}


def test_a_worker_process_exports_lag_before_any_record_and_only_for_its_partitions(kafka_bootstrap, tmp_path):
    """The app's own wiring, scraped from /metrics of worker processes."""
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    ports = [free_port(), free_port()]

    def scrape(port: int) -> str:
        try:
            code, body = http_get(port, "/metrics")
        except OSError:
            return ""
        return body.decode() if code == 200 else ""

    def wait_for(condition: Callable[[], bool], what: Callable[[], str]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what()}\n{pipeline.worker_logs()}")
            time.sleep(0.3)

    def lags(port: int) -> dict[str, float]:
        return metric_partitions(scrape(port), "vql_consumer_lag_records")

    try:
        pipeline.start_worker(host="a", web_port=ports[0], lag_interval_s=0.5)
        # No record produced yet: no batch has come, and both partitions' lag is exported.
        wait_for(lambda: lags(ports[0]) == {"0": 0.0, "1": 0.0}, lambda: f"lag series {lags(ports[0])}")
        assert set(metric_partitions(scrape(ports[0]), "vql_last_batch_timestamp_seconds")) == {"0", "1"}
        asyncio.run(produce(pipeline.settings, {0: 10, 1: 10}))
        pipeline.wait_until_committed(20)

        pipeline.start_worker(host="b", web_port=ports[1], lag_interval_s=0.5)

        def split() -> bool:
            """Each worker exports lag for one partition, the other's, and no series of it."""
            first, second = scrape(ports[0]), scrape(ports[1])
            found = [set(metric_partitions(text, "vql_consumer_lag_records")) for text in (first, second)]
            if not (len(found[0]) == len(found[1]) == 1 and found[0] | found[1] == {"0", "1"}):
                return False
            return all(f'partition="{other}"' not in text
                       for text, other in ((first, *found[1]), (second, *found[0])))

        wait_for(split, lambda: f"lag series {lags(ports[0])} and {lags(ports[1])}")
    finally:
        pipeline.stop_all()
