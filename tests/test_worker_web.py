"""The worker's web port: loopback by default, and nothing on it but /health, /metrics and a
bare index (Faust's router, table, graph and statistics views are off)."""

from __future__ import annotations

import pytest
from faust.auth import SASLCredentials

from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.decode import EventPolicy
from vql.streams.app import create_app
from vql.streams.processor import BatchProcessor
from vql.streams.settings import Settings


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.delenv("VQL_WEB_HOST", raising=False)
    processor = BatchProcessor(VQLModel(ModelConfig(item_buckets=256, category_buckets=16)), "v" * 16, tmp_path,
                               "behaviors", EventPolicy())
    yield create_app(Settings(data_dir=tmp_path), processor)
    processor.close()


def test_the_web_port_binds_loopback_by_default(app):
    assert app.conf.web_bind == "127.0.0.1"


def test_faust_introspection_views_are_off(app):
    served = {bp if isinstance(bp, str) else bp.name for _prefix, bp in app.web._enabled_blueprints()}
    assert served == {"faust.web.apps.production_index:blueprint"}


def test_the_faust_app_takes_the_kafka_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("VQL_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("VQL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("VQL_KAFKA_SASL_USERNAME", "worker")
    monkeypatch.setenv("VQL_KAFKA_SASL_PASSWORD", "s3cret")
    processor = BatchProcessor(VQLModel(ModelConfig(item_buckets=256, category_buckets=16)), "v" * 16, tmp_path,
                               "behaviors", EventPolicy())
    try:
        credentials = create_app(Settings(data_dir=tmp_path), processor).conf.broker_credentials
    finally:
        processor.close()
    assert isinstance(credentials, SASLCredentials)
    assert (credentials.username, credentials.mechanism.value) == ("worker", "SCRAM-SHA-256")
