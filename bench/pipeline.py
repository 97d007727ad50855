"""`vql bench pipeline`: one worker through the real broker, end to end.

Two measurements, each on fresh topics:

- throughput: a backlog of N events is produced first, then one worker drains it; the
  figure is events per second into published states once the first 10% are in (sustained,
  see :func:`sustained_rate`).
- freshness: events are offered at a fixed rate while the worker runs; for every published
  state, freshness = its Kafka timestamp minus that of the newest input record it includes
  (the state's applied offset, on the same partition: input and states are co-partitioned),
  whose timestamp is the time it was due.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaProducer
from kafka import TopicPartition

from vql.bench.broker_cpu import BrokerCpu
from vql.bench.report import emit
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.placement import partitions_of
from vql.schemas.user_state import read_state_header
from vql.streams.demo import start_worker, stop_worker
from vql.streams.demo_events import DemoSpec, generate, history_lengths
from vql.streams.kafka_security import aiokafka_security
from vql.streams.settings import Settings
from vql.streams.topics import ensure_topics, produce_all, read_topic, reader

# Demo users with a modest history each: the stream touches many users per batch. Both
# runs draw from the same 5,000 users, a longer run giving each user more events.
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
        spec = DemoSpec(users=spec.users, mean_events=spec.mean_events * 2, heavy_users=0)
    records = []
    for record in generate(spec, int(time.time() * 1000)):
        records.append(record)
        if len(records) == count:
            break
    return records


def _wait_until_committed(settings: Settings, timeout_s: float, worker) -> None:
    """Until the worker's group has committed every input offset: it commits only what it has
    published and written. Asks the broker for offsets instead of reading states meanwhile, so
    that the measurement takes no CPU from the worker it measures."""
    consumer = reader(settings.kafka_bootstrap, group_id=settings.app_id)  # never subscribes: no member
    try:
        partitions = [TopicPartition(settings.behaviors_topic, p) for p in range(settings.partitions)]
        end = consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while True:
            if all((consumer.committed(tp) or 0) >= end[tp] for tp in partitions):
                return
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"the worker did not commit all {sum(end.values())} events in {timeout_s} s")
            time.sleep(1.0)
    finally:
        consumer.close()


def _publications(settings: Settings, events: int) -> tuple[list[tuple[int, int, int]], int]:
    """(partition, timestamp ms, applied offset) of every state publication, in order, and
    the bytes of their values; checks that the users' latest states hold all ``events``."""
    publications, event_counts, state_bytes = [], {}, 0
    for partition, _offset, _key, value, _headers, ts in read_topic(
            settings.kafka_bootstrap, settings.states_topic, with_timestamps=True):
        header = read_state_header(memoryview(value))
        publications.append((partition, ts, header.applied_offset))
        event_counts[header.user_id] = header.event_count
        state_bytes += len(value)
    if sum(event_counts.values()) != events:
        raise RuntimeError(f"the latest states hold {sum(event_counts.values())} events, not {events}")
    return publications, state_bytes


def throughput(base: Settings, work_dir: Path, events: int, timeout_s: float) -> float:
    settings = _prepare(base, work_dir, "throughput")
    produce_all(settings.kafka_bootstrap, settings.behaviors_topic, _records(events))
    worker = start_worker(settings, work_dir / "throughput-worker.log")
    try:
        _wait_until_committed(settings, timeout_s, worker)
    finally:
        stop_worker(worker)
    rate = sustained_rate(_publications(settings, events)[0], events)
    emit("pipeline", "events_per_s", rate, "1/s", events=events, partitions=settings.partitions,
         batch_size=settings.batch_size)
    return rate


def sustained_rate(publications: list[tuple[int, int, int]], events: int, skip: float = 0.1) -> float:
    """Events per second into published states once the first ``skip`` of the backlog is in:
    from (partition, timestamp ms, applied offset) of every state publication, the input
    events covered by time t are, per partition, one more than the highest applied offset
    published by t. Timing from the first publication would credit the first batch's events
    to no time at all, which flatters large batches."""
    covered: dict[int, int] = {}
    start_ms = start_events = None
    last_ms = 0
    for partition, ts, offset in sorted(publications, key=lambda p: p[1]):
        covered[partition] = max(covered.get(partition, 0), offset + 1)
        last_ms = ts
        if start_ms is None and sum(covered.values()) >= skip * events:
            start_ms, start_events = ts, sum(covered.values())
    if start_ms is None or last_ms <= start_ms:
        raise RuntimeError("too few state publications to time the drain: produce more events")
    return (sum(covered.values()) - start_events) / ((last_ms - start_ms) / 1e3)


async def _offer(settings: Settings, records: list[tuple[bytes, bytes]], rate: float) -> None:
    """Produce ``records`` at ``rate`` per second, each stamped with the time it was due
    (so a load generator that falls behind shows as staleness, not as a lower load). Records
    go out as producer batches per partition every few ms, through aiokafka's batch builder:
    a kafka-python send per record costs ~25 us, which on two cores took CPU from the worker
    under test."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=0,
                                **aiokafka_security())
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(settings.behaviors_topic))
        target = partitions_of([key for key, _value in records], len(partitions)).tolist()
        started_s, started_ms, sent, deliveries = time.monotonic(), time.time() * 1000, 0, []
        while sent < len(records):
            due = min(len(records), int((time.monotonic() - started_s) * rate) + 1)
            batches: dict[int, object] = {}
            for i in range(sent, due):
                key, value = records[i]
                due_ms = int(started_ms + i * 1000 / rate)
                batch = batches.get(target[i])
                if batch is None or batch.append(key=key, value=value, timestamp=due_ms) is None:
                    if batch is not None:  # full: send it, start the next
                        deliveries.append(await producer.send_batch(batch, settings.behaviors_topic,
                                                                    partition=partitions[target[i]]))
                    batches[target[i]] = batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=due_ms)
            for partition, batch in batches.items():
                deliveries.append(await producer.send_batch(batch, settings.behaviors_topic,
                                                            partition=partitions[partition]))
            sent = due
            await asyncio.sleep(0.005)
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


def freshness(base: Settings, work_dir: Path, rate: float, seconds: float, timeout_s: float) -> None:
    """Freshness p50/p99 at ``rate``; then what the states cost the broker: the megabytes of
    states published per second of the run (load and drain), the broker's CPU meanwhile (in
    cores, when it runs on this machine), and its CPU per megabyte of states."""
    settings = _prepare(base, work_dir, "freshness")
    records = _records(int(rate * seconds))
    broker = BrokerCpu.find(settings.kafka_bootstrap)
    worker = start_worker(settings, work_dir / "freshness-worker.log")
    try:
        time.sleep(15.0)  # let the worker join its group before the clock starts
        started, broker_started = time.monotonic(), broker.cpu_seconds() if broker else 0.0
        asyncio.run(_offer(settings, records, rate))
        _wait_until_committed(settings, timeout_s, worker)
        elapsed, broker_cpu = time.monotonic() - started, broker.cpu_seconds() - broker_started if broker else None
    finally:
        stop_worker(worker)
    produced = {(p, o): ts for p, o, _k, _v, _h, ts in read_topic(
        settings.kafka_bootstrap, settings.behaviors_topic, with_timestamps=True)}
    publications, state_bytes = _publications(settings, len(records))
    ages = np.array([ts - produced[(p, offset)] for p, ts, offset in publications])
    run = {"offered_events_per_s": rate, "seconds": seconds}
    for q in (50, 99):
        emit("pipeline", f"freshness_p{q}_ms", float(np.percentile(ages, q)), "ms", **run, states=len(ages))
    emit("pipeline", "states_mb_per_s", state_bytes / 1e6 / elapsed, "MB/s", **run, run_seconds=round(elapsed, 1))
    if broker_cpu is not None:
        emit("pipeline", "broker_cpu_cores", broker_cpu / elapsed, "cores", **run, run_seconds=round(elapsed, 1))
        emit("pipeline", "broker_cpu_ms_per_state_mb", broker_cpu * 1e3 / (state_bytes / 1e6), "ms/MB", **run)


def run(base: Settings, work_dir: Path, events: int, rate: float | None, seconds: float, timeout_s: float) -> None:
    measured = throughput(base, work_dir, events, timeout_s)
    freshness(base, work_dir, rate or measured / 2, seconds, timeout_s)
