"""`vql export` and `vql import`: events and states between topics and Parquet files.

Exported events are validated by the worker's own decoder (records it would dead-letter are
counted by reason and left out); deletions are honoured: a user's events before their last
delete request (schemas/control.py) are left out, as the worker forgot them, and keep their source partition, offset and timestamp, so a
replay of the file equals a replay of the topic. Exported states are the published float32
states, one row each (the latest per user). Import produces events back as the JSON the
worker reads, keyed by user id; validation stays the worker's job (bad rows dead-letter).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from vql.schemas.arrow import EXPORT_SCHEMA, LAST_OFFSETS, SOURCE_PARTITIONS, state_schema
from vql.schemas.control import DeleteUser, decode_control, is_control
from vql.schemas.decode import EventPolicy, Reason, Rejection, decode_event
from vql.schemas.events import BehaviorEvent
from vql.schemas.user_state import StateFormatError, UserState, decode_user_state
from vql.streams.replay_files import read_events
from vql.streams.topics import latest_by_key, produce_all, read_topic, topic_partitions

ROW_GROUP = 65_536


def export_events(bootstrap: str, topic: str, out: Path, policy: EventPolicy,
                  progress: bool = True) -> tuple[int, Counter]:
    """Write the valid events of ``topic`` to ``out``, less those a later delete request of
    their user deleted; return (rows written, rejected by reason)."""
    rejected: Counter = Counter()
    deletes: dict[str, tuple[int, int]] = {}  # user -> (partition, offset) of its last delete request
    now_ms = int(time.time() * 1000)
    written = 0
    last: dict[int, int] = {}  # partition -> last offset read, rejected records included
    partitions = topic_partitions(bootstrap, topic)  # recorded: what a file replay judges rows against
    with pq.ParquetWriter(out, EXPORT_SCHEMA) as writer, \
            tqdm(desc=f"export {topic}", unit="ev", unit_scale=True, disable=not progress) as bar:
        rows: list[tuple[BehaviorEvent, int, int, int]] = []
        for partition, offset, key, value, headers, timestamp in read_topic(bootstrap, topic, with_timestamps=True):
            last[partition] = offset
            if key is None:
                # The worker dead-letters it: its user's partition is unknown. A misplaced
                # record is kept, with its partition: a file replay judges it against the
                # recorded count as the worker would, and `vql import` places it by its key
                # (a partition-count change, docs/operations.md).
                rejected[Reason.MISSING_KEY.value] += 1
                continue
            if is_control(headers):
                request = decode_control(key, value, headers)
                if isinstance(request, DeleteUser):
                    deletes[request.user_id] = (partition, offset)
                else:
                    rejected[request.reason.value] += 1
                continue
            decoded = decode_event(value, key, max(now_ms, timestamp), policy)  # schemas/event_time.py
            if isinstance(decoded, Rejection):
                rejected[decoded.reason.value] += 1
            else:
                rows.append((decoded, partition, offset, timestamp))
            if len(rows) == ROW_GROUP:
                writer.write_table(_event_table(rows))
                written += len(rows)
                bar.update(len(rows))
                rows = []
        if rows:
            writer.write_table(_event_table(rows))
            written += len(rows)
            bar.update(len(rows))
        metadata = {LAST_OFFSETS: json.dumps(last), SOURCE_PARTITIONS: str(partitions)}
        writer.add_key_value_metadata(metadata)
    if deletes:
        written = _drop_deleted(out, deletes, metadata)
    return written, rejected


def _drop_deleted(path: Path, deletes: dict[str, tuple[int, int]], metadata: dict[str, str]) -> int:
    """Rewrite the export at ``path`` (with its file ``metadata``) without the events at or
    before their user's last delete request (on the request's partition); returns the rows
    kept. A second pass over
    the file, not the topic: deletions are known only once the whole topic is read."""
    users = pa.array(list(deletes), pa.string())
    partitions = np.array([p for p, _o in deletes.values()], np.int64)
    offsets = np.array([o for _p, o in deletes.values()], np.int64)
    staged = path.with_name(path.name + ".tmp")
    kept = 0
    source = pq.ParquetFile(path)
    with pq.ParquetWriter(staged, EXPORT_SCHEMA) as writer:
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            which = pc.index_in(table.column("user_id"), value_set=users).fill_null(-1).to_numpy()
            hit = which >= 0
            at = which.clip(min=0)
            deleted = hit & (table.column("partition").to_numpy() == partitions[at]) \
                & (table.column("offset").to_numpy() <= offsets[at])
            table = table.filter(pa.array(~deleted))
            writer.write_table(table)
            kept += table.num_rows
        writer.add_key_value_metadata(metadata)
    staged.replace(path)
    return kept


def _event_table(rows: Sequence[tuple[BehaviorEvent, int, int, int]]) -> pa.Table:
    columns = {
        "schema_version": [e.schema_version for e, *_ in rows],
        "event_id": [e.event_id for e, *_ in rows],
        "user_id": [e.user_id for e, *_ in rows],
        "item_id": [e.item_id for e, *_ in rows],
        "action": [e.action.value for e, *_ in rows],
        "event_time_ms": [e.event_time_ms for e, *_ in rows],
        "context": [{"category": e.context.category, "modality": e.context.modality.value,
                     "extra": orjson.dumps(e.context.extra).decode() if e.context.extra else None}
                    for e, *_ in rows],
        "partition": [p for _e, p, _o, _t in rows],
        "offset": [o for _e, _p, o, _t in rows],
        "timestamp_ms": [t for _e, _p, _o, t in rows],
    }
    return pa.Table.from_pydict(columns, schema=EXPORT_SCHEMA)


def export_states(bootstrap: str, topic: str, out: Path) -> int:
    """Write the latest state of every user in ``topic`` to ``out``; return the row count."""
    states: list[UserState] = []
    for key, value in latest_by_key(read_topic(bootstrap, topic, idle_s=1.0)).items():
        try:
            states.append(decode_user_state(value))
        except StateFormatError as exc:
            raise StateFormatError(f"{topic} key {key!r}: {exc}") from exc
    if not states:
        raise ValueError(f"{topic} holds no states")
    schema = state_schema(*states[0].shape)
    table = pa.Table.from_pydict({
        "user_id": [s.user_id for s in states],
        "model_version": [s.model_version for s in states],
        "landmark_t0": [s.landmark_t0 for s in states],
        "last_event_time": [s.last_event_time for s in states],
        "event_count": [s.event_count for s in states],
        "applied_offset": [s.applied_offset for s in states],
        "log_count": _fixed_lists([s.log_count for s in states], schema.field("log_count").type),
        "mean": _fixed_lists([s.mean for s in states], schema.field("mean").type),
    }, schema=schema)
    pq.write_table(table, out)
    return table.num_rows


def _fixed_lists(arrays: list[np.ndarray], kind: pa.FixedSizeListType) -> pa.FixedSizeListArray:
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), kind.list_size)


def import_events(paths: Sequence[Path], bootstrap: str, topic: str, progress: bool = True) -> int:
    """Produce the rows of ``paths`` to ``topic`` as JSON events keyed by user id; returns
    the count. Source columns (partition, offset) are not reused: Kafka assigns new ones."""
    table = read_events(paths)
    return produce_all(bootstrap, topic, _json_records(table), table.num_rows,
                       f"import to {topic}" if progress else None)


def _json_records(table: pa.Table) -> Iterator[tuple[bytes | None, bytes]]:
    fields = [f.name for f in EXPORT_SCHEMA if f.name in BehaviorEvent.model_fields]
    for batch in table.select(fields).to_batches(max_chunksize=ROW_GROUP):
        for row in batch.to_pylist():
            context = row["context"] or {}
            extra = context.pop("extra", None)
            if extra:
                context["extra"] = orjson.loads(extra)
            if row["schema_version"] is None:
                row["schema_version"] = 1
            user = row["user_id"]
            yield (None if user is None else user.encode()), orjson.dumps(row)
