"""Deleting a user: delete requests in, tombstones out (docs/operations.md, "Deleting a user").

A delete request is a control message on the `behaviors` topic (schemas/control.py), keyed
by the user, so that it is applied on the user's partition in input order: the processor
(streams/processor.py) empties the user's state, keeps a deletion marker holding the
request's input offset (a redelivery of the events before it then applies nothing) and
publishes a tombstone, which every copy of the state obeys: the owner's store and cache,
standby copies and restores (streams/changelog.py), serving views (serving/store.py).

A bare tombstone (no ``vql-deleted-offset`` header: an operator wrote it) is turned into a
delete request by the partition's owner, so that its store and cache forget the user too and
the events still on their way are deleted with the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from vql.schemas.control import delete_request, deleted_offset, tombstone_headers
from vql.streams.kafka_security import aiokafka_security
from vql.streams.processor import BatchResult
from vql.streams.topics import producer


async def publish_tombstones(kafka: AIOKafkaProducer, states_topic: str,
                             result: BatchResult) -> list[tuple[int, int]]:
    """Publish a tombstone for every user ``result`` deleted, on the partition of its state,
    and wait for Kafka's acknowledgements (so that a state published after it, which
    re-creates the user, comes after it in the log); returns (partition, offset) of each."""
    sent: list[tuple[int, asyncio.Future]] = []
    for partition, users in result.deletions.items():
        for user_id, offset in users.items():
            future = await kafka.send(states_topic, value=None, key=user_id.encode(), partition=partition,
                                      headers=tombstone_headers(offset, result.model_version))
            sent.append((partition, future))
    return [(partition, metadata.offset)
            for (partition, _future), metadata in zip(sent, await asyncio.gather(*(f for _p, f in sent)))]


def request_deletions(bootstrap: str, behaviors_topic: str, user_ids: Iterable[str]) -> list[tuple[str, int, int]]:
    """Send a delete-user control message for each user to ``behaviors_topic`` and wait for
    Kafka to have them; returns (user, partition, offset) of each request. The default
    partitioner (murmur2 of the key) puts each on its user's partition."""
    client = producer(bootstrap)
    try:
        futures = []
        for user_id in user_ids:
            key, value, headers = delete_request(user_id)
            futures.append((user_id, client.send(behaviors_topic, key=key, value=value, headers=headers)))
        client.flush()
        return [(user_id, meta.partition, meta.offset)
                for user_id, future in futures for meta in [future.get(timeout=30)]]
    finally:
        client.close()


def bare_tombstones(records: Sequence[tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes]]]]) -> list[str]:
    """The users that ``records`` (key, value, headers; a stretch of a states topic, in
    order) delete with a bare tombstone not already followed by a worker's own tombstone
    for them: the deletions still to request."""
    pending: dict[str, None] = {}
    for key, value, headers in records:
        if key is None or value is not None:
            continue
        user = key.decode("utf-8", "replace")
        if deleted_offset(headers) is None:
            pending[user] = None
        else:
            pending.pop(user, None)
    return list(pending)


class TombstoneWatch:
    """Finds the bare tombstones on the partitions a worker owns and requests the deletions
    they ask for: a worker's store and cache hold the user's state, and without a request
    its next event would publish the state again.

    The tombstones a restore applied come with the assignment (:meth:`assigned`); then, at
    every :meth:`check`, each owned partition's new records are read only if someone else
    wrote some: the worker tells :meth:`wrote` which offsets it published, and a range of
    the log that holds only those is skipped. Why: reading every state back costs a large
    share of what publishing it costs the worker (the bytes are copied through the client
    again), where comparing end offsets costs one request a round."""

    def __init__(self, bootstrap: str, states_topic: str, behaviors_topic: str) -> None:
        self.bootstrap = bootstrap
        self.states_topic = states_topic
        self.behaviors_topic = behaviors_topic
        self.positions: dict[int, int | None] = {}  # owned partition -> next offset to read (None: the first)
        self._own: dict[int, list[tuple[int, int]]] = {}  # partition -> (first offset, count) this worker wrote
        self._carried: dict[int, list] = {}  # partition -> tombstones its restore applied, not yet answered
        self._generation: dict[int, int] = {}  # partition -> assignments so far: a check spans one
        self.reads = 0  # partition ranges read, for tests and logs

    def assigned(self, partition: int, start: int | None, tombstones: Sequence = ()) -> None:
        """A partition restored up to ``start`` (exclusive; None: nothing in it), with the
        tombstones (key, None, headers) its restore applied."""
        self.positions[partition] = start
        self._generation[partition] = self._generation.get(partition, 0) + 1
        self._own[partition] = []
        self._carried[partition] = list(tombstones)

    def revoked(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self.positions.pop(partition, None)
            self._own.pop(partition, None)
            self._carried.pop(partition, None)

    def wrote(self, partition: int, first: int, count: int) -> None:
        """This worker's publication of ``count`` records from offset ``first`` was acknowledged."""
        if partition in self._own:
            self._own[partition].append((first, count))

    def _foreign(self, partition: int, start: int | None, end: int,
                 own: list[tuple[int, int]] | None = None) -> bool:
        """Whether [start, end) of the partition may hold a record this worker did not write
        (``own``: the ranges it wrote, as known before ``end`` was read; default: all known).
        A transaction's commit marker is told as the one offset after its last record: the
        marker is there or later, so a count that matches can hide no other record (a marker
        later than that leaves the count short, and the range is read)."""
        if start is None:
            return end > 0
        ranges = self._own[partition] if own is None else own
        counted = sum(max(0, min(first + count, end) - max(first, start)) for first, count in ranges)
        return end - start != counted

    async def check(self, kafka: AIOKafkaProducer) -> list[tuple[str, int]]:
        """Read what is new on the owned partitions and send a delete request for every bare
        tombstone not yet answered; returns (user, partition) of the requests sent."""
        if not self.positions:
            return []
        partitions = dict(self.positions)
        generation = dict(self._generation)
        found: dict[int, list] = {p: self._carried.get(p, []) for p in partitions}
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=32 * 1024 * 1024,
                                    fetch_max_bytes=64 * 1024 * 1024, check_crcs=False,
                                    **aiokafka_security())
        await consumer.start()
        try:
            tps = [TopicPartition(self.states_topic, p) for p in partitions]
            # What was written before the end offsets are asked: a later publication is not
            # counted, so its records look foreign and are read (never the other way round).
            own = {p: list(ranges) for p, ranges in self._own.items()}
            ends = await consumer.end_offsets(tps)
            tps = [tp for tp in tps if tp.partition in own and
                   self._foreign(tp.partition, partitions[tp.partition], ends[tp], own[tp.partition])]
            self.reads += len(tps)
            if tps:
                consumer.assign(tps)
            for tp in tps:
                start = partitions[tp.partition]
                if start is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, start)
            remaining = {tp for tp in tps if ends[tp] > (await consumer.position(tp))}
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=50_000)
                for tp, messages in batches.items():
                    found.setdefault(tp.partition, []).extend(
                        (m.key, m.value, m.headers) for m in messages if m.offset < ends[tp] and m.value is None)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        finally:
            await consumer.stop()
        sent = []
        for partition, records in found.items():
            for user in bare_tombstones(records):
                key, value, headers = delete_request(user)
                sent.append((user, partition, await kafka.send(self.behaviors_topic, value, key=key,
                                                               partition=partition, headers=headers)))
        await asyncio.gather(*(future for _u, _p, future in sent))
        for tp, end in ends.items():
            if tp.partition in self.positions and self._generation[tp.partition] == generation[tp.partition]:
                self.positions[tp.partition] = end
                self._own[tp.partition] = [(f, c) for f, c in self._own[tp.partition] if f + c > end]
                self._carried[tp.partition] = []
        return [(user, partition) for user, partition, _f in sent]
