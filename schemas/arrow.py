"""The event and state contracts as Arrow schemas, and vectorised event validation.

Parquet and Arrow files carry the same contracts as the topics: the event schema follows
:class:`vql.schemas.events.BehaviorEvent` field for field (``context.extra`` travels as a JSON
string, since its values are of mixed types), the state schema follows
:class:`vql.schemas.user_state.UserState`. Files exported from a topic also carry where each
record came from (``partition``, ``offset``, ``timestamp_ms``), which lets a replay from the
file give exactly the states a replay of the topic gives.

:func:`validate_events` applies the checks of :func:`vql.schemas.decode.decode_event` that
still mean something for columns (null, range, enum, schema version, clock and horizon) to a
whole table at once, so that a file replay never runs Python per event.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vql.schemas.decode import EventPolicy, Reason
from vql.schemas.events import MAX_ID_LENGTH, SCHEMA_VERSION, Action, BehaviorEvent, EventContext, Modality

CONTEXT_TYPE = pa.struct([
    pa.field("category", pa.int64(), nullable=False),
    pa.field("modality", pa.string(), nullable=False),
    pa.field("extra", pa.string()),  # JSON object, or null for none
])
_TYPES = {
    "schema_version": pa.int32(), "event_id": pa.string(), "user_id": pa.string(), "item_id": pa.int64(),
    "action": pa.string(), "event_time_ms": pa.int64(), "context": CONTEXT_TYPE,
}
if set(_TYPES) != set(BehaviorEvent.model_fields) or \
        {f.name for f in CONTEXT_TYPE} != set(EventContext.model_fields):  # pragma: no cover
    raise ImportError("schemas/arrow.py is out of step with BehaviorEvent: update both together")

SOURCE_FIELDS = [  # where an exported event was read from; optional in files
    pa.field("partition", pa.int32()),
    pa.field("offset", pa.int64()),
    pa.field("timestamp_ms", pa.int64()),
]
EVENT_SCHEMA = pa.schema(
    [pa.field(name, _TYPES[name], nullable=name == "schema_version",
              metadata={"description": (BehaviorEvent.model_fields[name].description or "")})
     for name in BehaviorEvent.model_fields],
    metadata={"vql.contract": "BehaviorEvent", "vql.schema_version": str(SCHEMA_VERSION),
              "vql.actions": json.dumps([a.value for a in Action]),
              "vql.modalities": json.dumps([m.value for m in Modality])},
)
# File metadata of an export: {partition: last offset read}, rejected records included, so
# that a replay of the file ends each partition where a replay of the topic would.
LAST_OFFSETS = "vql.last_offsets"
# File metadata of an export: the partition count of the topic it read, against which a file
# replay judges each row's partition (schemas/placement.py).
SOURCE_PARTITIONS = "vql.source_partitions"
EXPORT_SCHEMA = pa.schema(list(EVENT_SCHEMA) + SOURCE_FIELDS, metadata=EVENT_SCHEMA.metadata)


class FileSchemaError(ValueError):
    """A file's columns do not carry the event contract; the message names the column."""


def conform_events(table: pa.Table, source: str) -> pa.Table:
    """``table`` cast to :data:`EXPORT_SCHEMA` (source columns kept when present); integer
    widths may differ, anything else raises :class:`FileSchemaError`."""
    names = set(table.column_names)
    missing = [f.name for f in EVENT_SCHEMA if f.name not in names and f.name != "schema_version"]
    if missing:
        raise FileSchemaError(f"{source}: missing column(s) {', '.join(missing)} (see docs/replay.md)")
    fields = [f for f in EXPORT_SCHEMA if f.name in names or f.name == "schema_version"]
    columns = []
    for field in fields:
        if field.name not in names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if field.name == "context":
            column = _conform_context(column, source)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise FileSchemaError(f"{source}: column {field.name} is {column.type}, "
                                  f"the contract says {field.type}") from exc
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=EXPORT_SCHEMA.metadata))


def _conform_context(column: pa.ChunkedArray, source: str) -> pa.ChunkedArray:
    if not pa.types.is_struct(column.type):
        raise FileSchemaError(f"{source}: column context is {column.type}, the contract says {CONTEXT_TYPE}")
    present = {column.type.field(i).name for i in range(column.type.num_fields)}
    missing = [name for name in ("category", "modality") if name not in present]
    if missing:
        raise FileSchemaError(f"{source}: column context has no field {', '.join(missing)}")
    if "extra" in present:
        return column
    try:
        chunks = [pa.StructArray.from_arrays(
            [chunk.field("category").cast(pa.int64()), chunk.field("modality").cast(pa.string()),
             pa.nulls(len(chunk), pa.string())],
            fields=list(CONTEXT_TYPE), mask=chunk.is_null()) for chunk in column.chunks]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise FileSchemaError(f"{source}: column context is {column.type}, the contract says {CONTEXT_TYPE}") from exc
    return pa.chunked_array(chunks, CONTEXT_TYPE)


def validate_events(table: pa.Table, now_ms: int | np.ndarray, policy: EventPolicy) -> np.ndarray:
    """Per row, the index into ``list(Reason)`` of why the event is rejected, or -1 when
    valid: decode_event's checks in its order, vectorised (``table`` as conform_events gives).
    ``now_ms``: what event times are judged against, one for all or one per row."""
    context = table.column("context")
    category = pc.struct_field(context, "category")
    modality = pc.struct_field(context, "modality")
    version = table.column("schema_version").fill_null(SCHEMA_VERSION)
    event_time = table.column("event_time_ms")

    def bad_id(name: str) -> pa.ChunkedArray:
        length = pc.utf8_length(table.column(name))
        return pc.or_kleene(pc.less(length, 1), pc.greater(length, MAX_ID_LENGTH))

    schema_violation = [
        pc.less(version, 1),
        bad_id("event_id"), bad_id("user_id"),
        pc.less(table.column("item_id"), 0), pc.less(category, 0),
        pc.invert(pc.is_in(table.column("action"), pa.array([a.value for a in Action]))),
        pc.invert(pc.is_in(modality, pa.array([m.value for m in Modality]))),
        pc.less(event_time, 0), pc.greater(event_time, 2**53),
    ]
    reason = np.full(table.num_rows, -1, np.int64)
    order = list(Reason)
    checks = [  # later checks win only where earlier ones passed: assign in reverse
        (Reason.EVENT_TIME_BEFORE_HORIZON, pc.less(event_time, policy.min_event_time_ms)),
        (Reason.FUTURE_EVENT_TIME, pc.greater(event_time, _latest_allowed(now_ms, policy, table.num_rows))),
        (Reason.UNKNOWN_SCHEMA_VERSION, pc.not_equal(version, SCHEMA_VERSION)),
        (Reason.SCHEMA_VIOLATION, _any(schema_violation + [_nulls(table)])),
    ]
    for why, mask in checks:
        reason[_true(mask)] = order.index(why)
    return reason


def _latest_allowed(now_ms: int | np.ndarray, policy: EventPolicy, rows: int) -> pa.ChunkedArray | int:
    """The latest event time accepted: ``now_ms`` plus the skew, a column when ``now_ms`` is
    one per row (a scalar stays one)."""
    if np.ndim(now_ms) == 0:
        return int(now_ms) + policy.max_future_skew_ms
    latest = np.asarray(now_ms, np.int64).reshape(rows) + np.int64(policy.max_future_skew_ms)
    return pa.chunked_array([pa.array(latest)])


def _nulls(table: pa.Table) -> pa.ChunkedArray:
    """A null in any field the contract requires (a null context is one too)."""
    context = table.column("context")
    required = [table.column(f.name) for f in EVENT_SCHEMA if not f.nullable] + [
        pc.struct_field(context, "category"), pc.struct_field(context, "modality")]
    return _any([pc.is_null(c) for c in required])


def _any(masks: list) -> pa.ChunkedArray:
    out = masks[0]
    for mask in masks[1:]:
        out = pc.or_kleene(out, mask)
    return out


def _true(mask) -> np.ndarray:
    """A boolean (possibly nullable) Arrow mask as a numpy bool array; null counts as false."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def state_schema(groups: int, codes: int, rates: int, dim: int) -> pa.Schema:
    """Published states as rows: header fields, then the dense cells in float32 (the
    published precision), ``log_count`` -inf for an empty cell; shape in the metadata."""
    cells = groups * codes * rates
    return pa.schema([
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("landmark_t0", pa.float64(), nullable=False),
        pa.field("last_event_time", pa.float64(), nullable=False),
        pa.field("event_count", pa.int64(), nullable=False),
        pa.field("applied_offset", pa.int64(), nullable=False),
        pa.field("log_count", pa.list_(pa.float32(), cells), nullable=False),
        pa.field("mean", pa.list_(pa.float32(), cells * dim), nullable=False),
    ], metadata={"vql.contract": "UserState", "vql.shape": json.dumps([groups, codes, rates, dim])})
