"""`vql replay --files`: rebuild user states from Parquet or Arrow files, columnar end to end.

pyarrow -> the event contract (schemas/arrow.py) -> vectorised validation -> duplicate event
ids dropped (Arrow dictionary encoding, one sort) -> :meth:`VQLModel.encode` once per distinct
feature row -> :func:`vql.model.state.fold_events` per USERS_PER_CHUNK users -> the worker's
stores (and, optionally, the states topic) through the same :class:`StateSink` as a topic
replay, each chunk written as soon as it is folded. Python runs per user (state objects)
and per chunk, never per event. The partitions are folded by forked jobs, one per core
(streams/jobs.py): each has its own stores, so they share nothing but the prepared events.

Events exported from a topic carry ``partition`` and ``offset``: their states land in the
store of that partition with the offsets as applied offsets, which makes them equal to a
replay of the topic and lets a worker continue from the store. Files without them get the
Kafka default partitioner's partition for their user and the row's position in the input
as offset (rows number from 0 over the files in the order given): resumable, but not a
store for a worker to continue on a live topic.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns, hash_buckets
from vql.model.state import fold_events
from vql.schemas.arrow import LAST_OFFSETS, SOURCE_PARTITIONS, FileSchemaError, conform_events, validate_events
from vql.schemas.decode import Reason
from vql.schemas.event_time import NO_TIMESTAMP, fold_time_s, judged_against_ms
from vql.schemas.events import Action, Modality
from vql.schemas.placement import partitions_of
from vql.streams.jobs import cpu_seconds, deal, default_jobs, safe_jobs
from vql.streams.processor import BatchProcessor, BatchResult
from vql.streams.replay import (
    ReplayReport,
    arrow_system_pool,
    close_sink,
    open_sink,
    run_replay_jobs,
    torch_threads,
)
from vql.streams.settings import Settings
from vql.streams.topics import ensure_topics

USERS_PER_CHUNK = 512  # users folded together: ~13 MB of float64 states, memory each chunk reuses
ENCODE_BATCH = 8192  # rows per encode call: the encoder's sweet spot on CPU (docs/performance.md)


def read_events(paths: Sequence[Path]) -> pa.Table:
    """All rows of the files, in order, cast to the event contract. Parquet, or Arrow IPC
    (``.arrow``, ``.feather``, ``.ipc``); FileSchemaError for anything else."""
    tables = []
    for path in paths:
        fmt = _format(path)
        try:
            table = ds.dataset(str(path), format=fmt).to_table()
        except (pa.ArrowInvalid, OSError) as exc:
            raise FileSchemaError(f"{path}: not a readable {fmt} file: {exc}") from exc
        tables.append(conform_events(table, str(path)))
    if not tables:
        raise FileSchemaError("no input files given")
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise FileSchemaError(f"the files' columns differ: {exc}") from exc


def last_offsets(paths: Sequence[Path]) -> dict[int, int]:
    """Per partition, the last offset an export read (its file metadata; empty without)."""
    last: dict[int, int] = {}
    for path in paths:
        if _format(path) != "parquet":
            continue
        metadata = (pq.read_metadata(path).metadata or {}).get(LAST_OFFSETS.encode())
        for partition, offset in (json.loads(metadata) if metadata else {}).items():
            last[int(partition)] = max(last.get(int(partition), -1), int(offset))
    return last


def _format(path: Path) -> str:
    return "ipc" if path.suffix in (".arrow", ".feather", ".ipc") else "parquet"


def encode_distinct(model: VQLModel, columns: BehaviorColumns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``model.encode`` once per distinct (item bucket, action, category bucket, modality),
    on which alone codes and values depend (popular items repeat across histories): the
    distinct rows' codes (m, G) and values (m, G, D), and each row's index among them. Row i
    encodes to ``codes[index[i]], values[index[i]]``; the chunks gather their own rows, so
    that no (n, G, D) array of every event is built."""
    cfg = model.config
    key = hash_buckets(columns.item, cfg.item_buckets)
    for part, size in ((columns.action, len(Action)), (hash_buckets(columns.category, cfg.category_buckets),
                                                       cfg.category_buckets), (columns.modality, len(Modality))):
        key = key * size + part
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    codes, values = [], []
    for lo in range(0, first.size, ENCODE_BATCH):
        rows = first[lo:lo + ENCODE_BATCH]
        c, v = model.encode(BehaviorColumns(columns.item[rows], columns.action[rows], columns.category[rows],
                                            columns.modality[rows], columns.time_s[rows]))
        codes.append(c)
        values.append(v)
    if not codes:
        return (np.empty((0, cfg.groups), np.int64), np.empty((0, cfg.groups, cfg.group_dim), np.float32),
                inverse.astype(np.int64))
    return np.concatenate(codes), np.concatenate(values), inverse.astype(np.int64)


def user_partitions(user_ids: np.ndarray, partitions: int) -> np.ndarray:
    """Kafka's default partitioner (murmur2 of the key), once per distinct user."""
    return partitions_of([u.encode() for u in user_ids.tolist()], partitions)


def source_partitions(paths: Sequence[Path]) -> int | None:
    """The partition count of the topic an export read (its file metadata; None without, or
    when the files disagree)."""
    counts = set()
    for path in paths:
        metadata = (pq.read_metadata(path).metadata or {}) if _format(path) == "parquet" else {}
        counts.add(int(metadata[SOURCE_PARTITIONS.encode()]) if SOURCE_PARTITIONS.encode() in metadata else None)
    return counts.pop() if len(counts) == 1 else None


def _reject_misplaced(reason: np.ndarray, user: pa.DictionaryArray, partition: pa.ChunkedArray,
                      partitions: int) -> None:
    """Mark the valid rows not on their user's partition of ``partitions`` as wrong_partition
    (in ``reason``), as the worker dead-letters such records: a replay folds what it would."""
    rows = np.flatnonzero(reason < 0)
    expected = user_partitions(user.dictionary.to_numpy(zero_copy_only=False), partitions)
    found = partition.to_numpy().astype(np.int64)[rows]
    wrong = expected[user.indices.fill_null(0).to_numpy()[rows]] != found
    reason[rows[wrong]] = list(Reason).index(Reason.WRONG_PARTITION)


@dataclass
class _Events:
    """A replay's accepted events, prepared once (validated, deduplicated, encoded) for the
    jobs that fold its partitions: row i belongs to ``users[owner[i]]`` and encodes to
    ``codes[encoded_as[i]], values[encoded_as[i]]``."""

    users: np.ndarray
    owner: np.ndarray
    partition: np.ndarray
    offsets: np.ndarray
    times_s: np.ndarray
    codes: np.ndarray
    values: np.ndarray
    encoded_as: np.ndarray
    ends: dict[int, int] | None  # exported files: per partition, the last offset the export read
    sizes: dict[int, int] = field(init=False)  # rows per partition, those with any

    def __post_init__(self) -> None:
        # One sort, by partition then user, shared by every job: a partition's rows are a slice.
        self._order = np.lexsort((self.owner, self.partition))
        partitions, starts, counts = np.unique(self.partition[self._order], return_index=True, return_counts=True)
        self.sizes = dict(zip(partitions.tolist(), counts.tolist()))
        self._starts = dict(zip(partitions.tolist(), starts.tolist()))

    def rows(self, partition: int) -> np.ndarray:
        """The partition's rows, sorted by user."""
        start = self._starts[partition]
        return self._order[start:start + self.sizes[partition]]


def run_replay_files(
    paths: Sequence[Path],
    settings: Settings,
    model: VQLModel,
    version: str,
    publish: bool = False,
    now_ms: int | None = None,
    progress: bool = True,
    jobs: int | None = None,
) -> ReplayReport:
    """Replay the events of ``paths`` into the stores under ``settings.data_dir`` (store
    topic ``settings.behaviors_topic``, ``settings.partitions`` partitions unless the files
    say) and, with ``publish``, into ``settings.states_topic``. The partitions are folded by
    ``jobs`` processes (default ``settings.replay_jobs``; streams/jobs.py)."""
    started, cpu_started = time.perf_counter(), cpu_seconds()
    jobs = safe_jobs(jobs or settings.replay_jobs or default_jobs())
    with arrow_system_pool():
        with torch_threads(jobs):  # the encoder has the cores to itself until the jobs start
            report, events, settings = _prepare(paths, settings, model, now_ms)
        work = deal(events.sizes, jobs)
        if publish and len(work) > 1:
            ensure_topics(settings)  # once, before the jobs' producers race to create them

        def job(partitions: list[int], tick) -> ReplayReport:
            return asyncio.run(_fold_partitions(partitions, events, settings, model, version, publish, tick))

        return run_replay_jobs(work, job, int(events.owner.size), "replay files", progress, report,
                               (started, cpu_started))


def _prepare(paths: Sequence[Path], settings: Settings, model: VQLModel,
             now_ms: int | None) -> tuple[ReplayReport, _Events, Settings]:
    """Read, validate, drop repeated event ids and encode: what every partition's fold reads."""
    report = ReplayReport()
    table = read_events(paths)
    report.events_read = table.num_rows
    table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    policy = settings.event_policy()
    stamps = _record_timestamps(table)
    reason = validate_events(table, judged_against_ms(now_ms or int(time.time() * 1000), stamps), policy)
    user = _dictionary(table.column("user_id"))  # hashing in Arrow, not Python; null for a bad row
    exported = _has_offsets(table.filter(pa.array(reason < 0)))
    source = source_partitions(paths) if exported else None
    if source is not None:  # an export that says its topic's count: judge the rows' partitions
        reason = reason.copy()
        _reject_misplaced(reason, user, table.column("partition"), source)
    valid = reason < 0
    table = table.filter(pa.array(valid))
    # The duplicate-id check (Arrow's hashing, numpy's sort) and encoding the valid rows (torch)
    # each run mostly without the GIL, so they share the cores: 1.5 and 1.3 s one after the
    # other for 2 M events. Rows found repeated were encoded for nothing; they are rare.
    with ThreadPoolExecutor(1) as pool:
        checked = pool.submit(_repeated_ids, table.column("event_id"), user.indices.filter(pa.array(valid)),
                              table.column("offset" if exported else "row"))
        columns = BehaviorColumns.from_table(table)
        codes, values, encoded_as = encode_distinct(model, columns)
        repeated = checked.result()
    reason = reason.copy()
    reason[np.flatnonzero(valid)[repeated]] = list(Reason).index(Reason.DUPLICATE_EVENT_ID)
    for index, count in zip(*np.unique(reason[reason >= 0], return_counts=True)):
        report.dead_letters[list(Reason)[index].value] = int(count)
    accepted = reason < 0
    kept = np.ones(table.num_rows, bool)
    kept[repeated] = False
    # Folded at the worker's bounded time (schemas/event_time.py): the same for the same records.
    time_s = fold_time_s(table.column("event_time_ms").to_numpy(), stamps[valid], policy.max_landmark_lead_ms)[kept]
    table, encoded_as = table.filter(pa.array(kept)), encoded_as[kept]

    users = user.dictionary.to_numpy(zero_copy_only=False)  # those of rejected rows too: never folded
    owner = user.indices.fill_null(0).to_numpy()[accepted].astype(np.int64)
    if exported:
        partition = table.column("partition").to_numpy().astype(np.int64)
        offsets = table.column("offset").to_numpy()
        partitions = source or max(settings.partitions, int(partition.max(initial=-1)) + 1)
    else:
        partitions = settings.partitions
        partition = user_partitions(users, partitions)[owner]
        offsets = table.column("row").to_numpy()
    events = _Events(users, owner, partition, offsets, time_s, codes, values, encoded_as,
                     last_offsets(paths) if exported else None)
    return report, events, settings.model_copy(update={"partitions": partitions})


async def _fold_partitions(partitions: list[int], events: _Events, settings: Settings, model: VQLModel,
                           version: str, publish: bool, tick) -> ReplayReport:
    """Fold the partitions' events, USERS_PER_CHUNK users at a time, each chunk published (with
    ``publish``) and written as soon as it is folded: one job's work."""
    report = ReplayReport()
    # No cache: every user is folded once, in one chunk (small WriteBatches, whose memory the
    # next one reuses).
    processor = BatchProcessor(model, version, settings.data_dir, settings.behaviors_topic, settings.event_policy())
    sink = await open_sink(settings, processor, publish)
    failed = True
    try:
        for p in partitions:
            rows = events.rows(p)
            last = None
            if events.ends is not None:
                # The processed offset moves with the partition's last chunk: an interrupted
                # replay must not tell a worker (or a topic replay) that the partition is done.
                held = processor.cache(p).processed_offset()
                last = max(int(events.offsets[rows].max()), events.ends.get(p, -1), -1 if held is None else held)
            for chunk in _user_chunks(rows, events.owner):
                result = _fold(processor, p, chunk, events, last if chunk[-1] == rows[-1] else None)
                await sink.put(result, report)
                report.add(result, 0)  # rows were counted when read
                tick(chunk.size)
        failed = False
    finally:
        await close_sink(sink, failed)
        processor.close()
    return report


def _repeated_ids(event_ids: pa.ChunkedArray, users: pa.Array, order: pa.ChunkedArray) -> np.ndarray:
    """The rows (of valid events) whose event id their user sent before: a user's event id
    counts once, at its first occurrence in ``order`` (offsets, or row numbers), and later
    ones are rejected as duplicate_event_id, as the worker does. Ids are dictionary-encoded
    by Arrow (``users``: each row's user index), so the search is a sort of integers."""
    event = _dictionary(event_ids)
    pair = users.to_numpy(zero_copy_only=False).astype(np.int64) * len(event.dictionary) + event.indices.to_numpy()
    ranked = np.lexsort((order.to_numpy(), pair))
    return ranked[1:][pair[ranked][1:] == pair[ranked][:-1]]


def _record_timestamps(table: pa.Table) -> np.ndarray:
    """Each row's Kafka timestamp (an exported file carries it), NO_TIMESTAMP where none."""
    if "timestamp_ms" not in table.column_names:
        return np.full(table.num_rows, NO_TIMESTAMP, np.int64)
    return table.column("timestamp_ms").fill_null(NO_TIMESTAMP).to_numpy().astype(np.int64)


def _has_offsets(table: pa.Table) -> bool:
    """Whether the rows carry their source partition and offset (a `vql export events` file)."""
    return all(name in table.column_names and table.column(name).null_count == 0 for name in ("partition", "offset"))


def _dictionary(column: pa.ChunkedArray) -> pa.DictionaryArray:
    """The column dictionary-encoded as one array: encoding it chunk by chunk and unifying the
    chunks' dictionaries afterwards took 4x as long on 2 M event ids (2.0 s against 0.46 s)."""
    return pc.dictionary_encode(column.combine_chunks())


def _user_chunks(rows: np.ndarray, owner: np.ndarray) -> list[np.ndarray]:
    """``rows`` (sorted by user) cut at user boundaries into chunks of USERS_PER_CHUNK users."""
    starts = np.flatnonzero(np.r_[True, owner[rows][1:] != owner[rows][:-1]])
    cuts = starts[USERS_PER_CHUNK::USERS_PER_CHUNK]
    return np.split(rows, cuts)


def _fold(processor: BatchProcessor, partition: int, rows: np.ndarray, events: _Events,
          processed: int | None) -> BatchResult:
    """One chunk of users folded into their stored states (a resumed replay: what they applied
    is skipped by their applied offsets) or empty ones, by the worker's state math."""
    ids, local = np.unique(events.owner[rows], return_inverse=True)
    names = [str(u) for u in events.users[ids]]
    cfg = processor.model.config
    states = processor.cache(partition).load(names)
    distinct = events.encoded_as[rows]
    applied = fold_events(states, local, events.codes[distinct], events.values[distinct].astype(np.float64),
                          events.times_s[rows], np.asarray(cfg.decay_rates), events.offsets[rows])
    result = BatchResult(applied=int(applied.sum()), duplicates=int((~applied).sum()))
    changed = np.unique(local[applied])
    result.writes = [(partition, states if changed.size == len(states) else states.take(changed), processed)]
    return result
