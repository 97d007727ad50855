"""The `vql` command line. Every subcommand has --help; settings come from VQL_* variables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from vql.streams.kafka_security import KafkaSecurity
from vql.streams.settings import Settings


def _model_init(args: argparse.Namespace, settings: Settings) -> int:
    from vql.model.config import ModelConfig
    from vql.model.encoder import VQLModel

    out = args.out or settings.model_path
    if out.exists() and not args.force:
        print(f"{out} exists; pass --force to replace it", file=sys.stderr)
        return 1
    config = ModelConfig(seed=args.seed)
    version = VQLModel(config).save(out)
    print(f"wrote model {version} to {out} (randomly initialised, seed {args.seed})")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from vql.streams.worker import run_worker

    return run_worker(settings, loglevel=args.loglevel)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from vql.streams.demo import run_demo
    from vql.streams.demo_events import DemoSpec

    spec = DemoSpec(users=args.users, heavy_users=args.heavy_users, heavy_events=args.heavy_events)
    return run_demo(settings, spec, timeout_s=args.timeout)


def _produce(args: argparse.Namespace, settings: Settings) -> int:
    from vql.streams.demo import produce_demo_events
    from vql.streams.demo_events import DemoSpec
    from vql.streams.topics import ensure_topics

    ensure_topics(settings)
    spec = DemoSpec(users=args.users, heavy_users=args.heavy_users, heavy_events=args.heavy_events, seed=args.seed)
    count, _raw = produce_demo_events(settings, spec)
    print(f"produced {count} events to {settings.behaviors_topic}")
    return 0


def _score(args: argparse.Namespace, settings: Settings) -> int:
    from vql.streams.demo import print_top_candidates, read_states

    states = read_states(settings)
    blob = states.get(args.user.encode())
    if blob is None:
        print(f"no state for user {args.user!r} in {settings.states_topic}", file=sys.stderr)
        return 1
    print_top_candidates(settings, blob, args.candidates, args.top)
    return 0


def _delete_user(args: argparse.Namespace, settings: Settings) -> int:
    from kafka.errors import KafkaError

    from vql.streams.deletion import request_deletions
    from vql.streams.topics import BrokerUnavailable

    users = list(args.user)
    if args.file is not None:
        users += [line.strip() for line in args.file.read_text().splitlines() if line.strip()]
    if not users:
        print("vql delete-user: no user ids given", file=sys.stderr)
        return 2
    try:
        sent = request_deletions(settings.kafka_bootstrap, settings.behaviors_topic, users)
    except (ValueError, KafkaError, BrokerUnavailable) as exc:
        print(f"vql delete-user: {exc}", file=sys.stderr)
        return 1
    for user, partition, offset in sent:
        print(f"delete request for {user!r}: {settings.behaviors_topic} partition {partition} offset {offset}")
    return 0


def _bench_encode(args: argparse.Namespace, settings: Settings) -> int:
    from vql.bench.encode import run

    run(batches=args.batch, seconds=args.seconds, devices=args.device)
    return 0


def _bench_codec(args: argparse.Namespace, settings: Settings) -> int:
    from vql.bench.codec import run

    run(batch=args.batch, count=args.states, occupancy=args.occupancy, seconds=args.seconds)
    return 0


def _bench_state_size(args: argparse.Namespace, settings: Settings) -> int:
    from vql.bench.state_size import run

    run(lengths=args.lengths)
    return 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from vql.model.config import ModelConfig
    from vql.research.datasets import DatasetUnavailable, load_dataset
    from vql.model.encoder import VQLModel, default_device
    from vql.research.experiments import RECIPES
    from vql.research.training import evaluate, train

    recipe = RECIPES[args.dataset]
    try:
        data = load_dataset(args.dataset, **recipe.data)
    except DatasetUnavailable as exc:
        print(f"vql train: {exc}", file=sys.stderr)
        return 1
    config = replace(recipe.train, seed=args.seed, max_events=args.max_events, **_recipe_overrides(args))
    model = VQLModel(ModelConfig(seed=args.seed))
    device = default_device()
    report = train(model, data.histories, data.train, config, device)
    metrics = evaluate(model, data.histories, data.test, device, max_events=args.max_events)
    out = args.out or settings.model_path
    version = model.save(out)
    seconds = ", ".join(f"{s:.1f}" for s in report.epoch_seconds)
    print(f"trained VQL on {data.name} ({len(report.epoch_seconds)} epochs, {config.warmup_epochs} unquantized): epoch seconds "
          f"[{seconds}], losses {[round(x, 4) for x in report.epoch_losses]}")
    print("test " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"wrote model {version} to {out}")
    return 0


def _recipe_overrides(args: argparse.Namespace) -> dict:
    """The training flags given on the command line, over a dataset's recipe."""
    flags = (("epochs", args.epochs), ("users_per_batch", args.users_per_batch), ("learning_rate", args.lr),
             ("warmup_epochs", getattr(args, "warmup_epochs", None)),
             ("extra_quantized_epochs", args.extra_quantized_epochs))
    return {name: value for name, value in flags if value is not None}


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from vql.model.config import ModelConfig
    from vql.research.datasets import DatasetUnavailable, load_dataset
    from vql.model.encoder import default_device
    from vql.research.experiments import RECIPES, merge_records, read_jsonl, run_grid, write_jsonl
    from vql.research.report import write_results

    results_path = args.out / "results.jsonl"
    if args.merge and not results_path.exists():
        print(f"vql evaluate: --merge needs an earlier {results_path}", file=sys.stderr)
        return 1
    previous = read_jsonl(results_path) if args.merge else []
    overrides = _recipe_overrides(args)
    names = list(dict.fromkeys([*args.datasets, *(r["dataset"] for r in previous)]))
    try:
        loaded = {name: load_dataset(name, **RECIPES[name].data) for name in names}
    except DatasetUnavailable as exc:
        print(f"vql evaluate: {exc}", file=sys.stderr)
        return 1
    from vql.bench.state_size import measure

    state_sizes = measure([10, 100, 1_000, 10_000, 100_000, 1_000_000])
    grid = [(loaded[name], replace(RECIPES[name].train, **overrides)) for name in args.datasets]
    records = run_grid(grid, args.models, list(range(args.seeds)), args.lengths, ModelConfig(), default_device())
    if args.merge:
        records = merge_records(previous, records)
    write_jsonl(records, results_path)
    write_results(records, list(loaded.values()), args.out, state_sizes)
    print(f"wrote {results_path} and {args.out / 'results.md'}")
    return 0


def _broker_bench(name: str, run: Callable[[], None]) -> int:
    """Run a benchmark that drives the broker; a missing broker or a stuck worker is one line."""
    from vql.streams.topics import BrokerUnavailable

    try:
        run()
    except (BrokerUnavailable, RuntimeError) as exc:
        print(f"vql bench {name}: {exc}", file=sys.stderr)
        return 1
    return 0


def _bench_pipeline(args: argparse.Namespace, settings: Settings) -> int:
    from vql.bench.pipeline import run

    return _broker_bench("pipeline", lambda: run(settings, args.work_dir, args.events, args.rate, args.seconds,
                                                 args.timeout))


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from vql.model.artifact import ArtifactError
    from vql.serving.errors import StoreUnavailable
    from vql.serving.follower import TopicMissing
    from vql.serving.service import run_service
    from vql.serving.settings import ServingSettings
    from vql.streams.topics import BrokerUnavailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its connection chatter is not the service's news
    overrides = {name: value for name, value in (("host", args.host), ("port", args.port)) if value is not None}
    try:
        run_service(settings, ServingSettings(**overrides), follow=not args.no_follow)
    except (ArtifactError, StoreUnavailable, TopicMissing, BrokerUnavailable, ValidationError) as exc:
        print(f"vql serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _bench_score(args: argparse.Namespace, settings: Settings) -> int:
    from vql.bench.score import run

    run(lengths=args.lengths, candidates=args.candidates, seconds=args.seconds, plot=args.plot,
        http_rate=args.http_rate, http_seconds=args.http_seconds)
    return 0


def _bench_replay(args: argparse.Namespace, settings: Settings) -> int:
    from vql.bench.replay import run

    return _broker_bench("replay", lambda: run(settings, args.work_dir, args.events, args.topic_events,
                                               args.worker_events, args.timeout))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vql",
        description="vql-stream: keep a ready-to-score VQL attention state for every user.",
        epilog="Settings come from the environment (VQL_*, KAFKA_BOOTSTRAP): see docs/configuration.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = commands.add_parser("worker", help="run a stream worker (behaviors -> user-states)",
                                 description="Run a Faust worker until SIGTERM or Ctrl-C.")
    worker.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(handler=_worker)

    model = commands.add_parser("model", help="create and inspect model artifacts")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    init = model_commands.add_parser("init", help="write a randomly initialised model artifact",
                                     description="Write a model artifact with the default config.")
    init.add_argument("--out", type=Path, help="artifact path (default: $VQL_MODEL_PATH)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(handler=_model_init)

    train = commands.add_parser("train", help="train VQL on a dataset and write the model artifact",
                                description="Train the VQL CTR model end to end (BCE + commitment loss, "
                                "EMA codebooks) and write config + weights + codebooks + version hash.")
    train.add_argument("--dataset", choices=["movielens", "synthetic"], default="movielens",
                       help="data set; its recipe (research/experiments.py) gives the data and training defaults")
    train.add_argument("--epochs", type=int, help="override the recipe")
    train.add_argument("--warmup-epochs", type=int, help="unquantized epochs first (override the recipe)")
    train.add_argument("--extra-quantized-epochs", type=int, help="quantized epochs after --epochs (override the recipe)")
    train.add_argument("--users-per-batch", type=int, help="override the recipe")
    train.add_argument("--lr", type=float, help="override the recipe")
    train.add_argument("--max-events", type=int, default=None, help="train on the newest events only")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, help="artifact path (default: $VQL_MODEL_PATH)")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="train and test VQL and every baseline; write docs/results.*",
                                   description="The evaluation grid: models x datasets x seeds, AUC/GAUC/logloss, "
                                   "AUC vs history length; writes results.jsonl and results.md with plots.")
    evaluate.add_argument("--datasets", nargs="+", choices=["movielens", "synthetic"], default=["movielens", "synthetic"])
    evaluate.add_argument("--models", nargs="+", default=["vql", "full", "din50", "din200", "sim", "sdim", "mean"])
    evaluate.add_argument("--seeds", type=int, default=3)
    evaluate.add_argument("--epochs", type=int, help="override every dataset's recipe (research/experiments.py)")
    evaluate.add_argument("--users-per-batch", type=int, help="override the recipes")
    evaluate.add_argument("--lr", type=float, help="override the recipes")
    evaluate.add_argument("--extra-quantized-epochs", type=int, help="override the recipes (VQL only)")
    evaluate.add_argument("--merge", action="store_true",
                          help="keep OUT/results.jsonl's figures of the (dataset, model) pairs not run now")
    evaluate.add_argument("--lengths", type=int, nargs="+", default=[10, 50, 200, 1000, 10_000])
    evaluate.add_argument("--out", type=Path, default=Path("docs"))
    evaluate.set_defaults(handler=_evaluate)

    demo = commands.add_parser("demo", help="the main job: worker + demo events + a visible result",
                               description="Start a worker, stream demo events through it and "
                               "print throughput, state sizes and one user's top candidates. "
                               "Needs a broker (make demo starts the local one).")
    _add_demo_size(demo)
    demo.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    demo.set_defaults(handler=_demo)

    produce = commands.add_parser("produce", help="produce seeded demo events to the behaviors topic",
                                  description="Produce demo events (see streams/demo_events.py).")
    _add_demo_size(produce)
    produce.add_argument("--seed", type=int, default=7)
    produce.set_defaults(handler=_produce)

    score = commands.add_parser("score", help="score random candidates for one user from user-states",
                                description="Read a user's published state and print its top candidates.")
    score.add_argument("user", help="user id")
    score.add_argument("--candidates", type=int, default=1000)
    score.add_argument("--top", type=int, default=10)
    score.set_defaults(handler=_score)

    delete_user = commands.add_parser(
        "delete-user", help="forget users: their states everywhere, and their events so far",
        description="Send a delete request (a control message keyed by the user) per user to the behaviors "
        "topic. The owning worker applies it in input order: it deletes the user's state from its store, "
        "keeps a deletion marker so that a redelivery of the user's older events applies nothing, and "
        "publishes a tombstone to the states topic, which standbys, restores and serving views obey. Events "
        "after the request start a new history. Raw events stay in the behaviors topic until its "
        "retention: docs/operations.md, 'Deleting a user'.")
    delete_user.add_argument("user", nargs="*", help="user ids")
    delete_user.add_argument("--file", type=Path, help="also the user ids in this file, one a line")
    delete_user.set_defaults(handler=_delete_user)

    serve = commands.add_parser(
        "serve", help="the HTTP scoring service over a local view of user-states",
        description="Restore a local RocksDB copy of the states topic, follow it, and serve "
        "POST /v1/score, GET /v1/health and GET /openapi.json (docs/serving.md). "
        "Settings: VQL_SERVE_* and VQL_KAFKA_BOOTSTRAP, VQL_STATES_TOPIC, VQL_MODEL_PATH.")
    serve.add_argument("--host", default=None, help="bind address (default: $VQL_SERVE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: $VQL_SERVE_PORT or 8080)")
    serve.add_argument("--no-follow", action="store_true",
                       help="serve the local copy as it is on disk, without a broker (nothing is flagged stale)")
    serve.set_defaults(handler=_serve)

    from vql.streams.replay_cli import add_commands  # replay, export, import

    add_commands(commands)

    bench = commands.add_parser("bench", help="benchmarks (one JSON line per figure)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    encode = bench_commands.add_parser("encode", help="code assignment throughput (events/s)",
                                       description="Measure encode throughput of the default model.")
    encode.add_argument("--batch", type=int, nargs="+", default=[1, 256, 4096])
    encode.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    encode.add_argument("--device", nargs="+", default=None, help="devices (default: cpu, and cuda if present)")
    encode.set_defaults(handler=_bench_encode)
    codec = bench_commands.add_parser(
        "codec", help="per-record event decode and per-state encode/decode, without Kafka",
        description="Microseconds a record through decode_event and decode_batch (the worker's path), and a "
        "state through encode_states (float32, float64), decode_states into empty rows, and one decode_user_state.")
    codec.add_argument("--batch", type=int, default=4096, help="records a decode_batch call")
    codec.add_argument("--states", type=int, default=1000, help="states an encode/decode call")
    codec.add_argument("--occupancy", type=float, default=0.47, help="share of occupied cells (0.47: ~90 of 192)")
    codec.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    codec.set_defaults(handler=_bench_codec)
    state_size = bench_commands.add_parser("state-size", help="state bytes per user against history length",
                                           description="Measure the published state's size for histories of L events.")
    state_size.add_argument("--lengths", type=int, nargs="+", default=[10, 100, 1_000, 10_000, 100_000, 1_000_000])
    state_size.set_defaults(handler=_bench_state_size)
    pipeline = bench_commands.add_parser(
        "pipeline", help="one worker through the broker: events/s and freshness p50/p99",
        description="Drain a backlog with one worker (events_per_s), then offer a fixed rate "
        "(default: half the measured throughput) and measure freshness_p50_ms / freshness_p99_ms.")
    pipeline.add_argument("--events", type=int, default=300_000, help="backlog size for the throughput run")
    pipeline.add_argument("--rate", type=float, default=None, help="offered events/s for the freshness run")
    pipeline.add_argument("--seconds", type=float, default=30.0, help="length of the freshness run")
    pipeline.add_argument("--timeout", type=float, default=600.0)
    pipeline.add_argument("--work-dir", type=Path, default=Path(".vql/bench"))
    pipeline.set_defaults(handler=_bench_pipeline)
    score_bench = bench_commands.add_parser(
        "score", help="scoring latency p50/p99 from a state vs full attention and top-k retrieval",
        description="Latency of scoring N candidates for one user at history length L, on one "
        "CPU thread: vql (the serving client: local store read, decode, numpy scorer), full "
        "(exact attention over the raw history, unquantized keys) and topk (SIM-hard: the k "
        "newest same-category events, then attention); state_bytes per L; with --http-rate, "
        "the HTTP service's latency at a fixed request rate from a loopback load generator.")
    score_bench.add_argument("--lengths", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    score_bench.add_argument("--candidates", type=int, nargs="+", default=[1, 100, 1000])
    score_bench.add_argument("--seconds", type=float, default=2.0,
                             help="time budget per (method, L, N) cell; at least 3 repeats are always taken")
    score_bench.add_argument("--plot", type=Path, default=None, help="write a latency-vs-L plot (PNG) here")
    score_bench.add_argument("--http-rate", type=float, default=100.0, help="requests/s offered to the service (0: skip)")
    score_bench.add_argument("--http-seconds", type=float, default=10.0, help="length of the HTTP run")
    score_bench.set_defaults(handler=_bench_score)
    replay_bench = bench_commands.add_parser(
        "replay", help="replay throughput: events/s from Parquet and from a topic",
        description="Rebuild states from a Parquet file of N demo events (columnar path, store only) and "
        "from a topic (the worker's processor, store + publish), with wall-clock and CPU-time events/s; "
        "optionally measure one live worker on the same broker for the ratio.")
    replay_bench.add_argument("--events", type=int, default=2_000_000, help="events in the Parquet run")
    replay_bench.add_argument("--topic-events", type=int, default=300_000, help="events in the topic run (0: skip)")
    replay_bench.add_argument("--worker-events", type=int, default=0,
                              help="also drain this many events with one live worker (vql bench pipeline's "
                              "throughput run) and report replay / worker (0: skip)")
    replay_bench.add_argument("--timeout", type=float, default=600.0)
    replay_bench.add_argument("--work-dir", type=Path, default=Path(".vql/bench-replay"))
    replay_bench.set_defaults(handler=_bench_replay)
    return parser


def _add_demo_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--heavy-users", type=int, default=5, help="users with long histories")
    parser.add_argument("--heavy-events", type=int, default=12_000, help="events of each heavy user")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        _report_bad_settings(exc, "VQL_")
        return 2
    try:
        KafkaSecurity()  # a half security configuration is refused here, before any client
    except ValidationError as exc:
        _report_bad_settings(exc, "VQL_KAFKA_")
        return 2
    return args.handler(args, settings)


def _report_bad_settings(exc: ValidationError, prefix: str) -> None:
    for error in exc.errors(include_url=False):
        if not error["loc"]:  # a rule across settings: its message names them (no values: secrets)
            print(f"vql: bad settings: {error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
            continue
        variable = prefix + "_".join(str(part) for part in error["loc"]).upper()
        print(f"vql: bad setting {variable}={error.get('input')!r}: {error['msg']}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
