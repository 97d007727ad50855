"""Events dated far ahead, against the real broker: the worker folds them at no more than
VQL_MAX_LANDMARK_LEAD_S past their record's timestamp, and the verifier (tests/harness.py),
the topic replay and the exported-file replay fold them identically."""

from __future__ import annotations

import time

import orjson
import pytest

from harness import Pipeline, compare, recompute
from test_replay_integration import stored_states
from vql.model.encoder import VQLModel
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.export import export_events
from vql.streams.replay import run_replay_topic
from vql.streams.replay_files import run_replay_files
from vql.streams.topics import produce_all

pytestmark = pytest.mark.integration

DAY_S = 86_400
LEAD_S = 600.0


def test_far_future_events_move_landmarks_only_the_lead_and_every_replay_agrees(kafka_bootstrap, tmp_path):
    # The operator accepts a year of skew (mobile clocks): these events are applied, not dead-lettered.
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    s = pipeline.settings = pipeline.settings.model_copy(
        update={"max_future_skew_s": 365.0 * DAY_S, "max_landmark_lead_s": LEAD_S})
    now_ms = int(time.time() * 1000)
    records = list(generate(DemoSpec(users=40, mean_events=8, heavy_users=0, seed=31), now_ms))
    ahead = {}
    for i, (key, value) in enumerate(records[:10]):  # ten users each send one event dated 30-300 days ahead
        event = orjson.loads(value)
        event["event_id"] += "-ahead"
        event["event_time_ms"] = now_ms + (30 + 30 * i) * DAY_S * 1000
        ahead[event["user_id"]] = event["event_time_ms"]
        records.append((key, orjson.dumps(event)))
    produced_ms = int(time.time() * 1000)
    total = produce_all(kafka_bootstrap, s.behaviors_topic, records)
    try:
        pipeline.start_worker()
        pipeline.wait_until_committed(total)
        pipeline.stop_all()
    finally:
        pipeline.stop_all()
    live = pipeline.published()
    latest_record_s = time.time()  # every record was stamped before this
    assert set(ahead) <= set(live)
    for user in ahead:
        # Not 30-300 days ahead: at most the lead past the record's (producer's) timestamp.
        assert produced_ms / 1e3 <= live[user].landmark_t0 <= latest_record_s + LEAD_S

    result = compare(s, live, recompute(s).states)
    print("worker against the verifier:", result.summary())
    assert result.ok and result.events_expected == total, result.summary()

    model, version = VQLModel.load(s.model_path)
    target = s.model_copy(update={"data_dir": tmp_path / "replay", "states_topic": s.states_topic + ".replay",
                                  "dlq_topic": s.states_topic + ".replay.dlq"})
    run_replay_topic(target, model, version, batch_size=5000, progress=False)
    result = compare(s, Pipeline(target).published(), live)
    assert result.ok and result.users_compared == len(live), result.summary()

    out = tmp_path / "events.parquet"
    written, _rejected = export_events(kafka_bootstrap, s.behaviors_topic, out, s.event_policy(), progress=False)
    assert written == total
    files = s.model_copy(update={"data_dir": tmp_path / "files"})
    run_replay_files([out], files, model, version, progress=False)
    result = compare(s, stored_states(files, version, s.partitions), live)
    assert result.ok and result.users_compared == len(live), result.summary()
