"""Worker lifecycle against the real broker: SIGTERM mid-stream is a clean stop (exit 0,
every processed batch committed), and the next worker carries on exactly."""

from __future__ import annotations

import signal
import time

import pytest

from harness import Pipeline, compare, recompute
from test_pipeline_integration import produce
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.state_store import PartitionStore, partition_store_path
from vql.model.artifact import load_artifact

pytestmark = pytest.mark.integration


def test_sigterm_mid_stream_stops_cleanly_and_commits_what_it_processed(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    settings = pipeline.settings
    records = list(generate(DemoSpec(users=300, mean_events=40, heavy_users=1, heavy_events=3000, seed=9),
                            int(time.time() * 1000)))
    try:
        worker = pipeline.start_worker()
        total = produce(pipeline, records)
        pipeline.wait_until_committed(1, poll_s=0.1)
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.wait(60) == 0, pipeline.worker_logs()
        stop_s = time.monotonic() - started
        pipeline.workers.clear()

        # Everything the stores say was processed is committed: nothing will be redelivered.
        version = load_artifact(settings.model_path).version
        processed = 0
        for partition in range(settings.partitions):
            store = PartitionStore(partition_store_path(settings.data_dir, version, settings.behaviors_topic, partition),
                                   version)
            processed += (store.processed_offset() or -1) + 1
            store.close()
        committed = pipeline.committed()
        print(f"SIGTERM: stopped in {stop_s:.1f} s, {committed} of {total} records committed, "
              f"{processed} processed")
        assert committed == processed

        pipeline.start_worker()
        pipeline.wait_until_committed(total)
        pipeline.stop_all()
        result = compare(settings, pipeline.published(), recompute(settings).states)
        print("after restart:", result.summary())
        assert result.ok, result.summary()
    finally:
        pipeline.stop_all()
