"""Durability on the single local broker: topics created with one replica and
min.insync.replicas 1, and the worker says so at start (streams/durability.py)."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka.admin import ConfigResource, ConfigResourceType

from harness import Pipeline
from vql.streams.settings import Settings
from vql.streams.topics import admin, ensure_topics

pytestmark = pytest.mark.integration


def test_topics_on_one_broker_are_capped_and_the_worker_warns(kafka_bootstrap, tmp_path, caplog):
    settings = Settings(kafka_bootstrap=kafka_bootstrap).scoped(f"durable-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings)
    assert any(r.levelname == "WARNING" and "VQL_REPLICATION=3" in r.getMessage()
               and "VQL_MIN_INSYNC_REPLICAS=2" in r.getMessage() for r in caplog.records), caplog.text
    topics = [settings.behaviors_topic, settings.states_topic, settings.dlq_topic]
    client = admin(kafka_bootstrap)
    try:
        replicas = {t["name"]: {len(p["replica_nodes"]) for p in t["partitions"]} for t in client.describe_topics(topics)}
        configs = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t, configs=["min.insync.replicas"])
                                           for t in topics])
    finally:
        client.close()
    assert replicas == {t: {1} for t in topics}
    for topic in topics:
        entry = configs["topic"][topic]["min.insync.replicas"]
        assert (entry["value"], entry["config_source"]) == ("1", "DYNAMIC_TOPIC_CONFIG"), entry

    # At a worker's start, loudly.
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=1)
    log = pipeline.settings.data_dir / "worker-0.log"
    try:
        pipeline.start_worker()
        deadline = time.monotonic() + 120
        while "VQL_MIN_INSYNC_REPLICAS=2" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        pipeline.stop_all()
    line = next((line for line in log.read_text().splitlines() if "VQL_REPLICATION=3" in line), log.read_text())
    assert "WARNING" in line and "replication factor 1" in line and "min.insync.replicas 1" in line, line
