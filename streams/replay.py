"""`vql replay` from a topic: rebuild user states from the event log with the worker's own code.

A replay drives the worker's :class:`BatchProcessor` (decode, duplicate checks, encode,
state math, one WriteBatch per partition) and :class:`Publisher` over the topic, with larger
batches and no consumer group, so its states are the live worker's by construction; its
partitions are dealt to forked jobs (streams/jobs.py), one per core.
It writes the store layout a worker uses (``data_dir/stores/<model version>/<topic>-<p>``),
with processed offsets and, when it publishes, changelog offsets, so a worker started on
that data dir and states topic continues where the replay stopped; with ``group`` it also
commits that consumer group's offsets, so the worker does not even re-read the topic.

Resumable: every flush publishes the users changed since, then writes them with the
partition's processed offset (:class:`StateSink`); a rerun starts every partition after its
processed offset, exactly as a restarted worker.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from tqdm import tqdm

from vql.model.encoder import VQLModel
from vql.streams.consumer import Publisher
from vql.streams.layout import check_layout
from vql.streams.jobs import cpu_seconds, deal, default_jobs, run_jobs, safe_jobs
from vql.streams.kafka_security import aiokafka_security
from vql.streams.processor import BatchProcessor, BatchResult, Record
from vql.streams.settings import Settings
from vql.streams.topics import admin, ensure_topics


@contextmanager
def torch_threads(threads: int = 1) -> Iterator[None]:
    """Encode on one intra-op thread meanwhile: the encoder's layers are small, and handing
    each op to a second thread costs more than it saves (on the 2-core CI machine with
    another job running: 1.85 M vs 0.11-0.56 M events/s at batches of 8k-131k rows).
    Throughput comes from large batches instead."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def arrow_system_pool() -> Iterator[None]:
    """Arrow allocates with the C library's malloc meanwhile, unless ARROW_DEFAULT_MEMORY_POOL
    chooses. pyarrow's default, mimalloc, hands memory back to the kernel and takes it again,
    which on the CI machine (a VM where a fresh page is expensive) cost a 2 M-event file
    replay 5.4 s of system time against 2.4-2.9 s with malloc, which keeps and reuses it."""
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        yield
        return
    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(before)


class ReplayError(RuntimeError):
    """A replay cannot start: missing topic, bad range, ... (one readable line)."""


@dataclass(frozen=True)
class TopicRange:
    """Which records of the topic to replay; None means from the start / to the head."""

    partitions: tuple[int, ...] | None = None
    from_offset: int | None = None
    to_offset: int | None = None  # exclusive
    from_time_ms: int | None = None
    to_time_ms: int | None = None  # exclusive


@dataclass
class ReplayReport:
    """What a replay did: enough for an operator to trust it (or not) at a glance."""

    events_read: int = 0
    applied: int = 0
    skipped: int = 0  # already applied (resumed run, redelivered offsets)
    dead_letters: Counter = field(default_factory=Counter)  # reason -> count
    users: set = field(default_factory=set)
    states_published: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of every process the replay ran in
    jobs: int = 1  # processes that folded it

    def summary(self) -> str:
        rejected = sum(self.dead_letters.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.dead_letters.items())) or "none"
        rate = self.events_read / self.seconds if self.seconds else 0.0
        jobs = f", {self.jobs} jobs" if self.jobs > 1 else ""
        return (f"read {self.events_read:,} events in {self.seconds:.1f} s ({rate:,.0f} events/s, "
                f"CPU {self.cpu_seconds:.1f} s{jobs}): applied {self.applied:,}, already applied {self.skipped:,}, "
                f"rejected {rejected:,} ({reasons}); {len(self.users):,} users changed, "
                f"{self.states_published:,} states published")

    def merge(self, other: "ReplayReport") -> None:
        """Add what ``other`` (one job of the same replay) did; times stay the caller's."""
        self.events_read += other.events_read
        self.applied += other.applied
        self.skipped += other.skipped
        self.dead_letters.update(other.dead_letters)
        self.users |= other.users
        self.states_published += other.states_published

    def add(self, result: BatchResult, records: int) -> None:
        self.events_read += records
        self.applied += result.applied
        self.skipped += result.duplicates
        self.dead_letters.update(letter.rejection.reason.value for letter in result.dead_letters)
        self.users.update(result.user_ids)


class StateSink:
    """Where a replay's batches go: into the stores' write-behind caches; every ``interval_s``
    (or when the caches outgrow their budget) each user changed since is published once,
    and then the caches are written with the changelog offsets that publication reached.
    The worker's order (states topic first, then RocksDB, then the input offsets), but
    coalesced, as design/pipeline.md has it: the worker publishes every batch because
    rankers wait for it, while nobody waits for a replay's intermediate states, and
    publishing them cost a topic replay more than its processing (docs/performance.md)."""

    PUBLISH_STATES = 4096  # states encoded and published at a time by a flush (~110 MB in float64)

    def __init__(self, processor: BatchProcessor, publisher: Publisher | None, interval_s: float) -> None:
        self.processor = processor
        self.publisher = publisher
        self.interval_s = interval_s
        self._flushed_at = time.monotonic()

    async def put(self, result: BatchResult, report: ReplayReport) -> dict[int, int]:
        """Cache a batch; returns the processed offsets a flush made durable (empty when none
        was due): what a resumable replay may commit."""
        self.processor.commit(result)
        if self.publisher and result.dead_letters:
            # Right away, not with the states: few, but one may be megabytes of original bytes.
            await self.publisher.publish(BatchResult(dead_letters=result.dead_letters))
        if self.processor.needs_flush() or time.monotonic() - self._flushed_at >= self.interval_s:
            return await self.flush(report)
        return {}

    async def flush(self, report: ReplayReport) -> dict[int, int]:
        """Publish what the caches hold unwritten (with ``publisher``), then write it."""
        if self.publisher:
            for pending in self.processor.unpublished(self.PUBLISH_STATES):
                self.processor.reached(await self.publisher.publish(pending))
                report.states_published += pending.state_count
        self._flushed_at = time.monotonic()
        return self.processor.flush()


async def open_sink(settings: Settings, processor: BatchProcessor, publish: bool) -> StateSink:
    """A sink for ``processor``'s stores; with ``publish``, states go to
    ``settings.states_topic`` (created compacted and co-partitioned if missing) and dead
    letters to ``settings.dlq_topic`` first."""
    if not publish:
        return StateSink(processor, None, settings.commit_interval_s)
    ensure_topics(settings)
    # Never into a states topic of another model or partition count (streams/layout.py).
    check_layout(settings.kafka_bootstrap, settings.states_topic, processor.model_version)
    return StateSink(processor, await Publisher.start(settings), settings.commit_interval_s)


async def close_sink(sink: StateSink, failed: bool = False) -> None:
    """Stop the sink's producer. After a failure, the caches' unpublished states are dropped
    first, so that closing the stores does not write states the states topic lacks (a rerun
    folds their records again, from the last flush)."""
    if failed and sink.publisher:
        sink.processor.discard()
    if sink.publisher:
        await sink.publisher.stop()  # its dead-letter producer too


def partition_count(settings: Settings, topic: str) -> int:
    """Partitions of an existing topic; ReplayError when it does not exist."""
    client = admin(settings.kafka_bootstrap)
    try:
        described = {t["name"]: len(t["partitions"]) for t in client.describe_topics([topic])
                     if not t.get("error_code")}
    except Exception as exc:  # kafka-python raises per-topic errors as plain exceptions here
        raise ReplayError(f"topic {topic} does not exist on {settings.kafka_bootstrap}") from exc
    finally:
        client.close()
    if not described.get(topic):
        raise ReplayError(f"topic {topic} does not exist on {settings.kafka_bootstrap}")
    return described[topic]


async def replay_topic(
    settings: Settings,
    model: VQLModel,
    version: str,
    ranges: dict[int, tuple[int, int]],
    publish: bool = True,
    group: str | None = None,
    batch_size: int = 32_768,
    tick: Callable[[int], None] = lambda records: None,
) -> ReplayReport:
    """Replay ``ranges`` (partition -> [start, end) offsets) of ``settings.behaviors_topic``
    with ``model`` into the stores under ``settings.data_dir`` and, with ``publish``, into
    ``settings.states_topic``: one job's work. Each partition starts after what its store
    holds already (a resumed replay); ``tick`` counts records done, skipped ones included."""
    processor = BatchProcessor(model, version, settings.data_dir, settings.behaviors_topic,
                               settings.event_policy(), event_id_window=settings.event_id_window,
                               cache_bytes=settings.state_cache_mb << 20, partitions=settings.partitions)
    consumer = replay_consumer(settings, group)
    await consumer.start()
    sink = await open_sink(settings, processor, publish)
    report, failed = ReplayReport(), True
    try:
        todo = {}
        for partition, (start, end) in ranges.items():
            done = processor.store(partition).processed_offset()
            resumed = start if done is None else min(end, max(start, done + 1))
            tick(resumed - start)
            if resumed < end:
                todo[TopicPartition(settings.behaviors_topic, partition)] = (resumed, end)
        consumer.assign(list(todo))
        for tp, (start, _end) in todo.items():
            consumer.seek(tp, start)
        while todo:
            records = await _next_batch(consumer, todo, batch_size)
            if not records:
                continue
            result = processor.process(records)
            await _commit(consumer, settings, group, await sink.put(result, report))
            report.add(result, len(records))
            tick(len(records))
        await _commit(consumer, settings, group, await sink.flush(report))
        failed = False
    finally:
        await close_sink(sink, failed)
        await consumer.stop()
        processor.close()
    return report


def replay_consumer(settings: Settings, group: str | None = None) -> AIOKafkaConsumer:
    """A consumer for reading a topic from end to end: large fetches, no group membership
    (``group`` only names whose offsets it may commit), offsets committed by hand."""
    return AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False,
                            max_partition_fetch_bytes=32 * 1024 * 1024, fetch_max_bytes=128 * 1024 * 1024,
                            fetch_max_wait_ms=100, **aiokafka_security())


async def _commit(consumer: AIOKafkaConsumer, settings: Settings, group: str | None,
                  durable: dict[int, int]) -> None:
    """With a consumer group, commit the offsets a flush made durable (monitoring, resuming)."""
    if group and durable:
        await consumer.commit({TopicPartition(settings.behaviors_topic, p): OffsetAndMetadata(o + 1, "")
                               for p, o in durable.items()})


async def topic_ranges(settings: Settings, span: TopicRange) -> dict[int, tuple[int, int]]:
    """Per partition, [start, end): the requested range clipped to the topic, ending at the
    head as of now. What the stores already hold is each job's to skip (:func:`replay_topic`)."""
    topic = settings.behaviors_topic
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                **aiokafka_security())
    await consumer.start()
    try:
        available = sorted(consumer.partitions_for_topic(topic) or range(settings.partitions))
        chosen = list(span.partitions) if span.partitions is not None else available
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise ReplayError(f"topic {topic} has partitions {available[0]}..{available[-1]}, not {unknown}")
        tps = [TopicPartition(topic, p) for p in chosen]
        begin, head = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        by_time = {}
        for name, when in (("from", span.from_time_ms), ("to", span.to_time_ms)):
            if when is not None:
                found = await consumer.offsets_for_times({tp: when for tp in tps})
                by_time[name] = {tp: head[tp] if hit is None else hit.offset for tp, hit in found.items()}
    finally:
        await consumer.stop()
    ranges = {}
    for tp in tps:
        start = max(begin[tp], span.from_offset or 0, by_time.get("from", {}).get(tp, 0))
        end = min(head[tp], span.to_offset if span.to_offset is not None else head[tp],
                  by_time.get("to", {}).get(tp, head[tp]))
        ranges[tp.partition] = (start, max(start, end))
    return ranges


async def _next_batch(consumer: AIOKafkaConsumer, todo: dict[TopicPartition, tuple[int, int]],
                      batch_size: int) -> list[Record]:
    """Up to ``batch_size`` records below each partition's end; finished partitions leave
    ``todo`` (and are paused, so fetches serve the others)."""
    records: list[Record] = []
    while todo and len(records) < batch_size:
        fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=batch_size - len(records))
        if not fetched:
            break
        for tp, messages in fetched.items():
            end = todo[tp][1]
            records.extend(m for m in messages if m.offset < end)
            if messages and messages[-1].offset >= end - 1:
                del todo[tp]
                consumer.pause(tp)
    return records


def run_replay_topic(
    settings: Settings,
    model: VQLModel,
    version: str,
    span: TopicRange = TopicRange(),
    jobs: int | None = None,
    progress: bool = True,
    **options,
) -> ReplayReport:
    """Replay ``span`` of ``settings.behaviors_topic`` (options: those of :func:`replay_topic`),
    its partitions dealt to ``jobs`` forked processes (default ``settings.replay_jobs``, or
    one per core; streams/jobs.py), each with its own consumer, stores and producer: the
    worker's per-record path takes a core per ~50,000 records/s, so one process cannot use
    a second core."""
    started, cpu_started = time.perf_counter(), cpu_seconds()
    settings = settings.model_copy(update={"partitions": partition_count(settings, settings.behaviors_topic)})
    ranges = asyncio.run(topic_ranges(settings, span))
    work = deal({p: end - start for p, (start, end) in ranges.items()},
                safe_jobs(jobs or settings.replay_jobs or default_jobs()))
    if options.get("publish", True) and len(work) > 1:
        ensure_topics(settings)  # once, before the jobs' producers race to create them

    def job(partitions: list[int], tick: Callable[[int], None]) -> ReplayReport:
        return asyncio.run(replay_topic(settings, model, version, {p: ranges[p] for p in partitions}, tick=tick,
                                        **options))

    with arrow_system_pool():
        return run_replay_jobs(work, job, sum(end - start for start, end in ranges.values()),
                               f"replay {settings.behaviors_topic}", progress, ReplayReport(), (started, cpu_started))


def run_replay_jobs(work: list[list[int]], job: Callable[[list[int], Callable[[int], None]], ReplayReport],
                    total: int, desc: str, progress: bool, report: ReplayReport,
                    started: tuple[float, float]) -> ReplayReport:
    """``job`` over each share of partitions in ``work`` (streams/jobs.py), under one progress
    bar of ``total`` units, each on one torch thread; what the jobs did is added to
    ``report``, which also gets the jobs and the wall-clock and CPU seconds since ``started``."""
    with torch_threads(), tqdm(total=total, unit="ev", unit_scale=True, desc=desc, disable=not progress) as bar:
        for part in run_jobs(work, job, bar.update):
            report.merge(part)
    report.jobs = len(work)
    report.seconds = time.perf_counter() - started[0]
    report.cpu_seconds = cpu_seconds() - started[1]
    return report
