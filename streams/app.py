"""The Faust app that hosts the worker: lifecycle, signals, web (/metrics, /health), sensors.

Records do not flow through Faust streams: :class:`BehaviorConsumer` (streams/consumer.py)
consumes them in whole fetches, which is ten times faster on this hardware; Faust's own Kafka
consumer and producer are not started (``WorkerBoot``). docs/architecture.md says why.
"""

from __future__ import annotations

import logging
import time

import faust
from faust.app.base import BootStrategy
from faust.sensors.prometheus import setup_prometheus_sensors
from prometheus_client import CollectorRegistry

from vql.streams.consumer import BehaviorConsumer
from vql.streams.kafka_security import KafkaSecurity
from vql.streams.lag import LagMonitor, PartitionSeries
from vql.streams.metrics import WorkerMetrics
from vql.streams.processor import BatchProcessor, BatchResult
from vql.streams.settings import Settings

log = logging.getLogger("vql.worker")


class WorkerBoot(BootStrategy):
    """Faust without its Kafka consumer and producer: BehaviorConsumer owns both."""

    enable_kafka = False


def create_app(settings: Settings, processor: BatchProcessor) -> faust.App:
    """The Faust app hosting a :class:`BehaviorConsumer` wired to ``processor``."""
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,  # Faust validates it even when the web is off
        web_bind=settings.web_host,
        # Only /health, /metrics and a bare index: Faust's introspection views (the key router,
        # table contents, the topology graph, statistics) say more than an operator's port should.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
        broker_credentials=KafkaSecurity().faust_credentials(),
    )
    app.boot_strategy = WorkerBoot(app)
    registry = CollectorRegistry()
    setup_prometheus_sensors(app, "/metrics", registry, name_prefix="faust")
    cfg = processor.model.config
    metrics = WorkerMetrics(registry, cfg.groups, cfg.codes)
    series = PartitionSeries(metrics)

    def observe(result: BatchResult, timestamps: list[int], process_s: float, publish_s: float) -> None:
        metrics.batch_records.observe(len(timestamps))
        metrics.records.labels(outcome="applied").inc(result.applied)
        metrics.records.labels(outcome="duplicate").inc(result.duplicates)
        metrics.records.labels(outcome="dead_letter").inc(len(result.dead_letters))
        for letter in result.dead_letters:
            metrics.dead_letters.labels(reason=letter.rejection.reason.value).inc()
        metrics.states_published.inc(result.state_count)
        metrics.users_deleted.inc(result.deleted_count)
        metrics.stage_seconds.labels(stage="process").observe(process_s)
        metrics.stage_seconds.labels(stage="encode").observe(result.encode_s)
        metrics.stage_seconds.labels(stage="publish").observe(publish_s)
        metrics.stage_seconds.labels(stage="store").observe(result.store_s)
        if result.code_counts is not None:
            metrics.observe_codes(result.code_counts)
        oldest = min((ts for ts in timestamps if ts), default=None)
        if oldest:
            metrics.freshness.observe(max(0.0, time.time() - oldest / 1000.0))
        series.batch_applied(partition for partition, _states, _offset in result.writes)
        for partition, _states, _offset in result.writes:
            store = processor.store(partition)
            metrics.store_keys.labels(partition=str(partition)).set(store.approximate_keys())
            metrics.store_bytes.labels(partition=str(partition)).set(store.approximate_bytes())

    def observe_flush(seconds: float) -> None:
        metrics.stage_seconds.labels(stage="flush").observe(seconds)

    consumer = BehaviorConsumer(settings, processor, observe, observe_flush, on_assigned=series.assigned,
                                on_revoked=series.revoked, loop=app.loop, beacon=app.beacon)
    app.vql_consumer = consumer  # run_worker reads why it stopped
    lag = LagMonitor(series, settings.behaviors_topic, settings.lag_interval_s, lambda: consumer.kafka,
                     loop=app.loop, beacon=app.beacon)

    @app.page("/health")
    async def _health(web, request):  # noqa: ANN001 - Faust's view signature
        """starting (no partition yet), recovering (rebalancing, restoring), ready, failed (a
        restore that cannot succeed: the worker stops), with the reason: 200 only when ready."""
        status, reason = consumer.health()
        return web.json({"status": status, "reason": reason, "model_version": processor.model_version},
                        status=200 if status == "ready" else 503)

    @app.task
    async def _start_consumer() -> None:
        await app.add_runtime_dependency(consumer)
        await app.add_runtime_dependency(lag)

    return app
