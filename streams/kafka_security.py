"""How every Kafka client of the project authenticates and encrypts: one place, from the environment.

The worker (its Faust app, its aiokafka consumer and producer), the restore, the replays,
export and import, the serving follower, topic administration, the demo and the tools all
build their clients with the keyword arguments made here, so that a secured cluster (TLS,
SASL PLAIN or SCRAM) needs only the ``VQL_KAFKA_*`` variables below, and no client can be
the one that forgets them (tests/test_kafka_security.py checks every construction).

aiokafka and kafka-python spell the same settings differently: aiokafka takes a ready
:class:`ssl.SSLContext`, kafka-python the certificate files; Faust wants a credentials
object. :class:`KafkaSecurity` makes all three from one typed description.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSecurity(BaseSettings):
    """TLS and SASL settings of the Kafka clients (prefix ``VQL_KAFKA_``); the defaults talk
    PLAINTEXT to the local broker of deploy/kafka/broker.sh."""

    model_config = SettingsConfigDict(env_prefix="VQL_KAFKA_", extra="ignore", frozen=True)

    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)")
    ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates (default: the system's)")
    ssl_certfile: Path | None = Field(None, description="PEM client certificate, for brokers that require one (mTLS)")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile")
    ssl_key_password: SecretStr | None = Field(None, description="password of ssl_keyfile, if encrypted")
    ssl_check_hostname: bool = Field(True, description="check that a broker's certificate names its host")
    sasl_mechanism: SaslMechanism = Field("PLAIN", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str | None = Field(None, description="SASL user (required with SASL_*)")
    sasl_password: SecretStr | None = Field(None, description="SASL password (required with SASL_*)")

    @model_validator(mode="after")
    def _complete(self) -> "KafkaSecurity":
        """Refuse half a configuration at start rather than as an authentication failure later."""
        if self.uses_sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"VQL_KAFKA_SECURITY_PROTOCOL={self.security_protocol} needs "
                             "VQL_KAFKA_SASL_USERNAME and VQL_KAFKA_SASL_PASSWORD")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("VQL_KAFKA_SSL_CERTFILE and VQL_KAFKA_SSL_KEYFILE go together")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"VQL_KAFKA_{name.upper()}={path}: no such file")
        return self

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of aiokafka and Faust clients (None without TLS): the CA file, the
        client certificate if any, and hostname checks unless turned off."""
        if not self.uses_ssl:
            return None
        context = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        if self.ssl_certfile is not None:
            context.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile), self._key_password())
        context.check_hostname = self.ssl_check_hostname
        return context

    def describe(self) -> str:
        """How this client authenticates, for error messages (never the password)."""
        if self.uses_sasl:
            return f"{self.security_protocol}, {self.sasl_mechanism} as {self.sasl_username!r}"
        return self.security_protocol

    def _sasl(self) -> dict[str, Any]:
        if not self.uses_sasl:
            return {}
        return {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password.get_secret_value() if self.sasl_password else None,
        }

    def _key_password(self) -> str | None:
        return self.ssl_key_password.get_secret_value() if self.ssl_key_password else None

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaConsumer / AIOKafkaProducer / AIOKafkaAdminClient."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol, **self._sasl()}
        if self.uses_ssl:
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def kafka_python(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's KafkaConsumer / KafkaProducer / KafkaAdminClient."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol, **self._sasl()}
        if self.uses_ssl:
            kwargs.update(
                ssl_check_hostname=self.ssl_check_hostname,
                ssl_cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                ssl_certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                ssl_keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
                ssl_password=self._key_password(),
            )
        return kwargs

    def faust_credentials(self) -> Any:
        """Faust's ``broker_credentials`` for the app (None for PLAINTEXT)."""
        from faust.auth import SASLCredentials, SSLCredentials  # faust only where the worker runs

        if self.uses_sasl:
            return SASLCredentials(username=self.sasl_username, password=self._sasl()["sasl_plain_password"],
                                   ssl_context=self.ssl_context(), mechanism=self.sasl_mechanism)
        if self.uses_ssl:
            return SSLCredentials(self.ssl_context())
        return None


def aiokafka_security(security: KafkaSecurity | None = None) -> dict[str, Any]:
    """:meth:`KafkaSecurity.aiokafka` of ``security``, or of the environment's settings."""
    return (security or KafkaSecurity()).aiokafka()


def kafka_python_security(security: KafkaSecurity | None = None) -> dict[str, Any]:
    """:meth:`KafkaSecurity.kafka_python` of ``security``, or of the environment's settings."""
    return (security or KafkaSecurity()).kafka_python()


# What the broker said when it refused a client: kafka-python and aiokafka log it (a wrong
# password, an untrusted certificate, TLS against a plaintext port) and then raise only
# "unable to bootstrap". Most telling first.
_REFUSALS = ("authenticationfailed", "authentication failed", "certificate", "handshake failed")


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def connection_failures() -> Iterator[list[str]]:
    """The Kafka clients' connection warnings and errors logged while the block runs."""
    recorder = _Recorder()
    loggers = [logging.getLogger("kafka"), logging.getLogger("aiokafka")]
    for logger in loggers:
        logger.addHandler(recorder)
    try:
        yield recorder.messages
    finally:
        for logger in loggers:
            logger.removeHandler(recorder)


def refusal(messages: list[str]) -> str | None:
    """The last of ``messages`` that says the broker refused the client's credentials or TLS
    handshake, by the most telling sign; None when none does (no broker, say)."""
    for sign in _REFUSALS:
        found = next((m for m in reversed(messages) if sign in m.lower()), None)
        if found is not None:
            return found
    return None


def probe_refusal(bootstrap: str, security: KafkaSecurity | None = None, timeout_s: float = 15.0) -> str | None:
    """Why the broker refuses this client's credentials, asked with aiokafka (None if it does
    not). kafka-python may see only a closed socket after a failed SASL handshake, the
    broker's reason racing the disconnect; aiokafka reads the reason and logs it. Runs in a
    thread of its own, so that a caller inside an event loop can use it too."""
    from aiokafka import AIOKafkaConsumer  # only on this failure path: serving needs no aiokafka
    from aiokafka.errors import KafkaError

    security = security or KafkaSecurity()

    async def connect() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000),
                                    **security.aiokafka())
        try:
            await asyncio.wait_for(consumer.start(), timeout_s)
        except (KafkaError, asyncio.TimeoutError, OSError):
            pass
        finally:
            await consumer.stop()

    with connection_failures() as failures:
        probe = threading.Thread(target=asyncio.run, args=(connect(),), name="vql-kafka-probe", daemon=True)
        probe.start()
        probe.join(timeout_s + 5)
    return refusal(failures)
