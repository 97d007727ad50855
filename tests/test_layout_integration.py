"""Placement and layout against the real broker: every record on its user's partition or in
the DLQ, and no worker continuing a states topic placed for another partition count or built
by another model (schemas/placement.py, streams/layout.py)."""

from __future__ import annotations

import subprocess
import time

import pytest
from kafka.admin import NewPartitions

from harness import Pipeline, compare, recompute
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.placement import partition_of
from vql.serving.follower import StateFollower
from vql.serving.store import StateStore
from vql.streams.demo import read_states
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.export import export_events
from vql.streams.layout import PARTITIONS_HEADER
from vql.streams.replay import run_replay_topic
from vql.streams.replay_files import run_replay_files, source_partitions
from vql.streams.topics import admin, producer, read_topic

pytestmark = pytest.mark.integration


def produce(pipeline: Pipeline, records, partition_for=None) -> int:
    """Send (key, value) records; ``partition_for(key)`` overrides the partitioner."""
    client = producer(pipeline.settings.kafka_bootstrap)
    for key, value in records:
        partition = partition_for(key) if partition_for else None
        client.send(pipeline.settings.behaviors_topic, key=key, value=value, partition=partition)
    client.flush()
    client.close()
    return len(records)


def run_until_committed(pipeline: Pipeline, total: int) -> None:
    try:
        pipeline.start_worker()
        pipeline.wait_until_committed(total)
    finally:
        pipeline.stop_all()


def raise_partitions(pipeline: Pipeline, count: int) -> None:
    """What an operator must not do: raise both topics' partition counts in place."""
    client = admin(pipeline.settings.kafka_bootstrap)
    try:
        client.create_partitions({pipeline.settings.behaviors_topic: NewPartitions(count),
                                  pipeline.settings.states_topic: NewPartitions(count)})
    finally:
        client.close()


def refused(pipeline: Pipeline, **overrides) -> str:
    """Start a worker that must refuse: its exit code is 2; returns its log."""
    worker = pipeline.start_worker(**overrides)
    try:
        code = worker.wait(120)
    except subprocess.TimeoutExpired:
        pipeline.stop_all()
        raise AssertionError(f"the worker started\n{pipeline.worker_logs()}")
    assert code == 2, pipeline.worker_logs()
    return pipeline.worker_logs()


def produce_with_strays(pipeline: Pipeline) -> tuple[list, bytes, bytes, int]:
    """Good events on 3 partitions, then a keyless one, on partition 0, and a user's event on
    the partition after its own (as a client with another partitioner would place it), both
    repeats of good ones: (good, keyless value, stray value, the stray's partition)."""
    good = list(generate(DemoSpec(users=30, mean_events=10, heavy_users=0, seed=11), int(time.time() * 1000)))
    produce(pipeline, good)
    _key, keyless = good[0]
    stray_key, stray = good[1]
    elsewhere = (partition_of(stray_key, 3) + 1) % 3
    client = producer(pipeline.settings.kafka_bootstrap)
    client.send(pipeline.settings.behaviors_topic, key=None, value=keyless, partition=0)
    client.send(pipeline.settings.behaviors_topic, key=stray_key, value=stray, partition=elsewhere)
    client.flush()
    client.close()
    return good, keyless, stray, elsewhere


def test_keyless_and_misplaced_records_are_dead_lettered(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=3)
    good, keyless, stray, elsewhere = produce_with_strays(pipeline)
    run_until_committed(pipeline, len(good) + 2)

    letters = [(value, dict(headers)) for _p, _o, _k, value, headers in read_topic(kafka_bootstrap,
                                                                                   pipeline.settings.dlq_topic)]
    reasons = sorted((h["reason"].decode(), h["source_partition"].decode(), value) for value, h in letters)
    assert reasons == [("missing_key", "0", keyless), ("wrong_partition", str(elsewhere), stray)]
    expected = recompute(pipeline.settings)
    result = compare(pipeline.settings, pipeline.published(), expected.states)
    # The stray event (a repeat of good[1]) would have counted: only the good events did.
    assert result.ok and result.events_published == len(good), result.summary()


def test_replays_and_exports_leave_out_keyless_and_misplaced_records(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=3)
    good, _keyless, _stray, _elsewhere = produce_with_strays(pipeline)
    model, version = VQLModel.load(pipeline.settings.model_path)
    expected = recompute(pipeline.settings).states

    target = pipeline.settings.model_copy(update={"data_dir": tmp_path / "topic",
                                                  "states_topic": pipeline.settings.states_topic + ".replay"})
    report = run_replay_topic(target, model, version, jobs=1, progress=False)
    assert report.dead_letters == {"missing_key": 1, "wrong_partition": 1}, report.dead_letters
    result = compare(pipeline.settings, Pipeline(target).published(), expected)
    assert result.ok and result.events_published == len(good), result.summary()

    # The export leaves out the keyless record and keeps the misplaced one, with its partition
    # and the topic's count: the file replay dead-letters it as the worker does.
    out = tmp_path / "events.parquet"
    written, rejected = export_events(kafka_bootstrap, pipeline.settings.behaviors_topic, out,
                                      pipeline.settings.event_policy(), progress=False)
    assert written == len(good) + 1 and rejected == {"missing_key": 1}
    assert source_partitions([out]) == 3
    files = pipeline.settings.model_copy(update={"data_dir": tmp_path / "files",
                                                 "states_topic": pipeline.settings.states_topic + ".files"})
    report = run_replay_files([out], files, model, version, publish=True, jobs=1, progress=False)
    assert report.dead_letters == {"wrong_partition": 1}, report.dead_letters
    result = compare(pipeline.settings, Pipeline(files).published(), expected)
    assert result.ok and result.events_published == len(good), result.summary()


def test_a_worker_stops_and_refuses_to_start_after_the_partition_count_changed(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    running = pipeline.start_worker()
    try:
        pipeline.wait_until_committed(produce(pipeline, list(generate(
            DemoSpec(users=20, mean_events=5, heavy_users=0, seed=3), int(time.time() * 1000)))))
        raise_partitions(pipeline, 4)
        assert running.wait(120) == 2, pipeline.worker_logs()  # within its metadata refresh (30 s)
    finally:
        pipeline.stop_all()
    assert "now has 4 partitions, this worker started with 2" in pipeline.worker_logs()
    log = refused(pipeline)
    assert "had 2 partitions" in log and "it has 4 now" in log and "docs/operations.md" in log, log
    headers = {dict(h).get(PARTITIONS_HEADER) for *_r, h in read_topic(kafka_bootstrap, pipeline.settings.states_topic)}
    assert headers == {b"2"}  # every state records the count it was placed for


def test_a_worker_refuses_a_states_topic_of_another_model(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    run_until_committed(pipeline, produce(pipeline, list(generate(DemoSpec(users=20, mean_events=5, heavy_users=0,
                                                                           seed=4), int(time.time() * 1000)))))
    before = read_states(pipeline.settings)
    other = tmp_path / "model-b.npz"
    VQLModel(ModelConfig(seed=1)).save(other)
    log = refused(pipeline, model_path=other)
    assert "holds states of model" in log and "docs/replay.md" in log, log
    assert read_states(pipeline.settings) == before  # nothing was published over the old states


def test_the_serving_view_follows_a_partition_count_change(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    topic = pipeline.settings.states_topic
    client = producer(kafka_bootstrap)
    client.send(topic, key=b"u0", value=b"state-0")
    client.flush()
    store = StateStore(tmp_path / "view", topic)
    follower = StateFollower(kafka_bootstrap, store, metadata_max_age_s=0.5)
    try:
        follower.catch_up(30)
        ops = admin(kafka_bootstrap)
        try:
            ops.create_partitions({topic: NewPartitions(3)})
        finally:
            ops.close()
        client.close()
        client = producer(kafka_bootstrap)  # metadata of three partitions
        deadline = time.monotonic() + 30
        while len(client.partitions_for(topic)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        client.send(topic, key=b"u2", value=b"state-2", partition=2)
        client.flush()
        deadline = time.monotonic() + 30
        while store.get("u2") is None and time.monotonic() < deadline:
            follower.step(0.5)
        assert store.get("u2") == b"state-2" and follower.partition_changes == 1
        assert sorted(follower.status.lag) == [0, 1, 2]
    finally:
        client.close()
        follower.stop()
        store.close()
