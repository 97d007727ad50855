"""The serving view against a real broker: restore, restart from the local copy, catch up,
lag, tombstones, and live following."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from test_state_math import build_state, make_model, random_events
from vql.model.features import Candidates
from vql.schemas.user_state import encode_user_state
from vql.serving import RankingClient, UserNotFound
from vql.serving.follower import StateFollower
from vql.serving.store import StateStore
from vql.streams.settings import Settings
from vql.streams.topics import ensure_topics, producer

pytestmark = pytest.mark.integration


def publish(bootstrap: str, topic: str, records: list[tuple[str, bytes | None]]) -> None:
    client = producer(bootstrap)
    for user, value in records:
        client.send(topic, key=user.encode(), value=value)
    client.flush()
    client.close()


def test_view_restores_restarts_catches_up_and_follows(kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, partitions=2).scoped(f"serving-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings)
    topic = settings.states_topic
    model, scorer = make_model(tmp_path)
    artifact = next(tmp_path.glob("model-*.npz"))
    rng = np.random.default_rng(0)

    def state_of(user: str, n: int) -> bytes:
        state = build_state(model, scorer.version, random_events(rng, n), [np.arange(n)])
        state.user_id = user
        return encode_user_state(state, np.float32)

    publish(kafka_bootstrap, topic, [(f"u{i}", state_of(f"u{i}", 10 + i)) for i in range(6)])

    # Lag is exposed: a follower that reads one record per step is behind by the rest.
    probe_store = StateStore(tmp_path / "probe", topic)
    follower = StateFollower(kafka_bootstrap, probe_store, max_records=1)
    follower.step(timeout_s=5.0)
    assert 0 < follower.status.total_lag < 6
    follower.stop()
    probe_store.close()

    # First start: restore everything into the local store.
    client = RankingClient.connect(kafka_bootstrap, topic, artifact, tmp_path / "view", restore_timeout_s=30)
    assert client.freshness().lag == 0 and not client.freshness().stale
    assert [client.state(f"u{i}").event_count for i in range(6)] == [10 + i for i in range(6)]
    client.close()

    # While the backend is down: an update, a new user and a tombstone.
    publish(kafka_bootstrap, topic, [("u1", state_of("u1", 50)), ("u6", state_of("u6", 7)), ("u2", None)])

    # The local copy alone (no broker) still serves what it had.
    offline = RankingClient.connect(kafka_bootstrap, topic, artifact, tmp_path / "view", follow=False)
    assert offline.state("u1").event_count == 11 and offline.state("u2").event_count == 12
    assert sum(offline.store.next_offsets().values()) == 6
    offline.close()

    # Restart: resume from the stored offsets, read only the three new records.
    client = RankingClient.connect(kafka_bootstrap, topic, artifact, tmp_path / "view", restore_timeout_s=30)
    try:
        assert sum(client.store.next_offsets().values()) == 9
        assert client.state("u1").event_count == 50 and client.state("u6").event_count == 7
        with pytest.raises(UserNotFound):
            client.state("u2")
        assert client.freshness().lag == 0

        # Live: the follower thread applies a new state within seconds.
        publish(kafka_bootstrap, topic, [("u3", state_of("u3", 99))])
        deadline = time.monotonic() + 20
        while client.state("u3").event_count != 99 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.state("u3").event_count == 99
        one = Candidates(item=np.array([1]), category=np.array([2]), modality=np.array([0]))
        ranking = client.score("u3", one, now_s=2e9)
        assert ranking.scores.ctr.shape == (1,) and not ranking.freshness.stale
    finally:
        client.close()

