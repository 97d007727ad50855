"""The `vql replay`, `vql export` and `vql import` commands: arguments, and errors as one line.

Kept apart from streams/cli.py so that the CLI's module stays a table of commands; heavy
imports (torch, pyarrow) happen when a command runs, not when `vql --help` does.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from vql.streams.settings import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the three commands on the `vql` sub-parsers."""
    cmd = commands.add_parser(
        "replay", help="rebuild user states from a topic or Parquet/Arrow files under a model",
        description="Rebuild every user's state from history with the model artifact --model: into the "
        "worker's store layout under --data-dir (resumable: a rerun continues), and with --publish into a "
        "states topic. From a topic it runs the worker's own batch processor; from files (--files) a "
        "columnar path. See docs/replay.md for the model upgrade procedure.")
    source = cmd.add_mutually_exclusive_group()
    source.add_argument("--topic", help="events topic to read (default: $VQL_BEHAVIORS_TOPIC)")
    source.add_argument("--files", type=Path, nargs="+", help="Parquet or Arrow (.arrow/.feather) event files")
    cmd.add_argument("--model", type=Path, help="model artifact (default: $VQL_MODEL_PATH)")
    cmd.add_argument("--data-dir", type=Path, help="stores go to DATA_DIR/stores/<version>/ (default: $VQL_DATA_DIR)")
    cmd.add_argument("--store-topic", help="the topic name in the store layout for --files "
                     "(default: $VQL_BEHAVIORS_TOPIC)")
    cmd.add_argument("--publish", metavar="STATES_TOPIC",
                     help="also publish states to this topic (created compacted if missing); its dead "
                     "letters go to STATES_TOPIC.dlq")
    cmd.add_argument("--group", help="topic replay: commit this consumer group's offsets as batches land, "
                     "so a worker with VQL_APP_ID=GROUP continues after the replay")
    cmd.add_argument("--partition", type=int, nargs="+", help="topic replay: only these partitions")
    cmd.add_argument("--from-offset", type=int, help="topic replay: first offset (every chosen partition)")
    cmd.add_argument("--to-offset", type=int, help="topic replay: stop before this offset")
    cmd.add_argument("--from-time", type=_time_ms, help="topic replay: first record at or after this time "
                     "(ISO 8601, or epoch ms), by Kafka timestamp")
    cmd.add_argument("--to-time", type=_time_ms, help="topic replay: stop at records from this time on")
    cmd.add_argument("--partitions", type=int, help="--files without partition columns: partitions of the "
                     "store layout (default: $VQL_PARTITIONS)")
    cmd.add_argument("--batch-size", type=int, default=32_768, help="topic replay: records per batch")
    cmd.add_argument("--jobs", type=_positive, help="processes the partitions are dealt to (default: "
                     "$VQL_REPLAY_JOBS, or one per CPU core)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.set_defaults(handler=replay)

    cmd = commands.add_parser("export", help="events or states to Parquet",
                              description="Write a topic to a Parquet file with the contracts of schemas/ "
                              "(schemas/arrow.py): events (valid ones, with source partition/offset/timestamp; "
                              "the rest counted by reason) or the latest state of every user.")
    cmd.add_argument("what", choices=["events", "states"])
    cmd.add_argument("--topic", help="default: $VQL_BEHAVIORS_TOPIC for events, $VQL_STATES_TOPIC for states")
    cmd.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    cmd.add_argument("--no-progress", action="store_true")
    cmd.set_defaults(handler=export)

    cmd = commands.add_parser("import", help="events from Parquet/Arrow files into a topic",
                              description="Produce the events of the files to a topic as JSON, keyed by user id.")
    cmd.add_argument("files", type=Path, nargs="+")
    cmd.add_argument("--topic", help="default: $VQL_BEHAVIORS_TOPIC")
    cmd.add_argument("--no-progress", action="store_true")
    cmd.set_defaults(handler=import_files)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def _time_ms(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not ISO 8601 or epoch ms: {text!r}") from exc


def _errors() -> tuple[type[BaseException], ...]:
    """What a replay, export or import reports as one line rather than a traceback."""
    from vql.model.artifact import ArtifactError
    from vql.schemas.arrow import FileSchemaError
    from vql.schemas.user_state import StateFormatError
    from vql.streams.replay import ReplayError
    from vql.streams.state_limits import StateLimitError
    from vql.streams.state_store import StoreError
    from vql.streams.topics import BrokerUnavailable, TopicLayoutError

    return (ArtifactError, FileSchemaError, StateFormatError, ReplayError, StoreError, BrokerUnavailable,
            TopicLayoutError, StateLimitError, FileNotFoundError, ValueError)


def replay(args: argparse.Namespace, settings: Settings) -> int:
    try:
        report = _replay(args, settings)
    except _errors() as exc:
        print(f"vql replay: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _replay(args: argparse.Namespace, settings: Settings):
    import torch

    from vql.model.encoder import VQLModel, default_device
    from vql.streams.replay import TopicRange, run_replay_topic
    from vql.streams.replay_files import run_replay_files
    from vql.streams.state_limits import check_states_fit, states_limit

    updates = {name: value for name, value in (
        ("model_path", args.model), ("data_dir", args.data_dir), ("partitions", args.partitions),
        ("behaviors_topic", args.topic or args.store_topic)) if value is not None}
    if args.publish:
        updates.update(states_topic=args.publish, dlq_topic=f"{args.publish}.dlq")
    settings = settings.model_copy(update=updates)
    device = default_device() if settings.device == "auto" else torch.device(settings.device)
    model, version = VQLModel.load(settings.model_path, device)
    if args.publish:  # before any work: states the topic refuses would stop the replay midway
        check_states_fit(model.config, states_limit(settings), settings.states_topic)
    print(f"replaying with model {version} ({settings.model_path}) on {device} into "
          f"{settings.data_dir / 'stores' / version}" + (f" and {settings.states_topic}" if args.publish else ""))
    if args.files:
        return run_replay_files(args.files, settings, model, version, publish=bool(args.publish),
                                progress=not args.no_progress, jobs=args.jobs)
    span = TopicRange(tuple(args.partition) if args.partition else None, args.from_offset, args.to_offset,
                      args.from_time, args.to_time)
    return run_replay_topic(settings, model, version, span=span, jobs=args.jobs, publish=bool(args.publish),
                            group=args.group, batch_size=args.batch_size, progress=not args.no_progress)


def export(args: argparse.Namespace, settings: Settings) -> int:
    from vql.streams.export import export_events, export_states
    from vql.streams.replay import partition_count

    topic = args.topic or (settings.behaviors_topic if args.what == "events" else settings.states_topic)
    try:
        partition_count(settings, topic)  # a missing topic is an error, not an empty file
        if args.what == "events":
            written, rejected = export_events(settings.kafka_bootstrap, topic, args.out, settings.event_policy(),
                                              progress=not args.no_progress)
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"
            print(f"wrote {written:,} events of {topic} to {args.out}; left out {sum(rejected.values()):,} "
                  f"the worker would reject ({reasons})")
        else:
            print(f"wrote {export_states(settings.kafka_bootstrap, topic, args.out):,} states of {topic} to {args.out}")
    except _errors() as exc:
        print(f"vql export: {exc}", file=sys.stderr)
        return 1
    return 0


def import_files(args: argparse.Namespace, settings: Settings) -> int:
    from vql.streams.export import import_events
    from vql.streams.replay import partition_count

    topic = args.topic or settings.behaviors_topic
    try:
        partition_count(settings, topic)  # create topics with their layout first (vql worker does)
        sent = import_events(args.files, settings.kafka_bootstrap, topic, progress=not args.no_progress)
    except _errors() as exc:
        print(f"vql import: {exc}", file=sys.stderr)
        return 1
    print(f"produced {sent:,} events to {topic}")
    return 0
