"""The partition-change scenario of the fault suite: an operator raises the partition count of
the live topics in place; the worker refuses to continue, and the procedure of
docs/operations.md (export, import into topics of the new count, replay, new workers) ends
with every user's state exact, checked by the offline verifier (tests/harness.py).

Run with the fault suite: `pytest -m faults`."""

from __future__ import annotations

import time

import pytest

from harness import Pipeline, compare, recompute
from test_layout_integration import raise_partitions, refused
from test_pipeline_integration import produce
from vql.model.encoder import VQLModel
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.export import export_events, import_events
from vql.streams.replay import run_replay_topic

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def events(seed: int, users: int = 120) -> list[tuple[bytes, bytes]]:
    now_ms = int(time.time() * 1000)
    return [(key, value.replace(b'"event_id":"', f'"event_id":"s{seed}-'.encode()))
            for key, value in generate(DemoSpec(users=users, mean_events=12, heavy_users=0, seed=seed), now_ms)]


def test_a_partition_change_in_place_is_refused_and_the_procedure_ends_exact(kafka_bootstrap, tmp_path):
    old = Pipeline.create(kafka_bootstrap, tmp_path / "old", partitions=2)
    try:
        old.start_worker()
        total = produce(old, events(1))
        old.wait_until_committed(total)
    finally:
        old.stop_all()

    # The mistake: both topics raised to 4 partitions, and producers go on (now placed by 4).
    raise_partitions(old, 4)
    time.sleep(1.0)  # producers' metadata: the new partitions
    total += produce(old, events(2))
    assert "it has 4 now" in refused(old)

    # The procedure: new topics of 4 partitions, the events copied (placed by key), a replay,
    # new workers; events keep arriving on the new topic.
    new = Pipeline.create(kafka_bootstrap, tmp_path / "new", partitions=4)
    exported = tmp_path / "events.parquet"
    written, rejected = export_events(kafka_bootstrap, old.settings.behaviors_topic, exported,
                                      old.settings.event_policy(), progress=False)
    assert written == total and not rejected, rejected
    assert import_events([exported], kafka_bootstrap, new.settings.behaviors_topic, progress=False) == total
    model, version = VQLModel.load(new.settings.model_path)
    report = run_replay_topic(new.settings, model, version, jobs=1, progress=False, group=new.settings.app_id)
    assert report.events_read == total and not report.dead_letters, report.dead_letters
    try:
        new.start_worker()
        total += produce(new, events(3))
        new.wait_until_committed(total)
    finally:
        new.stop_all()
    result = compare(new.settings, new.published(), recompute(new.settings).states)
    print(f"partition change 2 -> 4 by the procedure: {result.summary()}")
    assert result.ok and result.events_expected == result.events_published == total, result.summary()
