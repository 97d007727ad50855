"""The Faust worker: `behaviors` -> micro-batches -> states in RocksDB -> `user-states`.

The agent only moves records between Kafka and :class:`BatchProcessor`. Its order of work
per micro-batch is what makes at-least-once delivery safe (design/pipeline.md):

1. process: decode, encode, fold into states (nothing durable yet);
2. publish the changed states and dead letters, and wait until Kafka has them;
3. write states + processed offset in one RocksDB WriteBatch per partition;
4. ack the input records, in offset order, so that Faust may commit them.

A crash between any two steps redelivers the batch; per-user applied offsets make the
second application a no-op, and re-publishing a state to a compacted topic is harmless.
Batches come from ``noack_take``: Faust's ``take`` acks a batch even when its processing
raised, which would commit records that were never applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import faust
import mode
import numpy as np
from faust.sensors.prometheus import setup_prometheus_sensors
from prometheus_client import CollectorRegistry

from vql.schemas.user_state import encode_user_state
from vql.streams.metrics import WorkerMetrics
from vql.streams.processor import BatchProcessor, BatchResult, DeadLetter, RawRecord
from vql.streams.settings import Settings

log = logging.getLogger("vql.worker")


def dead_letter(letter: DeadLetter, source_topic: str, max_bytes: int) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The DLQ contract: the original value and headers with a machine-readable reason and
    where the original record came from. A value over ``max_bytes`` is cut (and the headers
    say so), so that no record can make the dead-letter publish itself fail."""
    value = letter.record.value
    headers = [
        ("reason", letter.rejection.reason.value.encode()),
        ("detail", letter.rejection.detail.encode("utf-8", "replace")),
        ("source_topic", source_topic.encode()),
        ("source_partition", str(letter.record.partition).encode()),
        ("source_offset", str(letter.record.offset).encode()),
    ]
    if value is not None and len(value) > max_bytes:
        headers += [("truncated", b"1"), ("original_bytes", str(len(value)).encode())]
        value = value[:max_bytes]
    return value, headers


def create_app(settings: Settings, processor: BatchProcessor) -> faust.App:
    """The Faust app with its topics declared and the agent wired to ``processor``."""
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,  # Faust validates it even when the web is off
        web_bind=settings.web_host,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        broker_commit_interval=settings.commit_interval_s,
        # Room for a dead letter of max_dead_letter_bytes plus its headers.
        producer_max_request_size=settings.max_dead_letter_bytes + 1024 * 1024,
    )
    # Topics are created (partitions, cleanup policies) by ensure_topics before the app
    # starts; Faust only subscribes to the input, as raw bytes: decoding is ours, so that a
    # bad record becomes a dead letter rather than a codec error inside Faust.
    behaviors = app.topic(settings.behaviors_topic, key_serializer="raw", value_serializer="raw")
    registry = CollectorRegistry()
    setup_prometheus_sensors(app, "/metrics", registry, name_prefix="faust")
    cfg = processor.model.config
    metrics = WorkerMetrics(registry, cfg.groups, cfg.codes)
    health = {"status": "starting"}

    @app.page("/health")
    async def _health(web, request):  # noqa: ANN001 - Faust's view signature
        """starting (no batch consumed yet), recovering (rebalancing), ready: 200 only when ready."""
        status = "recovering" if app.rebalancing else health["status"]
        return web.json({"status": status, "model_version": processor.model_version},
                        status=200 if status == "ready" else 503)

    def observe(result: BatchResult, records: list[RawRecord], events: list, process_s: float, publish_s: float) -> None:
        metrics.batch_records.observe(len(records))
        metrics.records.labels(outcome="applied").inc(result.applied)
        metrics.records.labels(outcome="duplicate").inc(result.duplicates)
        metrics.records.labels(outcome="dead_letter").inc(len(result.dead_letters))
        for letter in result.dead_letters:
            metrics.dead_letters.labels(reason=letter.rejection.reason.value).inc()
        metrics.states_published.inc(len(result.states))
        metrics.stage_seconds.labels(stage="process").observe(process_s)
        metrics.stage_seconds.labels(stage="encode").observe(result.encode_s)
        metrics.stage_seconds.labels(stage="publish").observe(publish_s)
        metrics.stage_seconds.labels(stage="store").observe(result.store_s)
        if result.code_counts is not None:
            metrics.observe_codes(result.code_counts)
        oldest = min((e.message.timestamp for e in events if e.message.timestamp), default=None)
        if oldest:
            metrics.freshness.observe(max(0.0, time.time() - oldest))
        for partition, _states, offset in result.writes:
            tp = next(e.message.tp for e in events if e.message.partition == partition)
            highwater = app.consumer.highwater(tp)
            if highwater is not None:
                metrics.lag.labels(partition=str(partition)).set(max(0, highwater - offset - 1))
            store = processor.store(partition)
            metrics.store_keys.labels(partition=str(partition)).set(store.approximate_keys())
            metrics.store_bytes.labels(partition=str(partition)).set(store.approximate_bytes())

    @app.agent(behaviors, concurrency=1, supervisor_strategy=mode.CrashingSupervisor)
    async def apply_behaviors(stream: faust.StreamT) -> None:
        health["status"] = "ready"
        async for events in stream.noack_take(settings.batch_size, within=settings.batch_window_s):
            records = [
                RawRecord(e.message.partition, e.message.offset, e.message.key, e.message.value)
                for e in events
            ]
            started = time.perf_counter()
            result = processor.process(records)
            processed = time.perf_counter()
            # The producer directly, not topic.send: Faust's per-message channel machinery
            # costs ~0.5 ms a record, more than everything else in the batch together.
            producer = app.producer
            deliveries = [
                await producer.send(
                    settings.states_topic, state.user_id.encode(),
                    encode_user_state(state, np.float32), partition, None, None,
                )
                for partition, states, _offset in result.writes
                for state in states  # co-partitioned: a state goes where its events came from
            ]
            for letter in result.dead_letters:
                value, headers = dead_letter(letter, settings.behaviors_topic, settings.max_dead_letter_bytes)
                deliveries.append(await producer.send(settings.dlq_topic, letter.record.key, value, None, None, headers))
            await asyncio.gather(*deliveries)
            published = time.perf_counter()
            processor.commit(result)
            for event in events:
                await stream.ack(event)
            observe(result, records, events, processed - started, published - processed)
            log.info(
                "batch: %d records, %d applied, %d duplicates, %d dead letters, %d states published; "
                "process %.0f ms (encode %.0f), publish %.0f ms, commit+ack %.0f ms",
                len(records), result.applied, result.duplicates, len(result.dead_letters), len(result.states),
                (processed - started) * 1e3, result.encode_s * 1e3, (published - processed) * 1e3,
                (time.perf_counter() - published) * 1e3,
            )

    @app.on_partitions_revoked.connect
    async def _close_revoked_stores(sender: object, revoked: Sequence, **_: object) -> None:
        processor.release([tp.partition for tp in revoked if tp.topic == settings.behaviors_topic])

    @app.on_before_shutdown.connect
    async def _close_stores(sender: object, **_: object) -> None:
        processor.close()

    return app
