"""Configurations the worker gives the topics it creates, read back from the real broker."""

from __future__ import annotations

import uuid

import pytest
from kafka.admin import ConfigResource, ConfigResourceType

from vql.streams.settings import Settings
from vql.streams.topics import admin, ensure_topics

pytestmark = pytest.mark.integration


def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    client = admin(bootstrap)
    try:
        described = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        client.close()
    return {name: entry["value"] for name, entry in described["topic"][topic].items()}


def test_the_dlq_keeps_dead_letters_for_a_bounded_time(kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, data_dir=tmp_path, partitions=1).scoped(
        f"dlq-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings)
    assert topic_config(kafka_bootstrap, settings.dlq_topic)["retention.ms"] == str(14 * 24 * 3600 * 1000)

    shorter = settings.scoped(f"dlq-{uuid.uuid4().hex[:8]}").model_copy(update={"dlq_retention_s": 3600.0})
    ensure_topics(shorter)
    assert topic_config(kafka_bootstrap, shorter.dlq_topic)["retention.ms"] == "3600000"
