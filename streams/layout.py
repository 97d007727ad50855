"""Whether the states topic was written for this worker: its partition count and its model.

A worker folds a user's events into the state its partition's store holds, and restores that
store from the same partition of the states topic. Two operator actions break this silently:

- **A partition-count change** (``kafka-topics --alter --partitions`` on both topics): Kafka's
  partitioner moves about half the users to other partitions, whose stores know nothing of
  them, and the users start again from empty states.
- **A model change on the same topics** (only ``VQL_MODEL_PATH`` changed): the restore skips
  the old model's states, and the worker publishes fresh, empty states over them.

So a worker (and a replay that publishes) reads the newest states of every partition before
it starts (:func:`sample_states`) and refuses, with the procedure to follow, when they were
placed for another partition count or built by another model (:func:`check_states_topic`).
Every state record carries the partition count of the topic it was published to (the
:data:`PARTITIONS_HEADER` header): one record tells, without statistics. States published
before the header existed are judged by their keys: each sampled key must hash (murmur2) to
the partition it is on; after a doubling, each key of a sample fails with probability 1/2,
so :data:`SAMPLE` keys a partition miss it with probability 2^-SAMPLE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka import TopicPartition

from vql.schemas.placement import partition_of
from vql.schemas.user_state import StateFormatError, read_state_header
from vql.streams.topics import TopicLayoutError, reader

log = logging.getLogger("vql.layout")

PARTITIONS_HEADER = "vql.partitions"  # on each state record: partitions of the topic it went to
SAMPLE = 32  # newest records read per partition

PARTITION_PROCEDURE = ("a partition-count change needs new topics: replay the events into topics created with "
                       "the new count (docs/operations.md, 'Changing the partition count')")
MODEL_PROCEDURE = ("a new model needs its own states topic: replay into it and switch "
                   "(docs/replay.md, 'Upgrading the model without downtime')")


class LayoutRefused(TopicLayoutError):
    """The states topic holds states this worker must not continue: the message says why
    and what to do instead."""


@dataclass(frozen=True)
class SampledState:
    """One of the newest records of a states topic partition, as far as the checks need it."""

    partition: int
    offset: int
    key: bytes | None
    model_version: str | None  # None: a tombstone or an unreadable value
    partitions_header: int | None  # the recorded partition count; None for states without it


def state_headers(partitions: int) -> list[tuple[str, bytes]]:
    """The headers a state record carries: the partition count of its topic."""
    return [(PARTITIONS_HEADER, str(partitions).encode())]


def sample_states(bootstrap: str, topic: str, per_partition: int = SAMPLE) -> tuple[int, list[SampledState]]:
    """The states topic's partition count and up to ``per_partition`` of the newest records
    of each partition (an absent topic: 0 and none)."""
    consumer = reader(bootstrap, consumer_timeout_ms=2000)
    try:
        numbers = sorted(consumer.partitions_for_topic(topic) or [])
        if not numbers:
            return 0, []
        partitions = [TopicPartition(topic, p) for p in numbers]
        consumer.assign(partitions)
        begin, end = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        remaining = set()
        for tp in partitions:
            if end[tp] > begin[tp]:
                consumer.seek(tp, max(begin[tp], end[tp] - per_partition))
                remaining.add(tp)
            else:
                consumer.pause(tp)
        sampled: list[SampledState] = []
        while remaining:
            batch = consumer.poll(timeout_ms=2000)
            if not batch:
                break  # compaction may leave the end offset past the last record
            for tp, messages in batch.items():
                sampled.extend(_sampled(m) for m in messages if m.offset < end[tp])
                if consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
                    consumer.pause(tp)
        return len(numbers), sampled
    finally:
        consumer.close()


def _sampled(message) -> SampledState:  # noqa: ANN001 - kafka-python's ConsumerRecord
    header = dict(message.headers or ()).get(PARTITIONS_HEADER)
    version = None
    if message.value is not None:
        try:
            version = read_state_header(memoryview(message.value)).layout[0]
        except StateFormatError:
            pass
    try:
        recorded = int(header) if header is not None else None
    except ValueError:
        recorded = None
    return SampledState(message.partition, message.offset, message.key, version, recorded)


def check_states_topic(topic: str, partitions: int, sampled: list[SampledState], model_version: str) -> None:
    """Raise :class:`LayoutRefused` when a sampled state was placed for another partition
    count than ``partitions`` or built by another model than ``model_version``."""
    for state in sampled:
        if state.partitions_header is not None and state.partitions_header != partitions:
            raise LayoutRefused(
                f"{topic} holds states published when it had {state.partitions_header} partitions "
                f"(partition {state.partition} offset {state.offset}); it has {partitions} now, which moves "
                f"users to partitions whose stores do not know them: {PARTITION_PROCEDURE}")
        if state.key is not None and partition_of(state.key, partitions) != state.partition:
            raise LayoutRefused(
                f"{topic} partition {state.partition} holds the state of {state.key!r}, which belongs to "
                f"partition {partition_of(state.key, partitions)} of {partitions}: the topic's states were "
                f"placed for another partition count (or by another partitioner); {PARTITION_PROCEDURE}")
    foreign = sorted({s.model_version for s in sampled if s.model_version not in (None, model_version)})
    if foreign:
        raise LayoutRefused(
            f"{topic} holds states of model {', '.join(foreign)}, and this worker loads model {model_version}: "
            f"it would start its users from empty states and publish them over the old ones; {MODEL_PROCEDURE}")


def check_layout(bootstrap: str, states_topic: str, model_version: str) -> int:
    """Sample the states topic and check it (:func:`check_states_topic`); returns its
    partition count (0 when it does not exist)."""
    partitions, sampled = sample_states(bootstrap, states_topic)
    if partitions:
        check_states_topic(states_topic, partitions, sampled, model_version)
        log.info("%s: %d newest states of %d partitions checked: placed for %d partitions, model %s",
                 states_topic, len(sampled), partitions, partitions, model_version)
    return partitions
