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

from vql.schemas.user_state import StateBatch, StateFormatError, decode_user_state
from vql.streams.kafka_security import aiokafka_security
from vql.streams.state_store import PartitionStore

log = logging.getLogger("vql.changelog")

RESTORE_CHUNK = 2000  # states per WriteBatch while restoring


async def restore_partition(
    store: PartitionStore, bootstrap: str, topic: str, partition: int, model_version: str, purpose: str = "assigned"
) -> int:
    """Bring ``store`` up to the end of ``topic``'s ``partition``; returns states restored.

    A state of another model version in the topic is skipped with a warning: its codes mean
    nothing to this model (a misconfigured states topic; docs/operations.md).
    """
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                max_partition_fetch_bytes=32 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
                                **aiokafka_security())
    await consumer.start()
    restored, foreign, started = 0, 0, time.monotonic()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        held = store.changelog_offset()
        begin = (await consumer.beginning_offsets([tp]))[tp]
        start = begin if held is None else max(held + 1, begin)
        pending, last = [], start - 1
        if start >= end:
            if purpose != "standby":  # a standby round with nothing new says nothing
                log.info("restored 0 states of %s partition %d (%s) from offset %d: up to date",
                         topic, partition, purpose, start)
            return 0
        consumer.seek(tp, start)
        while last < end - 1:
            batches = await consumer.getmany(tp, timeout_ms=1000, max_records=RESTORE_CHUNK)
            for record in batches.get(tp, []):
                last = record.offset
                if record.value is None:
                    continue  # a tombstone: the user was deleted (compaction keeps none)
                try:
                    state = decode_user_state(record.value)
                except StateFormatError as exc:
                    log.warning("changelog %s offset %d: unreadable state skipped: %s", tp, record.offset, exc)
                    continue
                if state.model_version != model_version:
                    foreign += 1
                    continue
                pending.append(state)
            if pending or batches:
                store.write(StateBatch.of(pending) if pending else None, None, last)
                restored += len(pending)
                pending = []
        if foreign:
            log.warning("changelog %s: %d states of another model skipped", tp, foreign)
        log.info("restored %d states of %s partition %d (%s) from offset %d to %d in %.1f s",
                 restored, topic, partition, purpose, start, last, time.monotonic() - started)
        return restored
    finally:
        await consumer.stop()
