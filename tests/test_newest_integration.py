"""The larger-applied-offset rule against a real broker and real RocksDB stores: a late, older
state of a user in the states topic (a publication that arrived after a newer one) replaces
the newer one neither in a worker's restore nor in the serving view."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest

from test_serving_integration import publish
from vql.model.config import ModelConfig
from vql.model.state import empty_state
from vql.schemas.user_state import decode_user_state, encode_user_state
from vql.serving.follower import StateFollower
from vql.serving.store import StateStore
from vql.streams.changelog import restore_partition
from vql.streams.settings import Settings
from vql.streams.state_store import PartitionStore
from vql.streams.topics import ensure_topics

pytestmark = pytest.mark.integration

VERSION = "0123456789abcdef"


def state(user: str, applied_offset: int) -> bytes:
    cfg = ModelConfig()
    blank = empty_state(user, VERSION, (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim))
    return encode_user_state(dataclasses.replace(blank, applied_offset=applied_offset, event_count=applied_offset))


@pytest.fixture
def topic_with_a_late_state(kafka_bootstrap) -> Settings:
    """One partition: u's state at applied offset 200, then a late one at 100; v's only at 7."""
    settings = Settings(kafka_bootstrap=kafka_bootstrap, partitions=1).scoped(f"newest-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings)
    publish(kafka_bootstrap, settings.states_topic, [("u", state("u", 200)), ("v", state("v", 7)),
                                                     ("u", state("u", 100))])
    return settings


def test_a_restore_keeps_the_state_with_the_larger_applied_offset(topic_with_a_late_state, tmp_path):
    settings = topic_with_a_late_state
    store = PartitionStore(tmp_path / "store", VERSION)
    try:
        asyncio.run(restore_partition(store, settings.kafka_bootstrap, settings.states_topic, 0, VERSION))
        restored = {s.user_id: s.applied_offset for s in store.states()}
        assert restored == {"u": 200, "v": 7}
        # A later restore reading an even older state of u does not replace it either.
        publish(settings.kafka_bootstrap, settings.states_topic, [("u", state("u", 150))])
        asyncio.run(restore_partition(store, settings.kafka_bootstrap, settings.states_topic, 0, VERSION))
        assert {s.user_id: s.applied_offset for s in store.states()} == {"u": 200, "v": 7}
    finally:
        store.close()


def test_the_serving_view_keeps_the_state_with_the_larger_applied_offset(topic_with_a_late_state, tmp_path):
    settings = topic_with_a_late_state
    store = StateStore(tmp_path / "view", settings.states_topic)
    follower = StateFollower(settings.kafka_bootstrap, store)
    try:
        assert follower.catch_up(60)
        assert decode_user_state(store.get("u")).applied_offset == 200
        publish(settings.kafka_bootstrap, settings.states_topic, [("u", state("u", 150)), ("v", state("v", 9))])
        follower.catch_up(60)
        assert decode_user_state(store.get("u")).applied_offset == 200
        assert decode_user_state(store.get("v")).applied_offset == 9
    finally:
        follower.stop()
        store.close()
