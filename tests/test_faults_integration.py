"""Fault scenarios against the real broker, each followed by the verifier (tests/harness.py):
every user's published state is recomputed offline from the behaviors topic and compared.

Run alone with `pytest -m faults`."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest

from harness import Pipeline, compare, recompute
from kafka_broker import BROKER_SH
from test_pipeline_integration import produce
from vql.streams.demo_events import DemoSpec, generate

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def verify(pipeline: Pipeline, label: str) -> None:
    result = compare(pipeline.settings, pipeline.published(), recompute(pipeline.settings).states)
    print(f"{label}: {result.summary()}")
    assert result.ok, result.summary()


def chunks(records: list, parts: int) -> list[list]:
    size = -(-len(records) // parts)
    return [records[i:i + size] for i in range(0, len(records), size)]


def test_kill_nine_at_random_points_over_several_rounds(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=3)
    records = list(generate(DemoSpec(users=300, mean_events=30, heavy_users=1, heavy_events=3000, seed=21),
                            int(time.time() * 1000)))
    rng = random.Random(21)
    total = 0
    try:
        for part in chunks(records, 4):
            worker = pipeline.start_worker()
            total += produce(pipeline, part)
            pipeline.wait_until_committed(max(1, total - len(part)), poll_s=0.1)
            time.sleep(rng.uniform(0.5, 4.0))  # a random point in the stream
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        pipeline.workers.clear()
        pipeline.start_worker()
        pipeline.wait_until_committed(total)
        pipeline.stop_all()
        verify(pipeline, "kill -9, 4 rounds")
    finally:
        pipeline.stop_all()


def test_scale_out_to_three_workers_then_kill_one(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=6)
    records = list(generate(DemoSpec(users=400, mean_events=30, heavy_users=1, heavy_events=3000, seed=22),
                            int(time.time() * 1000)))
    first, second, third = chunks(records, 3)
    try:
        pipeline.start_worker()
        total = produce(pipeline, first)
        pipeline.start_worker()
        pipeline.start_worker()
        total += produce(pipeline, second)
        victim = pipeline.workers[1]
        time.sleep(2.0)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        total += produce(pipeline, third)
        pipeline.wait_until_committed(total, timeout_s=240)
        pipeline.stop_all()
        verify(pipeline, "scale 1 -> 3 workers, kill one")
    finally:
        pipeline.stop_all()


def test_partitions_move_to_another_host_with_their_state(kafka_bootstrap, tmp_path):
    """Workers on two "hosts" (separate data dirs): host a's worker dies for good, and its
    partitions go to host b, whose stores start empty and are restored from the changelog."""
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=4)
    records = list(generate(DemoSpec(users=300, mean_events=30, heavy_users=1, heavy_events=3000, seed=24),
                            int(time.time() * 1000)))
    first, second = chunks(records, 2)
    try:
        doomed = pipeline.start_worker(host="a")
        total = produce(pipeline, first)
        pipeline.wait_until_committed(total)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        pipeline.workers.clear()
        pipeline.start_worker(host="b")
        total += produce(pipeline, second)
        pipeline.wait_until_committed(total)
        pipeline.stop_all()
        restored = [line for line in (pipeline.settings.data_dir / "worker-1.log").read_text().splitlines() if "restored" in line]
        print("\n".join(restored))
        assert sum(int(line.split("restored ")[1].split()[0]) for line in restored) > 0
        verify(pipeline, "partitions moved to another host (changelog restore)")
    finally:
        pipeline.stop_all()


def test_a_standby_replica_takes_over_with_only_the_changelog_tail(kafka_bootstrap, tmp_path):
    """Host b joins host a: it takes half the partitions and keeps warm copies of a's half
    (standby); when a dies, b restores only what a published since b's last catch-up."""
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=4)
    records = list(generate(DemoSpec(users=300, mean_events=30, heavy_users=1, heavy_events=3000, seed=25),
                            int(time.time() * 1000)))
    first, second = chunks(records, 2)
    try:
        doomed = pipeline.start_worker(host="a", standby_interval_s=1.0)
        total = produce(pipeline, first)
        pipeline.wait_until_committed(total)  # a alone has all the state
        pipeline.start_worker(host="b", standby_interval_s=1.0)  # takes half, keeps a's half warm
        b_log = pipeline.settings.data_dir / "worker-1.log"
        deadline = time.monotonic() + 60
        while "(standby)" not in b_log.read_text():  # b has caught up a's partitions once
            assert time.monotonic() < deadline, pipeline.worker_logs()
            time.sleep(0.5)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        total += produce(pipeline, second)
        pipeline.wait_until_committed(total)
        pipeline.stop_all()
        log = b_log.read_text().splitlines()
        restores = [line for line in log if "restored" in line]
        print("\n".join(restores))
        # b kept a's partitions warm, and taking them over read only the tail
        assert any("(standby)" in line for line in restores)
        takeovers = [int(re.search(r"from offset (\d+)", line).group(1)) for line in restores if "(assigned)" in line]
        assert any(start > 0 for start in takeovers), restores
        verify(pipeline, "standby replica takes over (changelog tail only)")
    finally:
        pipeline.stop_all()


def test_broker_stop_and_restart_mid_stream(kafka_bootstrap, tmp_path):
    if os.environ.get("KAFKA_BOOTSTRAP"):
        pytest.skip("the broker is external: this test restarts the local jar broker")
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=3)
    records = list(generate(DemoSpec(users=300, mean_events=30, heavy_users=1, heavy_events=3000, seed=23),
                            int(time.time() * 1000)))
    first, second = chunks(records, 2)
    try:
        pipeline.start_worker()
        total = produce(pipeline, first)
        pipeline.wait_until_committed(1, poll_s=0.1)
        subprocess.run(["bash", str(BROKER_SH), "stop"], check=True, capture_output=True)
        time.sleep(5.0)  # the worker runs without a broker for a while
        subprocess.run(["bash", str(BROKER_SH), "start"], check=True, capture_output=True)
        total += produce(pipeline, second)
        # A worker that gave up during the outage exits non-zero; a supervisor restarts it.
        deadline = time.monotonic() + 240
        while pipeline.committed() < total:
            assert time.monotonic() < deadline, pipeline.worker_logs()
            if all(w.poll() is not None for w in pipeline.workers):
                pipeline.workers.clear()
                pipeline.start_worker()
            time.sleep(0.5)
        restarts = len(list(pipeline.settings.data_dir.glob("worker-*.log"))) - 1
        pipeline.stop_all()
        verify(pipeline, f"broker stopped 5 s and restarted (worker restarts: {restarts})")
    finally:
        subprocess.run(["bash", str(BROKER_SH), "start"], capture_output=True)
        pipeline.stop_all()
