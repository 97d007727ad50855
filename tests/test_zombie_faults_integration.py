"""A worker dropped from the group must not overwrite its successor's states when it wakes.

Host a's worker is frozen (SIGSTOP) in the middle of its work, past its session timeout; host
b's worker takes its partitions over, restores them and processes everything since; then
host a's worker is thawed (SIGCONT), with batches fetched, processed or in publication that
it still believes its own. Its late, older states must not reach readers: the states topic,
read as every reader reads it, and a store restored from it, must both equal the offline
recomputation (tests/harness.py): 0 users differing, 0 events lost, 0 doubled.

Run alone with `pytest -m faults`."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest

from harness import Pipeline, compare, recompute
from vql.model.artifact import load_artifact
from test_pipeline_integration import produce
from vql.schemas.user_state import UserState
from vql.streams.changelog import restore_partition
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.state_store import PartitionStore

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def restored_from_topic(pipeline: Pipeline, tmp_path) -> dict[str, UserState]:
    """Every partition of the states topic restored into a new store, as a new host would."""
    settings = pipeline.settings
    version = recompute_version(pipeline)
    states: dict[str, UserState] = {}
    for partition in range(settings.partitions):
        store = PartitionStore(tmp_path / f"restored-{uuid.uuid4().hex[:6]}-{partition}", version)
        try:
            asyncio.run(restore_partition(store, settings.kafka_bootstrap, settings.states_topic, partition, version))
            states.update((s.user_id, s) for s in store.states())
        finally:
            store.close()
    return states


def recompute_version(pipeline: Pipeline) -> str:
    return load_artifact(pipeline.settings.model_path).version


def check(pipeline: Pipeline, published: dict[str, UserState], label: str) -> None:
    result = compare(pipeline.settings, published, recompute(pipeline.settings).states)
    print(f"{label}: {result.summary()}")
    assert result.ok, result.summary()
    assert result.events_published == result.events_expected, result.summary()


def test_a_worker_thawed_after_losing_its_partitions_cannot_overwrite_the_new_owner(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    records = list(generate(DemoSpec(users=400, mean_events=120, heavy_users=1, heavy_events=5000, seed=41),
                            int(time.time() * 1000)))
    first, second, last = records[:5000], records[5000:40000], records[40000:]
    # Small batches: a's work on the second part lasts seconds, so that it is frozen with
    # batches fetched, in processing and in publication.
    zombie = pipeline.start_worker(host="a", batch_size=100)
    try:
        total = produce(pipeline, first)
        pipeline.wait_until_committed(total)
        total += produce(pipeline, second)
        pipeline.wait_until_committed(total - len(second) + 1, poll_s=0.05)  # a is in the middle of it
        assert pipeline.committed() < total, "a finished before it could be frozen: give it more work"
        zombie.send_signal(signal.SIGSTOP)
        try:
            pipeline.start_worker(host="b")  # gets the partitions once a's session times out
            total += produce(pipeline, last)
            pipeline.wait_until_committed(total, timeout_s=240)  # b has processed everything
        finally:
            zombie.send_signal(signal.SIGCONT)
        zombie_log = pipeline.settings.data_dir / "worker-0.log"
        seen = len(zombie_log.read_text())
        deadline = time.monotonic() + 90
        # Until the thawed worker has noticed that the group moved on and rejoined it.
        while "Joined group" not in zombie_log.read_text()[seen:]:
            assert time.monotonic() < deadline, pipeline.worker_logs()
            assert zombie.poll() is None, f"the thawed worker exited\n{pipeline.worker_logs()}"
            time.sleep(0.5)
        pipeline.wait_until_committed(total, timeout_s=240)
        assert zombie.poll() is None, f"the thawed worker exited\n{pipeline.worker_logs()}"
        pipeline.stop_all()
        print(pipeline.worker_logs()[-2500:])
        check(pipeline, pipeline.published(), "zombie thawed: the states topic")
        check(pipeline, restored_from_topic(pipeline, tmp_path), "zombie thawed: a store restored from the topic")
    finally:
        zombie.send_signal(signal.SIGCONT)
        pipeline.stop_all()
