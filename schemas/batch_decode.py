"""A micro-batch of raw records -> one Arrow table of valid events, without Python per event.

The worker's per-event cost was pydantic's ``validate_json`` (~6 us a record on the 2-core
machine, docs/performance.md). Here the batch's values are joined into one newline-delimited
buffer and parsed by Arrow's JSON reader against the event contract (strict: a value of the
wrong JSON type, an unknown field, a repeated key or a malformed token fails the parse), then
checked column-wise by :func:`vql.schemas.arrow.validate_events`.

:func:`vql.schemas.decode.decode_event` stays the authority. The fast path only *accepts*:
a record it cannot accept with certainty goes to ``decode_event``, which either accepts it
too or says why not, with the same reason and detail as ever. Records never tried fast:
no value, oversized, not starting with ``{``, containing a line break (which would split a
line) or the token ``null`` (Arrow reads null and absent alike; pydantic tells them apart).
A block the reader refuses is split in halves until the records it refuses stand alone.
tests/test_batch_decode.py holds the two paths equal on the bad-input corpus and on
generated records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from vql.schemas.arrow import validate_events
from vql.schemas.decode import EventPolicy, Rejection, decode_event
from vql.schemas.events import BehaviorEvent

DECODED_CONTEXT = pa.struct([pa.field("category", pa.int64()), pa.field("modality", pa.string())])
DECODED_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.int64()), ("action", pa.string()),
    ("event_time_ms", pa.int64()), ("context", DECODED_CONTEXT),
])
# What the reader parses against: the contract, with `extra` allowed only empty (its values
# are of mixed types: a non-empty one is an unexpected field here and goes to pydantic).
_JSON_SCHEMA = pa.schema([
    ("schema_version", pa.int64()), *list(DECODED_SCHEMA)[:5],
    ("context", pa.struct([*DECODED_CONTEXT, pa.field("extra", pa.struct([]))])),
])
_PARSE = pj.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="error",
                         newlines_in_values=False)


@dataclass
class DecodedBatch:
    """The valid events of a batch as columns (``table``, in input order, :data:`DECODED_SCHEMA`),
    the input position of each (``index``), and every rejected position with its reason."""

    table: pa.Table
    index: np.ndarray
    rejections: list[tuple[int, Rejection]] = field(default_factory=list)


def decode_batch(raws: Sequence[bytes | None], keys: Sequence[bytes | None], now_ms: int | np.ndarray,
                 policy: EventPolicy) -> DecodedBatch:
    """Parse and validate a batch of record values (with their keys); never raises on bad input.
    ``now_ms``: what event times are judged against, one for all or one per record
    (schemas/event_time.py)."""
    now = np.broadcast_to(np.asarray(now_ms, np.int64), (len(raws),))
    fast, buffer = _candidates(raws, policy)
    tables: list[pa.Table] = []
    parsed: list[np.ndarray] = []
    slow: list[int] = np.flatnonzero(~fast).tolist()
    _parse(raws, np.flatnonzero(fast), tables, parsed, slow, buffer)
    fast_table = pa.concat_tables(tables) if tables else _JSON_SCHEMA.empty_table()
    fast_index = np.concatenate(parsed) if parsed else np.empty(0, np.int64)

    reason = validate_events(fast_table, now[fast_index], policy)
    key_ok = _keys_match(fast_table.column("user_id"), [keys[i] for i in fast_index.tolist()])
    good = (reason < 0) & key_ok
    slow.extend(fast_index[~good].tolist())
    accepted = [_drop_extra(fast_table.filter(pa.array(good)))]
    index = [fast_index[good]]

    rejections: list[tuple[int, Rejection]] = []
    rescued: list[BehaviorEvent] = []
    rescued_index: list[int] = []
    for i in sorted(slow):
        decoded = decode_event(raws[i], keys[i], int(now[i]), policy)
        if isinstance(decoded, Rejection):
            rejections.append((i, decoded))
        else:
            rescued.append(decoded)
            rescued_index.append(i)
    if rescued:
        accepted.append(pa.Table.from_pylist([_row(e) for e in rescued], schema=DECODED_SCHEMA))
        index.append(np.asarray(rescued_index, np.int64))
    table = pa.concat_tables(accepted)
    positions = np.concatenate(index)
    order = np.argsort(positions, kind="stable")
    if not np.array_equal(order, np.arange(order.size)):
        table, positions = table.take(pa.array(order)), positions[order]
    return DecodedBatch(table, positions, rejections)


def _candidates(raws: Sequence[bytes | None], policy: EventPolicy) -> tuple[np.ndarray, bytes | None]:
    """Which records the fast path may try (see the module docstring), and, when that is
    all of them, their values already joined: a handful of scans of one buffer decide the
    common case; only a batch that fails them is looked at record by record."""
    if raws and None not in raws and max(map(len, raws)) <= policy.max_event_bytes:  # type: ignore[arg-type]
        buffer = b"\n".join(raws)  # type: ignore[arg-type]
        lines = len(raws) - 1
        if (buffer[:1] == b"{" and buffer.count(b"\n") == lines and buffer.count(b"\n{") == lines
                and b"\r" not in buffer and b"null" not in buffer):
            return np.ones(len(raws), bool), buffer
    limit = policy.max_event_bytes
    return np.fromiter((raw is not None and len(raw) <= limit and raw[:1] == b"{" and b"\n" not in raw
                        and b"\r" not in raw and b"null" not in raw for raw in raws), bool, len(raws)), None


def _parse(raws: Sequence[bytes | None], rows: np.ndarray, tables: list, parsed: list, slow: list,
           buffer: bytes | None = None) -> None:
    """Parse ``rows`` as one block (``buffer``: their values joined, when known); where the
    reader refuses it, its halves, down to single records, which go to ``slow``."""
    if rows.size == 0:
        return
    if buffer is None:
        buffer = b"\n".join([raws[i] for i in rows.tolist()])  # type: ignore[misc]
    try:
        buffer.decode("utf-8")  # the reader does not check string encodings
        table = pj.read_json(pa.BufferReader(buffer), parse_options=_PARSE,
                             read_options=pj.ReadOptions(block_size=len(buffer) + 1, use_threads=False))
    except (UnicodeDecodeError, pa.ArrowInvalid):
        table = None
    if table is not None and table.num_rows == rows.size:  # one value, one row
        tables.append(table)
        parsed.append(rows)
    elif rows.size == 1:
        slow.append(int(rows[0]))
    else:
        half = rows.size // 2
        _parse(raws, rows[:half], tables, parsed, slow)
        _parse(raws, rows[half:], tables, parsed, slow)


def _keys_match(user_ids: pa.ChunkedArray, keys: list[bytes | None]) -> np.ndarray:
    """Per row: no record key, or the key equals the user id's UTF-8 bytes."""
    if not keys:
        return np.ones(0, bool)
    same = pc.equal(pc.cast(user_ids, pa.binary()), pa.array(keys, pa.binary()))
    return np.asarray(pc.fill_null(same, True).to_numpy(zero_copy_only=False), bool)


def _drop_extra(table: pa.Table) -> pa.Table:
    """The parsed table in :data:`DECODED_SCHEMA` (the model reads no `extra`)."""
    context = table.column("context")
    flat = pa.StructArray.from_arrays(
        [pc.struct_field(context, "category").combine_chunks(), pc.struct_field(context, "modality").combine_chunks()],
        fields=list(DECODED_CONTEXT))
    return pa.Table.from_arrays([*(table.column(f.name) for f in list(DECODED_SCHEMA)[:5]), flat], schema=DECODED_SCHEMA)


def _row(event: BehaviorEvent) -> dict:
    return {"event_id": event.event_id, "user_id": event.user_id, "item_id": event.item_id,
            "action": event.action.value, "event_time_ms": event.event_time_ms,
            "context": {"category": event.context.category, "modality": event.context.modality.value}}
