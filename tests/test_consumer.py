"""The worker's batch protocol around a publication in flight, without a broker: a batch's
states enter the cache before Kafka acknowledges them, so nothing may reach RocksDB until
it has, and nothing at all if it failed; and when each partition is written (streams/consumer.py)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from aiokafka.errors import KafkaConnectionError

from vql.streams.consumer import BehaviorConsumer
from vql.streams.settings import Settings

from test_processor import event, processor, records, stored  # noqa: F401 - processor is a fixture


def _consumer(processor) -> BehaviorConsumer:  # noqa: F811
    return BehaviorConsumer(Settings(), processor, on_batch=lambda *args: None)


def test_a_failed_publication_stops_every_later_flush(processor):  # noqa: F811
    async def scenario() -> None:
        consumer = _consumer(processor)
        processor.commit(processor.process(records(0, 0, [(b"a", event("a", 1, 5))])))  # as _apply does

        async def publication() -> None:
            raise KafkaConnectionError("the broker went away")

        consumer._in_flight = asyncio.ensure_future(publication())
        with pytest.raises(KafkaConnectionError):
            await consumer._flush_and_commit()
        with pytest.raises(RuntimeError, match="a publication failed"):  # and at every later batch or flush
            await consumer._flush_and_commit()

    asyncio.run(scenario())
    processor.flush()  # what shutdown does after the failed flush: the caches are gone, nothing to write
    assert processor.store(0).processed_offset() is None
    assert stored(processor, 0, ["a"]).event_count.tolist() == [0]


def test_the_changelog_offset_comes_with_the_acknowledgement(processor):  # noqa: F811
    processor.commit(processor.process(records(0, 0, [(b"a", event("a", 1, 5))])))
    processor.reached({0: 41})
    processor.reached({0: 40})  # acknowledgements never move it back
    assert processor.flush() == {0: 0}
    assert processor.store(0).changelog_offset() == 41


def test_a_cancelled_batchs_thread_is_waited_for_before_the_caches_are_touched(processor):  # noqa: F811
    async def scenario() -> bool:
        consumer = _consumer(processor)
        consumer._processing = asyncio.ensure_future(asyncio.to_thread(time.sleep, 0.3))  # as _apply starts it
        await consumer._settle()
        return consumer._processing.done()

    assert asyncio.run(scenario())


def test_partitions_are_written_one_at_a_time_spread_over_the_interval(processor, monkeypatch):  # noqa: F811
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    consumer = BehaviorConsumer(Settings(commit_interval_s=4.0), processor, on_batch=lambda *args: None)
    commits = []

    async def commit(offsets) -> None:
        commits.append({tp.partition: offset for tp, offset in offsets.items()})

    consumer._consumer = SimpleNamespace(assignment=lambda: set(range(4)), commit=commit)  # four partitions owned
    for partition in range(4):
        processor.commit(processor.process(records(partition, 0, [(b"a", event("a", partition, 5))])))

    def at(now: float) -> list[int]:
        """What is due at ``now``, written and committed as the loop would."""
        clock[0] = now
        due = consumer._due_partitions()
        if due:
            asyncio.run(consumer._flush_and_commit(due))
        return due

    assert at(100.0) == []  # first seen now: due an interval later
    assert [at(t) for t in (104.0, 104.5, 105.0, 106.0, 107.0)] == [[0], [], [1], [2], [3]]  # a second apart
    assert at(107.5) == []  # all written, nothing new
    processor.commit(processor.process(records(2, 1, [(b"a", event("a", 9, 4))])))
    assert [at(t) for t in (108.0, 110.0)] == [[], [2]]  # partition 2, an interval after its last write
    assert commits == [{0: 1}, {1: 1}, {2: 1}, {3: 1}, {2: 2}]
    assert all(processor.store(p).processed_offset() == (1 if p == 2 else 0) for p in range(4))


def test_an_interval_of_zero_writes_every_partition_after_every_batch(processor):  # noqa: F811
    consumer = BehaviorConsumer(Settings(commit_interval_s=0.0), processor, on_batch=lambda *args: None)
    consumer._consumer = SimpleNamespace(assignment=lambda: set(range(2)))
    for partition in range(2):
        processor.commit(processor.process(records(partition, 0, [(b"a", event("a", partition, 5))])))
    assert sorted(consumer._due_partitions()) == [0, 1]
