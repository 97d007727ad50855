"""`vql bench replay`: how fast states are rebuilt from history.

- ``parquet``: N demo events in one Parquet file -> the columnar replay into fresh stores
  (file read, validation, duplicate ids, encode, state math, RocksDB writes all timed).
- ``topic``: N demo events in a fresh topic -> the topic replay (the worker's processor)
  into fresh stores and a states topic.
- with ``--worker-events``, one live worker drains a backlog on the same broker
  (:func:`vql.bench.pipeline.throughput`), and ``topic_over_worker`` is the ratio.

And two floors, what any replay of the same events must spend here whatever its code:

- ``topic_read_events_per_s``: the topic's records read by one aiokafka consumer and
  nothing else (no decoding, no state): the most one process can replay from a topic.
- ``store_write_s``: the Parquet replay's own states written again into fresh stores by as
  many processes as the replay had jobs (the store's float64 encoding and RocksDB writes
  only): the least it takes to persist what that replay built.

Each figure comes as wall-clock events/s and as events per CPU second of the replay process
(``cpu_events_per_s``): the latter does not count the broker, but does not depend on what
else the machine runs either.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import multiprocessing
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
from aiokafka import TopicPartition

from vql.bench.pipeline import throughput
from vql.bench.report import emit
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.arrow import CONTEXT_TYPE, EVENT_SCHEMA, conform_events
from vql.schemas.user_state import StateBatch, encode_states
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.replay import ReplayReport, replay_consumer, run_replay_topic
from vql.streams.replay_files import USERS_PER_CHUNK, run_replay_files
from vql.streams.settings import Settings
from vql.streams.state_store import PartitionStore
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


def from_parquet(work_dir: Path, events: int) -> int:
    """Emit the Parquet replay's events/s; return the jobs it ran in."""
    model_path = work_dir / "model.npz"
    version = VQLModel(ModelConfig()).save(model_path)
    model, _ = VQLModel.load(model_path)
    path = work_dir / f"events-{events}.parquet"
    pq.write_table(demo_table(demo_records(events)), path)
    settings = Settings(data_dir=work_dir / f"parquet-{uuid.uuid4().hex[:6]}", model_path=model_path)
    report = run_replay_files([path], settings, model, version, progress=False)
    _emit("parquet", report, device=str(next(model.parameters()).device), parquet_bytes=path.stat().st_size,
          jobs=report.jobs)
    return report.jobs


def from_topic(base: Settings, work_dir: Path, events: int) -> tuple[float, float]:
    """The topic replay's events/s, then the topic read alone (the same topic)."""
    settings = base.model_copy(update={"data_dir": work_dir, "model_path": work_dir / "model-topic.npz"})
    settings = settings.scoped(f"bench-replay-{uuid.uuid4().hex[:6]}")
    version = VQLModel(ModelConfig()).save(settings.model_path)
    model, _ = VQLModel.load(settings.model_path)
    ensure_topics(settings)
    produce_all(settings.kafka_bootstrap, settings.behaviors_topic, demo_records(events))
    report = run_replay_topic(settings, model, version, publish=True, progress=False)
    replay_rate = _emit("topic", report, partitions=settings.partitions, published=True, jobs=report.jobs)
    seconds = asyncio.run(_read_topic(settings, events))
    emit("replay", "topic_read_events_per_s", events / seconds, "1/s", events=events, partitions=settings.partitions)
    return replay_rate, events / seconds


async def _read_topic(settings: Settings, events: int) -> float:
    """Seconds one aiokafka consumer, set up as a replay's, takes to read ``events`` records."""
    consumer = replay_consumer(settings)
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.behaviors_topic, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        started, read = time.perf_counter(), 0
        while read < events:
            read += sum(len(records) for records in (await consumer.getmany(timeout_ms=500, max_records=32_768)).values())
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def store_write_floor(work_dir: Path, jobs: int) -> None:
    """The Parquet replay's states (the last one under ``work_dir``) written again into fresh
    stores of the same layout by ``jobs`` processes (as the replay's jobs share its stores),
    timed from the first process's start of writing to the last one's end: encoding to the
    store's float64 and the RocksDB writes, nothing else. Spawned processes, not forks of
    this one, which has prepared 2 M events and would pay a copy-on-write fault per page."""
    built = max(work_dir.glob("parquet-*/stores/*"), key=lambda path: path.stat().st_mtime)
    paths = sorted(path for path in built.iterdir() if path.is_dir())
    shares = [share for share in (paths[i::jobs] for i in range(jobs)) if share]
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(len(shares)), context.Queue()
    children = [context.Process(target=_write_again, args=(share, work_dir / f"store-floor-{uuid.uuid4().hex[:6]}",
                                                            built.name, ready, results)) for share in shares]
    for child in children:
        child.start()
    done = [results.get(timeout=600) for _child in children]
    for child in children:
        child.join()
    seconds = max(end for _start, end, *_ in done) - min(start for start, *_ in done)
    emit("replay", "store_write_s", seconds, "s", users=sum(d[2] for d in done), stores=len(paths),
         state_bytes=sum(d[3] for d in done), jobs=len(shares))


def _write_again(paths: list[Path], target: Path, version: str, ready, results) -> None:
    """One process of :func:`store_write_floor`: read its stores, wait for the others, write."""
    batches = []
    for path in paths:
        store = PartitionStore(path, version)
        states = list(store.states())
        store.close()
        if states:
            batches.append((path.name, StateBatch.of(states)))
    ready.wait()
    started = time.time()
    for name, batch in batches:
        store = PartitionStore(target / name, version)
        for lo in range(0, len(batch), USERS_PER_CHUNK):  # one WriteBatch per chunk, as the replay writes
            store.write(batch, processed_offset=lo, rows=np.arange(lo, min(lo + USERS_PER_CHUNK, len(batch))))
        store.close()
    ended = time.time()
    results.put((started, ended, sum(len(batch) for _name, batch in batches),
                 sum(len(blob) for _name, batch in batches for blob in encode_states(batch, np.float64))))


def run(base: Settings, work_dir: Path, events: int, topic_events: int, worker_events: int, timeout_s: float) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    # The topic first: its jobs fork this process, and after the Parquet run (2 M events
    # generated and prepared here) every page a child writes is a copy-on-write fault; in that
    # order the topic replay's jobs took twice the CPU.
    if topic_events:
        replay_rate, read_rate = from_topic(base, work_dir, topic_events)
        if worker_events:
            worker_rate = throughput(base, work_dir, worker_events, timeout_s)
            emit("replay", "topic_over_worker", replay_rate / worker_rate, "x", replay_events=topic_events,
                 worker_events=worker_events)
            emit("replay", "topic_read_over_worker", read_rate / worker_rate, "x", replay_events=topic_events,
                 worker_events=worker_events)
    if events:
        store_write_floor(work_dir, from_parquet(work_dir, events))
