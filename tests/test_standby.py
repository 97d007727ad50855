"""Standby catch-up survives what fails in it (streams/standby.py): a partition whose
catch-up raises (KafkaError, OSError) is logged and retried next round, the other partitions
are caught up in the same round, and nothing escapes to end the standby task, which mode
would turn into a crash of the whole worker. Real RocksDB stores; against the broker, a real
restore whose bootstrap does not answer, then one that does."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError

from vql.model.state import empty_state
from vql.schemas.user_state import encode_user_state
from vql.streams.changelog import restore_partition
from vql.streams.settings import Settings
from vql.streams.standby import catch_up_round
from vql.streams.state_store import PartitionStore
from vql.streams.topics import ensure_topics, producer

VERSION = "v" * 16
SHAPE = (2, 4, 3, 4)


def run_round(tmp_path, restore, partitions=(0, 1, 2, 3), ends=None, owned=()):
    def open_store(partition: int) -> PartitionStore:
        return PartitionStore(tmp_path / f"behaviors-{partition}", VERSION)

    return asyncio.run(catch_up_round(list(partitions), ends or {p: 5 for p in partitions},
                                      owned=lambda p: p in owned, open_store=open_store,
                                      restore=restore, lock=asyncio.Lock()))


def test_a_failing_partition_is_logged_and_retried_and_the_others_are_caught_up(tmp_path, caplog):
    calls: list[int] = []
    broken = {1: KafkaError("broker went away"), 2: OSError(28, "No space left on device")}

    async def restore(store: PartitionStore, partition: int) -> None:
        calls.append(partition)
        if partition in broken:
            raise broken[partition]
        store.write(None, None, 4)  # caught up to the end

    failed = run_round(tmp_path, restore, owned={3})
    assert calls == [0, 1, 2] and failed == broken
    assert "partition 1 failed, retried next round" in caplog.text and "No space left" in caplog.text

    del broken[1], broken[2]
    calls.clear()
    assert run_round(tmp_path, restore, owned={3}) == {}
    assert calls == [1, 2]  # partition 0 is up to date: not read again


@pytest.mark.integration
def test_a_round_against_a_broker_that_does_not_answer_is_retried(kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, partitions=2).scoped(f"standby-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings)
    out = producer(kafka_bootstrap)
    for partition in (0, 1):
        for i in range(3):
            state = empty_state(f"user-{partition}-{i}", VERSION, SHAPE)
            state.log_count[0, 0, 0], state.event_count = 1.0, 1
            out.send(settings.states_topic, key=state.user_id.encode(), value=encode_user_state(state, np.float32),
                     partition=partition)
    out.flush()
    out.close()

    def restore_from(bootstrap: str):
        return lambda store, partition: restore_partition(store, bootstrap, settings.states_topic, partition,
                                                          VERSION, "standby")

    failed = run_round(tmp_path, restore_from("127.0.0.1:1"), partitions=(0, 1), ends={0: 3, 1: 3})
    assert sorted(failed) == [0, 1] and all(isinstance(e, KafkaConnectionError) for e in failed.values())
    assert run_round(tmp_path, restore_from(kafka_bootstrap), partitions=(0, 1), ends={0: 3, 1: 3}) == {}
    for partition in (0, 1):
        store = PartitionStore(tmp_path / f"behaviors-{partition}", VERSION)
        try:
            assert store.changelog_offset() == 2
            assert sorted(s.user_id for s in store.states()) == [f"user-{partition}-{i}" for i in range(3)]
        finally:
            store.close()
