"""Kafka security settings (streams/kafka_security.py), and that every Kafka client in the
source tree is built with them: a client added without them fails here, not on a secured
cluster."""

from __future__ import annotations

import ast
import logging
import ssl
import subprocess
from pathlib import Path

import pytest
from faust.auth import SASLCredentials, SSLCredentials
from pydantic import ValidationError

from vql.streams.kafka_security import KafkaSecurity, connection_failures, refusal

ROOT = Path(__file__).resolve().parents[1]
AIOKAFKA_CLIENTS = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"}
KAFKA_PYTHON_CLIENTS = {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}
SECURITY_CALLS = {"aiokafka": {"aiokafka_security", "aiokafka"},
                  "kafka-python": {"kafka_python_security", "kafka_python"}}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _unsecured_clients(source: str, path: str) -> list[str]:
    """Constructions of a Kafka client (or a Faust app) in ``source`` that lack the security
    keyword arguments: ``**aiokafka_security()`` / ``**kafka_python_security()`` (or the
    methods of a KafkaSecurity), and ``broker_credentials=`` for a Faust app."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name in AIOKAFKA_CLIENTS or name in KAFKA_PYTHON_CLIENTS:
            wanted = SECURITY_CALLS["aiokafka" if name in AIOKAFKA_CLIENTS else "kafka-python"]
            spread = [kw.value for kw in node.keywords if kw.arg is None]
            if not any(isinstance(v, ast.Call) and _name(v.func) in wanted for v in spread):
                found.append(f"{path}:{node.lineno} {name}")
        elif isinstance(node.func, ast.Attribute) and node.func.attr == "App" and _name(node.func.value) == "faust":
            if not any(kw.arg == "broker_credentials" for kw in node.keywords):
                found.append(f"{path}:{node.lineno} faust.App")
    return found


def _sources() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in tracked.stdout.split()]


def test_every_kafka_client_in_the_tree_takes_the_security_settings():
    sources = _sources()
    assert any(p.name == "consumer.py" for p in sources)
    unsecured = [hit for p in sources for hit in _unsecured_clients(p.read_text(), str(p.relative_to(ROOT)))]
    assert unsecured == [], "Kafka clients built without streams/kafka_security.py's settings: " + ", ".join(unsecured)


def test_the_checker_sees_a_client_without_them():
    source = ("from kafka import KafkaConsumer\nimport aiokafka, faust\n"
              "a = KafkaConsumer(bootstrap_servers='x', **options)\n"
              "b = aiokafka.AIOKafkaProducer(bootstrap_servers='x', **kafka_python_security())\n"
              "c = faust.App('id', broker='kafka://x')\n"
              "d = KafkaConsumer(bootstrap_servers='x', **kafka_python_security())\n")
    assert _unsecured_clients(source, "f.py") == ["f.py:3 KafkaConsumer", "f.py:4 AIOKafkaProducer", "f.py:5 faust.App"]


def test_plaintext_by_default(monkeypatch):
    for var in ("SECURITY_PROTOCOL", "SASL_USERNAME", "SASL_PASSWORD", "SSL_CAFILE"):
        monkeypatch.delenv(f"VQL_KAFKA_{var}", raising=False)
    security = KafkaSecurity()
    assert security.aiokafka() == {"security_protocol": "PLAINTEXT"}
    assert security.kafka_python() == {"security_protocol": "PLAINTEXT"}
    assert security.faust_credentials() is None


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory) -> Path:
    """A self-signed certificate to stand for a CA file."""
    folder = tmp_path_factory.mktemp("ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vql-test",
                    "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.pem")], check=True, capture_output=True)
    return folder / "ca.pem"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_from_the_environment(monkeypatch, ca_file, mechanism):
    monkeypatch.setenv("VQL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("VQL_KAFKA_SSL_CAFILE", str(ca_file))
    monkeypatch.setenv("VQL_KAFKA_SASL_MECHANISM", mechanism)
    monkeypatch.setenv("VQL_KAFKA_SASL_USERNAME", "alice")
    monkeypatch.setenv("VQL_KAFKA_SASL_PASSWORD", "s3cret")
    security = KafkaSecurity()
    aio = security.aiokafka()
    assert isinstance(aio.pop("ssl_context"), ssl.SSLContext)
    assert aio == {"security_protocol": "SASL_SSL", "sasl_mechanism": mechanism,
                   "sasl_plain_username": "alice", "sasl_plain_password": "s3cret"}
    kp = security.kafka_python()
    assert kp["ssl_cafile"] == str(ca_file) and kp["ssl_check_hostname"] is True
    assert kp["sasl_mechanism"] == mechanism and kp["sasl_plain_password"] == "s3cret"
    credentials = security.faust_credentials()
    assert isinstance(credentials, SASLCredentials)
    assert credentials.mechanism.value == mechanism and credentials.ssl_context is not None
    assert "s3cret" not in repr(security)


def test_ssl_only(ca_file):
    security = KafkaSecurity(security_protocol="SSL", ssl_cafile=ca_file)
    assert "sasl_mechanism" not in security.kafka_python()
    assert isinstance(security.faust_credentials(), SSLCredentials)


@pytest.mark.parametrize("settings, message", [
    ({"security_protocol": "SASL_PLAINTEXT"}, "VQL_KAFKA_SASL_USERNAME"),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}, "no such file"),
    ({"security_protocol": "SSL", "ssl_certfile": "/nonexistent/c.pem"}, "go together"),
    ({"security_protocol": "TLS"}, "security_protocol"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "a", "sasl_password": "b"},
     "sasl_mechanism"),
])
def test_incomplete_or_unknown_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        KafkaSecurity(**settings)


def test_a_refusal_is_told_from_an_absent_broker():
    logged = ["Bootstrap connection to bootstrap-0 failed: KafkaConnectionError: socket disconnected",
              "<KafkaSSLTransport [127.0.0.1:9094<-1]>: Abort (KafkaConnectionError: socket disconnected)",
              "Bootstrap connection to bootstrap-0 failed: [Error 58] SaslAuthenticationFailedError: "
              "Authentication failed: Invalid username or password (backoff 0.44 secs)",
              "<KafkaSSLTransport [127.0.0.1:9094<-2]>: socket disconnected"]
    assert "Invalid username or password" in refusal(logged)
    assert "CERTIFICATE_VERIFY_FAILED" in refusal(["Connection failed: KafkaConnectionError: Handshake failed: "
                                                    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"])
    assert refusal(logged[:2] + ["Connection failed: KafkaConnectionError: 111 ECONNREFUSED"]) is None


def test_connection_failures_collects_the_clients_warnings():
    with connection_failures() as seen:
        logging.getLogger("kafka.net.manager").warning("Bootstrap connection to %s failed", "bootstrap-0")
        logging.getLogger("aiokafka.conn").error("Unable connect to %r", "127.0.0.1:9094")
        logging.getLogger("kafka.net.manager").info("chatter")
    logging.getLogger("kafka.net.manager").warning("after the block")
    assert seen == ["Bootstrap connection to bootstrap-0 failed", "Unable connect to '127.0.0.1:9094'"]
