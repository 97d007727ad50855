"""Start a worker: settings -> model artifact -> stores -> Faust app, with readable failures."""

from __future__ import annotations

import logging
import sys

import faust

from vql.model.artifact import ArtifactError
from vql.streams.app import create_app
from vql.streams.layout import check_layout
from vql.streams.processor import BatchProcessor
from vql.streams.settings import Settings
from vql.streams.state_limits import StateLimitError, check_states_fit, states_limit
from vql.streams.state_store import StoreError
from vql.streams.topics import BrokerUnavailable, TopicLayoutError, ensure_topics

log = logging.getLogger("vql.worker")


def load_processor(settings: Settings) -> BatchProcessor:
    """The model on its device and the processor around it; raises ArtifactError."""
    import torch

    from vql.model.encoder import VQLModel, default_device

    device = default_device() if settings.device == "auto" else torch.device(settings.device)
    # The encoder's layers are small: a second intra-op thread costs more than it saves, and
    # spinning OpenMP threads fight the broker and RocksDB for the cores (a 1,000-event
    # encode took 60-120 ms instead of ~1 ms in `make demo` with two threads).
    torch.set_num_threads(settings.torch_threads)
    model, version = VQLModel.load(settings.model_path, device)
    log.info("model %s loaded from %s on %s (%d torch threads)", version, settings.model_path, device,
             torch.get_num_threads())
    return BatchProcessor(
        model, version, settings.data_dir, settings.behaviors_topic, settings.event_policy(),
        event_id_window=settings.event_id_window, cache_bytes=settings.state_cache_mb << 20,
    )


def run_worker(settings: Settings, loglevel: str = "info") -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        processor = load_processor(settings)
    except ArtifactError as exc:
        print(f"vql worker: cannot load the model: {exc}", file=sys.stderr)
        return 2
    try:
        ensure_topics(settings)
        # Before consuming anything: a state Kafka refuses would stop this worker and every next one.
        check_states_fit(processor.model.config, states_limit(settings), settings.states_topic)
        # Refused: states placed for another partition count or built by another model.
        processor.partitions = check_layout(settings.kafka_bootstrap, settings.states_topic, processor.model_version)
    except (BrokerUnavailable, TopicLayoutError, StateLimitError) as exc:
        print(f"vql worker: {exc}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, processor)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except StoreError as exc:
        print(f"vql worker: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return _restore_failure(app) or int(exc.code or 0)
    return _restore_failure(app)


def _restore_failure(app: faust.App) -> int:
    """2, with the reason on stderr, if the worker stopped because a restore failed for good
    (a supervisor should not restart it in a loop: someone has to act); else 0."""
    failure = app.vql_consumer.health()
    if failure[0] != "failed":
        return 0
    print(f"vql worker: {failure[1]}", file=sys.stderr)
    return 2
