"""The whole worker path over SASL_SSL: a second local broker (tests/secure_broker.py) with
TLS and PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 users; every client (topic admin, producer,
the worker's consumer, producer and restore, the verifier's reader, the serving follower)
connects with the VQL_KAFKA_* settings alone. A wrong password stops the worker with the
broker's reason, not a hang."""

from __future__ import annotations

import os
import time

import pytest

from harness import Pipeline, compare, recompute
from secure_broker import SecureBroker
from test_pipeline_integration import produce
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.serving import RankingClient
from vql.streams.demo import start_worker
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    """One broker for the module (a start costs seconds); stopped at the end."""
    try:
        broker = SecureBroker.start(tmp_path_factory.mktemp("secure-broker"))
    except RuntimeError as exc:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"no SASL_SSL broker on CI: {exc}", pytrace=False)
        pytest.skip(f"no SASL_SSL broker: {exc}")
    yield broker
    broker.stop()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_the_worker_path_runs_over_sasl_ssl(secure_broker, mechanism, monkeypatch, tmp_path):
    for name, value in secure_broker.client_env(mechanism).items():
        monkeypatch.setenv(name, value)  # this process's clients, and the worker it starts
    pipeline = Pipeline.create(secure_broker.bootstrap, tmp_path, partitions=2)
    settings = pipeline.settings
    records = list(generate(DemoSpec(users=40, mean_events=6, heavy_users=1, heavy_events=300, seed=21),
                            int(time.time() * 1000)))
    try:
        pipeline.start_worker()
        total = produce(pipeline, records)
        pipeline.wait_until_committed(total)
    finally:
        pipeline.stop_all()

    expected = recompute(settings).states
    client = RankingClient.connect(settings.kafka_bootstrap, settings.states_topic, settings.model_path,
                                   tmp_path / "view", restore_timeout_s=60)
    try:
        served = {user: client.state(user) for user in expected}
        assert client.freshness().lag == 0
    finally:
        client.close()
    result = compare(settings, served, expected)
    assert result.ok and result.events_published == total, result.summary()


def test_a_wrong_password_stops_the_worker_with_the_brokers_reason(secure_broker, monkeypatch, tmp_path):
    for name, value in secure_broker.client_env("SCRAM-SHA-512", password="not-the-password").items():
        monkeypatch.setenv(name, value)
    model_path = tmp_path / "model.npz"
    VQLModel(ModelConfig()).save(model_path)
    settings = Settings(kafka_bootstrap=secure_broker.bootstrap, data_dir=tmp_path, model_path=model_path,
                        web_port=0).scoped("wrong-password")
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    try:
        code = worker.wait(180)  # kafka-python gives up bootstrapping after 30 s
    finally:
        worker.kill()
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert "refused this client (SASL_SSL, SCRAM-SHA-512 as 'vql-test')" in text
    assert "Authentication failed" in text and "not-the-password" not in text
