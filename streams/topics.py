"""Kafka admin and plain-client helpers (kafka-python) shared by the CLI, demo and tests."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from tqdm import tqdm

from vql.streams.durability import cluster_durability, warn_under_replicated
from vql.streams.kafka_security import (KafkaSecurity, connection_failures, kafka_python_security, probe_refusal,
                                        refusal)
from vql.streams.settings import Settings


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at the configured address."""


class CredentialsRefused(BrokerUnavailable):
    """A broker answered but refused this client's SASL credentials or TLS handshake."""


@contextmanager
def refusals_explained(bootstrap: str) -> Iterator[None]:
    """Within: a client that cannot connect because the broker refused its credentials or
    TLS handshake raises :class:`CredentialsRefused` with the broker's reason, instead of
    kafka-python's "unable to bootstrap" (the reason, when it has one, is only logged)."""
    security = KafkaSecurity()
    with connection_failures() as failures:
        try:
            yield
        except KafkaError as exc:
            reason = refusal(failures)
            if reason is None and security.security_protocol != "PLAINTEXT":
                reason = probe_refusal(bootstrap, security)
            if reason is None:
                raise
            raise CredentialsRefused(
                f"the Kafka broker at {bootstrap} refused this client ({security.describe()}): {reason} "
                "(check the VQL_KAFKA_* settings: docs/security.md)") from exc


def admin(bootstrap: str) -> KafkaAdminClient:
    try:
        with refusals_explained(bootstrap):
            return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="vql-admin", request_timeout_ms=15000,
                                    **kafka_python_security())
    except KafkaError as exc:
        raise BrokerUnavailable(
            f"no Kafka broker answers at {bootstrap} (start one: bash deploy/kafka/broker.sh start)"
        ) from exc


class TopicLayoutError(RuntimeError):
    """Existing topics do not have the layout the pipeline needs."""


def ensure_topics(settings: Settings) -> None:
    """Create the pipeline's topics with explicit partitions and cleanup policies if missing,
    and check that input and states are co-partitioned (a user's state is published to the
    partition its events come from)."""
    wanted = {
        settings.behaviors_topic: {"cleanup.policy": "delete", "retention.ms": "-1"},
        settings.states_topic: {"cleanup.policy": "compact", "max.message.bytes": str(settings.max_state_bytes)},
        settings.dlq_topic: {"cleanup.policy": "delete", "retention.ms": str(int(settings.dlq_retention_s * 1000)),
                             "max.message.bytes": str(settings.max_dead_letter_bytes)},
    }
    client = admin(settings.kafka_bootstrap)
    try:
        existing = set(client.list_topics())
        # Capped at the broker count, with a WARNING (streams/durability.py).
        durability = cluster_durability(client, settings.replication, settings.min_insync_replicas)
        new = [
            NewTopic(name, settings.partitions, durability.replication, topic_configs=config | durability.topic_configs())
            for name, config in wanted.items()
            if name not in existing
        ]
        if new:
            try:
                client.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        described = partition_counts(client, list(wanted))
        warn_under_replicated(client, list(wanted), durability)
    finally:
        client.close()
    inputs, states = described.get(settings.behaviors_topic), described.get(settings.states_topic)
    if inputs != states:
        raise TopicLayoutError(
            f"{settings.behaviors_topic} has {inputs} partitions but {settings.states_topic} has {states}: "
            "states are co-partitioned with their events, so the counts must be equal"
        )


def partition_counts(client: KafkaAdminClient, topics: list[str], timeout_s: float = 30.0) -> dict[str, int]:
    """Each topic's partition count. A topic created a moment ago can be described with no
    partitions until its metadata reaches the broker's cache (seen in CI on a busy machine),
    so wait, up to ``timeout_s``, until every topic shows some."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = {t["name"]: len(t["partitions"]) for t in client.describe_topics(topics)}
        if all(counts.get(topic) for topic in topics) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def topic_partitions(bootstrap: str, topic: str) -> int:
    """The partition count of ``topic`` (0 when it does not exist)."""
    client = reader(bootstrap)
    try:
        return len(client.partitions_for_topic(topic) or ())
    finally:
        client.close()


def producer(bootstrap: str) -> KafkaProducer:
    """A producer tuned for throughput with acks from all in-sync replicas."""
    with refusals_explained(bootstrap):
        return KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=20,
            batch_size=256 * 1024,
            compression_type=None,
            max_request_size=16 * 1024 * 1024,
            **kafka_python_security(),
        )


def produce_all(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]],
                total: int | None = None, desc: str | None = None) -> int:
    """Send (key, value) records to ``topic`` with :func:`producer`, wait until Kafka has
    them all, and return the count; with ``desc``, a progress bar of that name."""
    client = producer(bootstrap)
    sent = 0
    try:
        with tqdm(total=total, desc=desc, unit="ev", unit_scale=True, disable=desc is None, miniters=5000) as bar:
            for key, value in records:
                client.send(topic, key=key, value=value)
                sent += 1
                bar.update()
        client.flush()
    finally:
        client.close()
    return sent


def reader(bootstrap: str, **options) -> KafkaConsumer:
    """A group-less consumer that reads topics from the beginning and commits nothing: the
    readers of this project (tools, tests, ranking backends' state views) track their own
    positions. Fetch limits fit the largest records here (states, dead letters). They read
    committed records only: states and dead letters are published in transactions, and those
    of a worker fenced off its partition are aborted (streams/fencing.py)."""
    with refusals_explained(bootstrap):
        return KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            **kafka_python_security(),
            **{"isolation_level": "read_committed", **options},
        )


def read_topic(bootstrap: str, topic: str, idle_s: float = 2.0, with_timestamps: bool = False) -> Iterator[tuple]:
    """Every record now in ``topic`` as (partition, offset, key, value, headers), then stop;
    with ``with_timestamps``, the record's timestamp (ms) is a sixth element."""
    consumer = reader(bootstrap, consumer_timeout_ms=int(idle_s * 1000))
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if end[tp] > 0}
        while remaining:
            batch = consumer.poll(timeout_ms=int(idle_s * 1000), max_records=10000)
            if not batch:
                break
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset < end[tp]:
                        record = (tp.partition, m.offset, m.key, m.value, tuple(m.headers or ()))
                        yield record + (m.timestamp,) if with_timestamps else record
                if consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
    finally:
        consumer.close()


class CompactedView:
    """A live local view of a compacted topic: the latest value of every key, kept current
    by :meth:`refresh`, which reads only what arrived since the last call."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.values: dict[bytes, bytes] = {}
        self._consumer = reader(bootstrap)
        partitions = self._consumer.partitions_for_topic(topic) or set()
        self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])

    def refresh(self, timeout_s: float = 1.0) -> list[bytes]:
        """Read what is new; return the keys that changed."""
        changed = []
        for _tp, messages in self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=50_000).items():
            for m in messages:
                if m.key is None:
                    continue
                if m.value is None:
                    self.values.pop(m.key, None)
                else:
                    self.values[m.key] = m.value
                changed.append(m.key)
        return changed

    def close(self) -> None:
        self._consumer.close()


def latest_by_key(records: Iterable[tuple[int, int, bytes | None, bytes | None, tuple]]) -> dict[bytes, bytes]:
    """The compacted view of a topic: the last value of every key (tombstones remove it)."""
    view: dict[bytes, bytes] = {}
    for _partition, _offset, key, value, _headers in records:
        if key is None:
            continue
        if value is None:
            view.pop(key, None)
        else:
            view[key] = value
    return view

