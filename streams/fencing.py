"""Publications a worker dropped from the group cannot make: one transactional producer per partition.

A worker frozen past its session timeout (an event-loop stall, a long GC or swap, SIGSTOP, a
network split) loses its partitions without knowing it. When it wakes it still holds batches
fetched, processed or in publication, and publishes them: older states, which in the
compacted states topic would overwrite the new owner's newer ones, and a restore would then
bring them back as the partition's state.

So each owned partition publishes through a producer of its own whose transactional id is
the partition's (``<app id>.<states topic>.<partition>``), and a batch's states and dead
letters of that partition go in one transaction. Taking a partition over starts with that
producer's registration (InitProducerId), which bumps the id's epoch at the coordinator and
aborts whatever transaction the previous owner left open; from then on every request of the
previous owner's producer is refused as fenced. The registration comes before the
partition's restore, so the restore sees everything the previous owner will ever publish.

Readers (the restore, standby copies, the serving view, tools) read ``read_committed``: an
aborted transaction's states never reach them. A worker whose publication is fenced drops
that partition (streams/consumer.py): its cache is forgotten unwritten, its records are
left to the new owner, and it asks the group to rejoin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator

from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced

from vql.schemas.control import tombstone_headers
from vql.streams.dead_letters import letter_batch_bytes, topic_limit
from vql.streams.kafka_security import aiokafka_security
from vql.streams.layout import state_headers
from vql.streams.processor import BatchResult, DeadLetter
from vql.streams.settings import Settings
from vql.streams.state_limits import state_batch_bytes, states_limit

log = logging.getLogger("vql.worker")

#: What a producer whose transactional id another producer has taken over is told.
FENCED = (ProducerFenced, InvalidProducerEpoch)

MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a produce request: many batches of states


def transactional_id(settings: Settings, partition: int) -> str:
    """The transactional id of the partition's publications: one per partition of the states
    topic and app, whichever worker owns it."""
    return f"{settings.app_id}.{settings.states_topic}.{partition}"


def state_batches(producer: AIOKafkaProducer, user_ids: list[str], values: list[bytes], timestamp_ms: int,
                  headers: list[tuple[str, bytes]]) -> Iterator[tuple[int, object]]:
    """(count, producer batch) of encoded states with ``headers`` each, each batch as large as
    the producer allows."""
    batch, count = producer.create_batch(), 0
    for key, value in zip(user_ids, values):
        key = key.encode()
        if batch.append(key=key, value=value, timestamp=timestamp_ms, headers=headers) is None:
            yield count, batch
            batch, count = producer.create_batch(), 0
            if batch.append(key=key, value=value, timestamp=timestamp_ms, headers=headers) is None:
                raise ValueError(f"state of {key!r} ({len(value)} B) exceeds the producer batch size")
        count += 1
    if count:
        yield count, batch


def without_partitions(result: BatchResult, partitions: set[int]) -> BatchResult:
    """``result`` less everything of ``partitions`` (states, windows, dead letters): what a
    batch processed on top of a fenced partition's cache must not publish or keep."""
    if not partitions:
        return result
    wire = result.encode_wire()
    kept = [i for i, (partition, _s, _o) in enumerate(result.writes) if partition not in partitions]
    return dataclasses.replace(
        result,
        dead_letters=[d for d in result.dead_letters if d.record.partition not in partitions],
        writes=[result.writes[i] for i in kept],
        wire=[wire[i] for i in kept],
        event_ids={p: ids for p, ids in result.event_ids.items() if p not in partitions},
        deletions={p: users for p, users in result.deletions.items() if p not in partitions},
    )


class FencedPublisher:
    """Publishes each partition's share of a batch in a transaction of the partition's own
    producer; :meth:`open` a partition's producer before restoring it."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, batch_bytes: int, letter_bytes: int,
                 states_partitions: int) -> None:
        self.settings = settings
        # Not transactional: for what is not a partition's publication (the delete requests
        # that bare tombstones ask for go to the input topic).
        self.producer = producer
        self.batch_bytes = batch_bytes
        self.letter_bytes = letter_bytes
        self.producers: dict[int, AIOKafkaProducer] = {}
        # Each state records the partition count of its topic (streams/layout.py).
        self._state_headers = state_headers(states_partitions)
        # Told (partition, first offset, count) of every committed publication: TombstoneWatch.wrote.
        self.written: Callable[[int, int, int], None] = lambda partition, first, count: None

    @classmethod
    async def start(cls, settings: Settings) -> "FencedPublisher":
        """Sized so that a batch fits both topics a transaction writes: the states topic's and
        the DLQ's limits (streams/state_limits.py, streams/dead_letters.py)."""
        state_bytes = await asyncio.to_thread(states_limit, settings)
        letter_bytes = await asyncio.to_thread(topic_limit, settings)
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
                                    **aiokafka_security())
        await producer.start()
        return cls(settings, producer, min(state_batch_bytes(state_bytes), letter_batch_bytes(letter_bytes)),
                   letter_bytes, len(await producer.partitions_for(settings.states_topic)))

    async def open(self, partition: int) -> None:
        """Register the partition's transactional id (fencing any previous owner's producer
        and aborting its open transaction); a producer this worker held before is replaced."""
        await self.close([partition])
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap, acks="all", linger_ms=5,
            max_batch_size=self.batch_bytes, max_request_size=max(MAX_REQUEST_BYTES, self.letter_bytes),
            transactional_id=transactional_id(self.settings, partition),
            transaction_timeout_ms=int(self.settings.transaction_timeout_s * 1000),
            **aiokafka_security(),
        )
        await producer.start()
        try:
            await producer.begin_transaction()  # waits for the registration: the fence is up
            await producer.commit_transaction()  # empty: nothing reaches the broker
        except BaseException:
            await producer.stop()
            raise
        self.producers[partition] = producer

    async def close(self, partitions: Iterable[int] | None = None) -> None:
        """Stop the producers of ``partitions`` (default: all)."""
        chosen = list(self.producers) if partitions is None else [p for p in partitions if p in self.producers]
        for partition in chosen:
            producer = self.producers.pop(partition)
            try:
                await producer.stop()
            except Exception as exc:  # noqa: BLE001 - a fenced producer may fail to stop cleanly
                log.warning("closing the producer of partition %d: %s", partition, exc)
            _retrieve_fencing(producer)

    async def stop(self) -> None:
        await self.close()
        await self.producer.stop()

    async def publish(self, result: BatchResult) -> tuple[dict[int, int], set[int]]:
        """Publish every partition's states and dead letters, one transaction a partition, all
        at once. Returns the changelog offset each partition's states reached, and the
        partitions whose producer was fenced (nothing of theirs is visible to readers);
        raises on any other failure."""
        timestamp_ms = int(time.time() * 1000)
        work: dict[int, tuple[list, list[DeadLetter]]] = {p: ([], []) for p in result.deletions}
        for (partition, states, _offset), values in zip(result.writes, result.encode_wire()):
            if states is not None:
                work.setdefault(partition, ([], []))[0].append((states.user_ids, values))
        for letter in result.dead_letters:
            work.setdefault(letter.record.partition, ([], []))[1].append(letter)
        partitions = sorted(work)
        outcomes = await asyncio.gather(
            *(self._publish_partition(p, result.deletions.get(p, {}), *work[p], result.model_version, timestamp_ms)
              for p in partitions), return_exceptions=True)
        reached, fenced, errors = {}, set(), []
        for partition, outcome in zip(partitions, outcomes):
            if isinstance(outcome, FENCED):
                fenced.add(partition)
            elif isinstance(outcome, BaseException):
                errors.append(outcome)
            elif outcome is not None:
                reached[partition] = outcome
        if errors:
            raise errors[0]
        return reached, fenced

    async def _publish_partition(self, partition: int, deletions: dict[str, int],
                                 states: list[tuple[list[str], list[bytes]]], letters: list[DeadLetter],
                                 model_version: str, timestamp_ms: int) -> int | None:
        """One transaction: the partition's tombstones (first: a state after one re-creates
        the user), states and dead letters; returns the last offset the tombstones and states
        reached (None: neither)."""
        from vql.streams.consumer import dead_letter  # the DLQ contract lives with the worker

        producer = self.producers.get(partition)
        if producer is None:  # the partition left this worker while its batch was processed
            raise ProducerFenced()
        await producer.begin_transaction()
        deliveries: list[tuple[int, asyncio.Future]] = []
        sent: list[asyncio.Future] = []
        try:
            for user_id, offset in deletions.items():
                future = await producer.send(self.settings.states_topic, value=None, key=user_id.encode(),
                                             partition=partition, headers=tombstone_headers(offset, model_version))
                deliveries.append((1, future))
                sent.append(future)
            for user_ids, values in states:
                for count, batch in state_batches(producer, user_ids, values, timestamp_ms, self._state_headers):
                    future = await producer.send_batch(batch, self.settings.states_topic, partition=partition)
                    deliveries.append((count, future))
                    sent.append(future)
            for letter in letters:
                key, value, headers = dead_letter(letter, self.settings.behaviors_topic, self.letter_bytes)
                sent.append(await producer.send(self.settings.dlq_topic, value, key=key, headers=headers))
            commit = asyncio.ensure_future(producer.commit_transaction())
            # A refused record fails its future and may leave the commit waiting: whichever first.
            done, _ = await asyncio.wait([commit, *sent], return_when=asyncio.FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                commit.cancel()
                raise failed.exception()
            await commit
        except BaseException:
            _retrieve(sent)
            raise
        metadata = [(count, future.result()) for count, future in deliveries]
        for count, m in metadata:
            self.written(partition, m.offset, count)
        last = max((m.offset + count - 1 for count, m in metadata), default=None)
        if last is not None:  # the commit marker: right after the last record, unless others wrote between
            self.written(partition, last + 1, 1)
        return last


def _retrieve(futures: list[asyncio.Future]) -> None:
    """Mark the failures of futures nobody will await as seen (no 'never retrieved' noise)."""
    for future in futures:
        if future.done():
            if not future.cancelled():
                future.exception()
        else:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())


def _retrieve_fencing(producer: AIOKafkaProducer) -> None:
    """A fenced aiokafka producer leaves its fatal error in a transaction waiter nobody awaits
    (logged as 'Future exception was never retrieved' at exit): mark it seen. aiokafka has no
    public handle on it; without one, this does nothing."""
    manager = getattr(producer, "_txn_manager", None)
    waiter = manager.wait_for_transaction_end() if manager is not None else None
    if isinstance(waiter, asyncio.Future) and waiter.done() and not waiter.cancelled():
        waiter.exception()
