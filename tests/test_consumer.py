"""The worker's batch protocol around a publication in flight, without a broker: a batch's
states enter the cache before Kafka acknowledges them, so nothing may reach RocksDB until
it has, and nothing at all if it failed (streams/consumer.py)."""

from __future__ import annotations

import asyncio
import time

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
