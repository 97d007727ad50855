"""Replay against the real broker: a replay of the topic gives the live worker's states; from
an exported Parquet file too; an interrupted replay resumes to the same states; and the model
upgrade procedure of docs/replay.md runs end to end while the old worker serves."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import pytest

from harness import Pipeline, compare, recompute
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.model.features import Candidates
from vql.model.scoring import ModelVersionMismatch, Scorer
from vql.streams.cli import main
from vql.streams.demo import start_worker
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.export import export_events, export_states
from vql.streams.processor import BatchProcessor
from vql.streams.replay import run_replay_topic
from vql.streams.replay_files import run_replay_files
from vql.streams.state_store import PartitionStore, partition_store_path
from vql.streams.topics import ensure_topics, produce_all, read_topic

pytestmark = pytest.mark.integration

SPEC = DemoSpec(users=300, mean_events=12, heavy_users=2, heavy_events=1500, seed=5)
BAD = [(b"user-x", b"not json"),
       (b"user-y", orjson.dumps({"event_id": "e", "user_id": "user-y", "item_id": -1, "action": "click",
                                 "event_time_ms": 1_700_000_000_000, "context": {"category": 1, "modality": "video"}}))]


def produce(settings, records) -> int:
    return produce_all(settings.kafka_bootstrap, settings.behaviors_topic, records)


def events(seed: int = 5, now_ms: int | None = None) -> list[tuple[bytes, bytes]]:
    records = list(generate(DemoSpec(**{**SPEC.__dict__, "seed": seed}), now_ms or int(time.time() * 1000)))
    duplicate = records[3]  # the same event id sent twice: a dead letter for both worker and replay
    return records + BAD + [duplicate]


def stored_states(settings, version: str, partitions: int) -> dict:
    states = {}
    for p in range(partitions):
        store = PartitionStore(partition_store_path(settings.data_dir, version, settings.behaviors_topic, p), version)
        states.update({s.user_id: s for s in store.states()})
        store.close()
    return states


def interrupted_at_call(method, call: int):
    """``method``, but its ``call``-th call raises KeyboardInterrupt (Ctrl-C) instead."""
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt("interrupted")
        return method(*args, **kwargs)

    return interrupted


@pytest.fixture
def pipeline(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path)
    yield pipeline
    pipeline.stop_all()


def test_topic_replay_equals_the_live_worker_and_so_does_the_exported_file(pipeline, tmp_path):
    total = produce(pipeline.settings, events())
    pipeline.start_worker()
    pipeline.wait_until_committed(total, timeout_s=90)
    pipeline.stop_all()
    live = pipeline.published()
    model, version = VQLModel.load(pipeline.settings.model_path)

    target = pipeline.settings.model_copy(update={
        "data_dir": tmp_path / "replay", "states_topic": pipeline.settings.states_topic + ".replay",
        "dlq_topic": pipeline.settings.states_topic + ".replay.dlq"})
    report = run_replay_topic(target, model, version, batch_size=5000, progress=False)
    assert report.events_read == total and report.dead_letters == {"not_json": 1, "schema_violation": 1,
                                                                      "duplicate_event_id": 1}
    letters = [dict(headers)["reason"] for *_record, headers in read_topic(target.kafka_bootstrap, target.dlq_topic)]
    assert sorted(letters) == [b"duplicate_event_id", b"not_json", b"schema_violation"]
    replayed = Pipeline(target).published()
    result = compare(pipeline.settings, replayed, live)
    assert result.ok and result.users_compared == len(live), result.summary()
    assert {u: s.applied_offset for u, s in replayed.items()} == {u: s.applied_offset for u, s in live.items()}
    # The partitions dealt to 2 forked jobs: `vql replay` in a process of its own (this one has
    # opened RocksDB stores, so it would replay in one job).
    dealt = target.model_copy(update={"data_dir": tmp_path / "dealt", "states_topic": target.states_topic + ".dealt"})
    out_text = subprocess.run(
        [sys.executable, "-m", "vql.streams.cli", "replay", "--topic", dealt.behaviors_topic, "--model",
         str(dealt.model_path), "--data-dir", str(dealt.data_dir), "--publish", dealt.states_topic, "--jobs", "2",
         "--batch-size", "5000", "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VQL_KAFKA_BOOTSTRAP": dealt.kafka_bootstrap})
    assert out_text.returncode == 0, out_text.stderr
    assert ", 2 jobs)" in out_text.stdout and f"{total:,} events" in out_text.stdout
    result = compare(pipeline.settings, Pipeline(dealt).published(), live)
    assert result.ok and result.users_compared == len(live), result.summary()

    # Export -> Parquet -> columnar replay: the same states, in the same store layout.
    out = tmp_path / "events.parquet"
    written, rejected = export_events(pipeline.settings.kafka_bootstrap, pipeline.settings.behaviors_topic, out,
                                      pipeline.settings.event_policy(), progress=False)
    assert written == total - 2 and sum(rejected.values()) == 2
    files = pipeline.settings.model_copy(update={"data_dir": tmp_path / "files"})
    report = run_replay_files([out], files, model, version, progress=False)
    assert report.dead_letters == {"duplicate_event_id": 1}
    from_files = stored_states(files, version, pipeline.settings.partitions)
    result = compare(pipeline.settings, from_files, live)
    assert result.ok and result.users_compared == len(live), result.summary()
    assert all(from_files[u].applied_offset == s.applied_offset for u, s in live.items())
    # The same file in 2 forked jobs, published: `vql replay` in a process of its own (this one
    # has opened RocksDB stores, so it would replay in one job).
    jobs = files.model_copy(update={"data_dir": tmp_path / "jobs", "states_topic": target.states_topic + ".jobs"})
    out_text = subprocess.run(
        [sys.executable, "-m", "vql.streams.cli", "replay", "--files", str(out), "--model", str(jobs.model_path),
         "--data-dir", str(jobs.data_dir), "--store-topic", jobs.behaviors_topic, "--partitions", str(jobs.partitions),
         "--publish", jobs.states_topic, "--jobs", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VQL_KAFKA_BOOTSTRAP": jobs.kafka_bootstrap})
    assert out_text.returncode == 0, out_text.stderr
    assert ", 2 jobs)" in out_text.stdout and f"{len(live):,} states published" in out_text.stdout
    result = compare(pipeline.settings, Pipeline(jobs).published(), live)
    assert result.ok and result.users_compared == len(live), result.summary()

    for p in range(pipeline.settings.partitions):  # a worker could continue from these stores
        topic_store = PartitionStore(partition_store_path(target.data_dir, version, target.behaviors_topic, p), version)
        file_store = PartitionStore(partition_store_path(files.data_dir, version, files.behaviors_topic, p), version)
        assert topic_store.processed_offset() == file_store.processed_offset()
        topic_store.close()
        file_store.close()

    # States to Parquet: one row per user, the published float32 state.
    assert export_states(target.kafka_bootstrap, target.states_topic, tmp_path / "states.parquet") == len(live)


def test_an_interrupted_topic_replay_resumes_to_the_same_states(pipeline, tmp_path, monkeypatch):
    total = produce(pipeline.settings, events(seed=8))
    model, version = VQLModel.load(pipeline.settings.model_path)
    whole = pipeline.settings.model_copy(update={"data_dir": tmp_path / "whole"})
    run_replay_topic(whole, model, version, publish=False, batch_size=700, progress=False)

    # A flush after every batch, so that two are durable when the third flush is interrupted
    # (published, not yet written: the worst moment).
    crashing = pipeline.settings.model_copy(update={"data_dir": tmp_path / "resumed", "commit_interval_s": 0})
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(BatchProcessor, "flush", interrupted_at_call(BatchProcessor.flush, 3))
        run_replay_topic(crashing, model, version, publish=True, batch_size=700, progress=False)
    # Resumed with no flush due, and interrupted again while batches wait in the caches
    # unpublished: they must not reach the stores, or the states topic would never get them.
    coalescing = crashing.model_copy(update={"commit_interval_s": 3600})
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(BatchProcessor, "process", interrupted_at_call(BatchProcessor.process, 3))
        run_replay_topic(coalescing, model, version, publish=True, batch_size=700, progress=False)
    report = run_replay_topic(coalescing, model, version, publish=True, batch_size=700, progress=False)
    assert 0 < report.events_read < total  # it resumed, it did not start over

    expected = stored_states(whole, version, pipeline.settings.partitions)
    resumed = stored_states(crashing, version, pipeline.settings.partitions)
    result = compare(pipeline.settings, resumed, expected)
    assert result.ok and result.users_compared == len(expected), result.summary()
    published = pipeline.published()
    assert compare(pipeline.settings, published, expected).ok


def test_model_upgrade_end_to_end_while_the_old_worker_serves(pipeline, tmp_path):
    old = pipeline.settings
    first = produce(old, events(seed=9))
    pipeline.start_worker()
    pipeline.wait_until_committed(first, timeout_s=90)

    # 1. A new model; 2. replay into user-states.<version>, committing the new group's offsets,
    # while the old worker keeps serving (and keeps receiving events).
    new_model = tmp_path / "model-v2.npz"
    new_version = VQLModel(ModelConfig(seed=1)).save(new_model)
    new = old.model_copy(update={"model_path": new_model, "states_topic": f"{old.states_topic}.{new_version}",
                                 "dlq_topic": f"{old.states_topic}.{new_version}.dlq",
                                 "app_id": f"{old.app_id}-{new_version}"})
    assert main(["replay", "--model", str(new_model), "--data-dir", str(old.data_dir), "--topic", old.behaviors_topic,
                 "--publish", new.states_topic, "--group", new.app_id, "--no-progress"]) == 0
    # More events arrive during the switch (ids of their own: a repeated id is a duplicate).
    later = produce(old, [(k, v.replace(b'"event_id":"', b'"event_id":"late-')) for k, v in events(seed=10)[:-3]])

    # 3. A new worker on the new model catches up to the live head from the replayed stores.
    pipeline.workers.append(start_worker(new, old.data_dir / "worker-new.log"))
    upgraded = Pipeline(new)
    upgraded.workers = pipeline.workers
    upgraded.wait_until_committed(first + later, timeout_s=90)
    pipeline.wait_until_committed(first + later, timeout_s=90)

    # 4. Readers switch: the new topic holds every user's state under the new model, equal to
    # an offline recomputation; the new scorer refuses an old state with a clear error.
    expected = recompute(new)
    published = upgraded.published()
    result = compare(new, published, expected.states)
    assert result.ok and result.users_compared == len(expected.states), result.summary()
    assert {s.model_version for s in published.values()} == {new_version}
    old_state = next(iter(pipeline.published().values()))
    candidates = Candidates(item=[1, 2], category=[1, 2], modality=[0, 1])
    with pytest.raises(ModelVersionMismatch, match="was built by model"):
        Scorer.from_path(new_model).score(old_state, candidates, time.time())
    log = (old.data_dir / "worker-new.log").read_text()
    assert "restored 0 states" in log or "up to date" in log  # it did not rebuild from the topic


def test_exported_events_imported_into_another_topic_give_the_same_states(pipeline, tmp_path):
    produce(pipeline.settings, events(seed=12))
    out = tmp_path / "events.parquet"
    assert main(["export", "events", "--topic", pipeline.settings.behaviors_topic, "--out", str(out),
                 "--no-progress"]) == 0
    region = pipeline.settings.scoped(f"{pipeline.settings.behaviors_topic}-region")
    ensure_topics(region)
    assert main(["import", str(out), "--topic", region.behaviors_topic, "--no-progress"]) == 0
    original, imported = recompute(pipeline.settings), recompute(region)
    result = compare(pipeline.settings, imported.states, original.states)
    assert result.ok and result.users_compared == len(original.states), result.summary()
