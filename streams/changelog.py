"""Restoring a partition's store from its changelog: the published states topic.

States are published (and acknowledged by Kafka) before they are written to the local store,
and the states topic is compacted and co-partitioned with the input. So the topic's partition
p always holds, per user, a state at least as new as any local copy of partition p: it is the
changelog of the store, as a Kafka Streams changelog topic is, without a second topic to keep.

A store remembers the last changelog offset it holds; restoring reads only what came after
(nothing, when this worker owned the partition all along). A store restored from the topic
holds float32-rounded states (the published precision): within 1e-7 relative of the owner's.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from vql.schemas.control import deleted_offset
from vql.schemas.newest import newest
from vql.schemas.user_state import StateBatch, StateFormatError, decode_user_state, read_state_header
from vql.streams.kafka_security import aiokafka_security
from vql.streams.recovery import off_loop
from vql.streams.state_store import PartitionStore

log = logging.getLogger("vql.changelog")

RESTORE_CHUNK = 2000  # states per WriteBatch while restoring
RESTORE_STALL_S = 30.0  # no record for this long while behind the end: a broker error, tried again


async def restore_partition(
    store: PartitionStore, bootstrap: str, topic: str, partition: int, model_version: str, purpose: str = "assigned",
    tombstones: list | None = None,
) -> int:
    """Bring ``store`` up to the end of ``topic``'s ``partition``; returns states restored;
    the tombstones it applied go to ``tombstones`` as (key, None, headers), if given.

    The end is the partition's end offset read at the start: the restore stops when its
    position reaches it, never on an empty poll (a slow fetch would end it early, and a
    compacted-away last offset would never come), and fails with a KafkaTimeoutError when no
    record comes for ``RESTORE_STALL_S``. Decoding and RocksDB writes run in a thread, so that
    a long restore does not stop the event loop (heartbeats, the other partitions' batches).

    A state of another model version in the topic is skipped with a warning: its codes mean
    nothing to this model (a misconfigured states topic; docs/operations.md). A tombstone
    deletes the user's state and event ids; one the worker published (streams/deletion.py)
    also leaves the user's deletion marker, so that a redelivery of the events before the
    delete request applies nothing here either.
    """
    tp = TopicPartition(topic, partition)
    # read_committed: a fenced worker's aborted transactions never reach a store.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                isolation_level="read_committed",
                                max_partition_fetch_bytes=32 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
                                **aiokafka_security())
    await consumer.start()
    counts, started = _Counts(), time.monotonic()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        held = store.changelog_offset()
        begin = (await consumer.beginning_offsets([tp]))[tp]
        start = begin if held is None else max(held + 1, begin)
        if start >= end:
            if purpose != "standby":  # a standby round with nothing new says nothing
                log.info("restored 0 states of %s partition %d (%s) from offset %d: up to date",
                         topic, partition, purpose, start)
            return 0
        consumer.seek(tp, start)
        position, progress = start, time.monotonic()
        while position < end:
            batches = await consumer.getmany(tp, timeout_ms=1000, max_records=RESTORE_CHUNK)
            records = [r for r in batches.get(tp, []) if r.offset < end]
            reached = min(await consumer.position(tp), end)
            if reached > position:  # records, or only transaction markers: the offset moves on
                await off_loop(_write_chunk, store, records, reached - 1, model_version, tp, counts)
                if tombstones is not None:
                    tombstones.extend((r.key, None, r.headers) for r in records if r.value is None)
                position, progress = reached, time.monotonic()
            elif time.monotonic() - progress > RESTORE_STALL_S:
                raise KafkaTimeoutError(f"no record of {tp} for {RESTORE_STALL_S:.0f} s at offset {position} "
                                        f"(restoring up to {end})")
        if counts.foreign:
            log.warning("changelog %s: %d states of another model skipped", tp, counts.foreign)
        log.info("restored %d states (%d users deleted) of %s partition %d (%s) from offset %d to %d in %.1f s",
                 counts.restored, counts.deleted, topic, partition, purpose, start, end - 1,
                 time.monotonic() - started)
        return counts.restored
    finally:
        await consumer.stop()


class _Counts:
    """What a restore has done so far (written by its chunks, in a thread)."""

    def __init__(self) -> None:
        self.restored = 0
        self.deleted = 0
        self.foreign = 0


def _write_chunk(store: PartitionStore, records: list, reached: int, model_version: str, tp: TopicPartition,
                 counts: _Counts) -> None:
    """Decode a chunk of changelog records and write their deletions, per user the state with
    the larger applied offset (of the chunk's and the store's: schemas/newest.py), and the
    changelog offset they reach, in one WriteBatch."""
    changes = []
    deletions: dict[str, int | None] = {}  # written before the states: a later state re-creates
    for record in records:
        if record.value is None:
            if record.key is not None:
                user = record.key.decode("utf-8", "replace")
                marker = deleted_offset(record.headers)
                deletions[user] = marker if marker is not None else deletions.get(user)
                changes.append((record.key, None, None))
            continue
        if record.key is None:
            continue
        try:
            header = read_state_header(memoryview(record.value))
        except StateFormatError as exc:
            log.warning("changelog %s offset %d: unreadable state skipped: %s", tp, record.offset, exc)
            continue
        if header.layout[0] != model_version:
            counts.foreign += 1
            continue
        changes.append((record.key, record.value, header.applied_offset))
    # Of equals the store keeps its own copy: the same events, in float64 rather than float32.
    keep = newest(changes, lambda keys: store.applied_offsets([key.decode() for key in keys]), replace_equal=False)
    pending = [decode_user_state(value) for value in keep.values() if value is not None]
    store.write(StateBatch.of(pending) if pending else None, None, reached, deletions=deletions)
    counts.restored += len(pending)
    counts.deleted += len(deletions)
