"""`vql bench replay`: how fast states are rebuilt from history.

- ``parquet``: N demo events in one Parquet file -> the columnar replay into fresh stores
  (file read, validation, duplicate ids, encode, state math, RocksDB writes all timed).
- ``topic``: N demo events in a fresh topic -> the topic replay (the worker's processor)
  into fresh stores and a states topic.
- with ``--worker-events``, one live worker drains a backlog on the same broker
  (:func:`vql.bench.pipeline.throughput`), and ``topic_over_worker`` is the ratio.

Each figure comes as wall-clock events/s and as events per CPU second of the replay process
(``cpu_events_per_s``): the latter does not count the broker, but does not depend on what
else the machine runs either.
"""

from __future__ import annotations

import io
import itertools
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from vql.bench.pipeline import throughput
from vql.bench.report import emit
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.arrow import CONTEXT_TYPE, EVENT_SCHEMA, conform_events
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.replay import ReplayReport, run_replay_topic
from vql.streams.replay_files import run_replay_files
from vql.streams.settings import Settings
from vql.streams.topics import ensure_topics, produce_all

MEAN_EVENTS = 50  # events per demo user: replays rebuild long histories


def demo_records(events: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """The first ``events`` records of a demo stream of users with ~MEAN_EVENTS events each."""
    spec = DemoSpec(users=max(1, int(events / MEAN_EVENTS * 1.2)), mean_events=MEAN_EVENTS, heavy_users=0, seed=seed)
    return list(itertools.islice(generate(spec, int(time.time() * 1000)), events))


def demo_table(records: list[tuple[bytes, bytes]]) -> pa.Table:
    """Demo JSON records as an event table, parsed by Arrow (the demo has no ``extra``)."""
    parse_schema = pa.schema([f if f.name != "context" else pa.field(
        "context", pa.struct([CONTEXT_TYPE.field("category"), CONTEXT_TYPE.field("modality")]))
        for f in EVENT_SCHEMA])
    table = pajson.read_json(io.BytesIO(b"\n".join(value for _key, value in records)),
                             parse_options=pajson.ParseOptions(explicit_schema=parse_schema,
                                                               unexpected_field_behavior="ignore"))
    return conform_events(table, "demo records")


def _emit(source: str, report: ReplayReport, **params) -> float:
    rate = report.events_read / report.seconds
    emit("replay", "events_per_s", rate, "1/s", source=source, events=report.events_read,
         users=len(report.users), cpu_events_per_s=round(report.events_read / report.cpu_seconds),
         load_average_1m=round(os.getloadavg()[0], 2), **params)
    return rate


def from_parquet(work_dir: Path, events: int) -> None:
    model_path = work_dir / "model.npz"
    version = VQLModel(ModelConfig()).save(model_path)
    model, _ = VQLModel.load(model_path)
    path = work_dir / f"events-{events}.parquet"
    pq.write_table(demo_table(demo_records(events)), path)
    settings = Settings(data_dir=work_dir / f"parquet-{uuid.uuid4().hex[:6]}", model_path=model_path)
    report = run_replay_files([path], settings, model, version, progress=False)
    _emit("parquet", report, device=str(next(model.parameters()).device), parquet_bytes=path.stat().st_size)


def from_topic(base: Settings, work_dir: Path, events: int) -> float:
    settings = base.model_copy(update={"data_dir": work_dir, "model_path": work_dir / "model-topic.npz"})
    settings = settings.scoped(f"bench-replay-{uuid.uuid4().hex[:6]}")
    version = VQLModel(ModelConfig()).save(settings.model_path)
    model, _ = VQLModel.load(settings.model_path)
    ensure_topics(settings)
    produce_all(settings.kafka_bootstrap, settings.behaviors_topic, demo_records(events))
    report = run_replay_topic(settings, model, version, publish=True, progress=False)
    return _emit("topic", report, partitions=settings.partitions, published=True)


def run(base: Settings, work_dir: Path, events: int, topic_events: int, worker_events: int, timeout_s: float) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    if events:
        from_parquet(work_dir, events)
    if topic_events:
        replay_rate = from_topic(base, work_dir, topic_events)
        if worker_events:
            worker_rate = throughput(base, work_dir, worker_events, timeout_s)
            emit("replay", "topic_over_worker", replay_rate / worker_rate, "x", replay_events=topic_events,
                 worker_events=worker_events)
