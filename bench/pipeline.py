"""`vql bench pipeline`: one worker through the real broker, end to end.

Two measurements, each on fresh topics:

- throughput: a backlog of N events is produced first, then one worker drains it; the
  figure is events per second between the worker's first and last state publication
  (sustained, into published states).
- freshness: events are offered at a fixed rate while the worker runs; for every published
  state, freshness = its Kafka timestamp minus that of the newest input record it includes
  (the state's applied offset, on the same partition: input and states are co-partitioned).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np

from vql.bench.report import emit
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.user_state import decode_user_state
from vql.streams.demo import start_worker, stop_worker
from vql.streams.demo_events import DemoSpec, generate, history_lengths
from vql.streams.settings import Settings
from vql.streams.topics import ensure_topics, produce_all, producer, read_topic

# Demo users with a modest history each: the stream touches many users per batch.
SPEC = DemoSpec(users=5000, mean_events=20, heavy_users=0)


def _prepare(base: Settings, work_dir: Path, label: str) -> Settings:
    settings = base.model_copy(update={"data_dir": work_dir, "model_path": work_dir / "model.npz", "web_port": 0})
    settings = settings.scoped(f"bench-{label}-{uuid.uuid4().hex[:6]}")
    VQLModel(ModelConfig()).save(settings.model_path)
    ensure_topics(settings)
    return settings


def _records(count: int) -> list[tuple[bytes, bytes]]:
    spec = SPEC
    while history_lengths(spec).sum() < count:
        spec = DemoSpec(users=spec.users * 2, mean_events=spec.mean_events, heavy_users=0)
    records = []
    for record in generate(spec, int(time.time() * 1000)):
        records.append(record)
        if len(records) == count:
            break
    return records


def _published(settings: Settings) -> list[tuple[int, int, bytes]]:
    """(partition, timestamp ms, state) of every state publication, in order."""
    return [(p, ts, value) for p, _o, _k, value, _h, ts in read_topic(
        settings.kafka_bootstrap, settings.states_topic, idle_s=2.0, with_timestamps=True)]


def _wait_for_states(settings: Settings, total: int, timeout_s: float, worker) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        latest: dict[bytes, int] = {}
        for _p, _o, key, value, _h in read_topic(settings.kafka_bootstrap, settings.states_topic, idle_s=1.0):
            latest[key] = decode_user_state(value).event_count
        if sum(latest.values()) >= total:
            return
        time.sleep(2.0)
    raise RuntimeError(f"the worker did not publish all {total} events in {timeout_s} s")


def throughput(base: Settings, work_dir: Path, events: int, timeout_s: float) -> float:
    settings = _prepare(base, work_dir, "throughput")
    produce_all(settings.kafka_bootstrap, settings.behaviors_topic, _records(events))
    worker = start_worker(settings, work_dir / "throughput-worker.log")
    try:
        _wait_for_states(settings, events, timeout_s, worker)
    finally:
        stop_worker(worker)
    stamps = [ts for _p, ts, _v in _published(settings)]
    rate = events / max((max(stamps) - min(stamps)) / 1e3, 1e-3)
    emit("pipeline", "events_per_s", rate, "1/s", events=events, partitions=settings.partitions,
         batch_size=settings.batch_size)
    return rate


def freshness(base: Settings, work_dir: Path, rate: float, seconds: float, timeout_s: float) -> None:
    settings = _prepare(base, work_dir, "freshness")
    records = _records(int(rate * seconds))
    worker = start_worker(settings, work_dir / "freshness-worker.log")
    try:
        time.sleep(15.0)  # let the worker join its group before the clock starts
        client = producer(settings.kafka_bootstrap)
        started = time.monotonic()
        for i, (key, value) in enumerate(records):
            ahead = started + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            client.send(settings.behaviors_topic, key=key, value=value)
        client.flush()
        client.close()
        _wait_for_states(settings, len(records), timeout_s, worker)
    finally:
        stop_worker(worker)
    produced = {(p, o): ts for p, o, _k, _v, _h, ts in read_topic(
        settings.kafka_bootstrap, settings.behaviors_topic, with_timestamps=True)}
    ages = np.array([ts - produced[(p, decode_user_state(v).applied_offset)] for p, ts, v in _published(settings)])
    for q in (50, 99):
        emit("pipeline", f"freshness_p{q}_ms", float(np.percentile(ages, q)), "ms", offered_events_per_s=rate,
             seconds=seconds, states=len(ages))


def run(base: Settings, work_dir: Path, events: int, rate: float | None, seconds: float, timeout_s: float) -> None:
    measured = throughput(base, work_dir, events, timeout_s)
    freshness(base, work_dir, rate or measured / 2, seconds, timeout_s)
