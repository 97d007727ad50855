"""The batch decoder (Arrow's JSON reader) against its authority, ``decode_event``.

``decode_batch`` may only accept what ``decode_event`` accepts, with the same values, and
must reject everything else with ``decode_event``'s own reason and detail: the dead-letter
headers and metrics must not depend on which path a record took. Every case of the
bad-input corpus, every accepted edge case and generated event-like records are checked,
each surrounded by good events, as a worker's micro-batch would hold them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vql.schemas.batch_decode as batch_decode
from test_schemas_events import ACCEPTED, BAD_INPUTS, KEY, NOW_MS, POLICY, event_fields, event_like, record_keys, to_raw
from vql.schemas.batch_decode import DecodedBatch, decode_batch
from vql.schemas.decode import Rejection, decode_event
from vql.schemas.events import BehaviorEvent

# Good events as producers write them: no schema_version, no extra (the fast path's case).
PLAIN = [to_raw({k: v for k, v in event_fields(event_id=f"evt-{i}").items() if k != "schema_version"}
                | {"context": {"category": i, "modality": "video"}}) for i in range(5)]


def outcomes(batch: DecodedBatch, size: int) -> list[Any]:
    """Per input position: the Rejection, or the accepted event's fields as a tuple."""
    out: list[Any] = [None] * size
    for position, rejection in batch.rejections:
        out[position] = rejection
    for position, row in zip(batch.index.tolist(), batch.table.to_pylist()):
        assert out[position] is None, f"position {position} both accepted and rejected"
        out[position] = (row["event_id"], row["user_id"], row["item_id"], row["action"], row["event_time_ms"],
                         row["context"]["category"], row["context"]["modality"])
    assert all(o is not None for o in out), "a record was neither accepted nor rejected"
    return out


def expected(raw: bytes | None, key: bytes | None) -> Any:
    result = decode_event(raw, key, NOW_MS, POLICY)
    if isinstance(result, Rejection):
        return result
    return (result.event_id, result.user_id, result.item_id, result.action.value, result.event_time_ms,
            result.context.category, result.context.modality.value)


def assert_same_as_decode_event(raws: list[bytes | None], keys: list[bytes | None]) -> None:
    got = outcomes(decode_batch(raws, keys, NOW_MS, POLICY), len(raws))
    assert got == [expected(raw, key) for raw, key in zip(raws, keys)]


# The corpus's events carry a non-empty `extra`, which alone sends a record the slow way;
# each case is also checked without it, so that the fast path meets every defect too.
_DEFAULT_EXTRA = b', "extra": {"score": 0.5, "src": "feed"}'


def without_extra(raw: bytes | None) -> bytes | None:
    return raw if raw is None else raw.replace(_DEFAULT_EXTRA, b"")


def test_the_corpus_reaches_the_fast_path_without_its_extra() -> None:
    originals = [case.values[0] for case in BAD_INPUTS]
    assert sum(without_extra(raw) != raw for raw in originals) > 50


@pytest.mark.parametrize("strip", [False, True], ids=["as_is", "without_extra"])
@pytest.mark.parametrize(("raw", "key", "_reason"), BAD_INPUTS)
def test_every_bad_input_gets_decode_events_rejection_amid_good_events(raw, key, _reason, strip) -> None:
    raw = without_extra(raw) if strip else raw
    assert_same_as_decode_event([PLAIN[0], raw, PLAIN[1], raw, PLAIN[2]], [KEY, key, KEY, key, KEY])


@pytest.mark.parametrize("strip", [False, True], ids=["as_is", "without_extra"])
@pytest.mark.parametrize(("raw", "key"), ACCEPTED)
def test_every_accepted_edge_case_is_accepted_with_the_same_values(raw, key, strip) -> None:
    raw = without_extra(raw) if strip else raw
    assert_same_as_decode_event([PLAIN[0], raw, PLAIN[1]], [KEY, key, KEY])


def test_plain_events_never_reach_decode_event(monkeypatch) -> None:
    def refuse(*_args):
        raise AssertionError("decode_event called for a plain event")

    monkeypatch.setattr(batch_decode, "decode_event", refuse)
    raws = PLAIN * 200
    batch = decode_batch(raws, [KEY] * len(raws), NOW_MS, POLICY)

    assert batch.table.num_rows == len(raws) and not batch.rejections
    assert batch.index.tolist() == list(range(len(raws)))


def test_one_bad_record_costs_decode_event_for_it_alone(monkeypatch) -> None:
    calls: list[bytes | None] = []

    def counted(raw, *args):
        calls.append(raw)
        return decode_event(raw, *args)

    monkeypatch.setattr(batch_decode, "decode_event", counted)
    raws = PLAIN * 100
    raws[137] = to_raw(event_fields(item_id="42"))  # a type error: refused by the reader, not by the scan
    decode_batch(raws, [KEY] * len(raws), NOW_MS, POLICY)

    assert calls == [raws[137]]


def test_empty_batch() -> None:
    batch = decode_batch([], [], NOW_MS, POLICY)

    assert batch.table.num_rows == 0 and batch.index.size == 0 and not batch.rejections


def _bytes_of(value: dict[str, Any], ensure_ascii: bool) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written raw: the escaped form instead
        return json.dumps(value).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.tuples(event_like, record_keys, st.booleans()), min_size=1, max_size=8),
       junk=st.lists(st.binary(max_size=40), max_size=2))
def test_generated_batches_decode_as_decode_event_decodes_each_record(values, junk) -> None:
    raws = [_bytes_of(value, ascii_only) for value, _key, ascii_only in values] + junk + PLAIN[:2]
    keys = [key for _value, key, _ascii in values] + [None] * len(junk) + [KEY, KEY]
    assert_same_as_decode_event(raws, keys)


def test_accepted_rows_keep_input_order_when_some_go_the_slow_way() -> None:
    extra = to_raw(event_fields(event_id="with-extra"))  # non-empty extra: decode_event accepts it
    raws = [PLAIN[0], extra, PLAIN[1]]
    batch = decode_batch(raws, [KEY] * 3, NOW_MS, POLICY)

    assert batch.index.tolist() == [0, 1, 2]
    assert batch.table.column("event_id").to_pylist() == ["evt-0", "with-extra", "evt-1"]
    assert isinstance(decode_event(extra, KEY, NOW_MS, POLICY), BehaviorEvent)
