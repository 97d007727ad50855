"""Unit tests of the behavior-event contract: ``BehaviorEvent`` and ``decode_event``.

``decode_event`` is the only gate between producers and the user states. Every unusable record
must come back as a ``Rejection`` whose ``reason`` is exact, because the dead-letter header and
the invalid-event metrics are keyed on it; and no input at all may make it raise, because a
raise would crash the worker on one poisoned record and stall its partitions.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vql.schemas.decode import EventPolicy, Reason, Rejection, decode_event
from vql.schemas.events import (
    MAX_ID_LENGTH,
    MAX_ITEM_ID,
    Action,
    BehaviorEvent,
    EventContext,
    Modality,
)

NOW_MS = 1_700_000_000_000
POLICY = EventPolicy()
USER = "user-1"
KEY = USER.encode()

# A placeholder that json.dumps writes as a plain quoted string, to be swapped afterwards for
# a raw token (NaN, Infinity, ...) that json.dumps would not write where we want it.
_RAW = "\x01raw-token\x01"


def event_fields(**overrides: Any) -> dict[str, Any]:
    """A valid event as a JSON-ready dict; keyword arguments replace top-level fields."""
    fields: dict[str, Any] = {
        "schema_version": 1,
        "event_id": "evt-1",
        "user_id": USER,
        "item_id": 42,
        "action": "click",
        "event_time_ms": NOW_MS - 1_000,
        "context": {"category": 7, "modality": "video", "extra": {"score": 0.5, "src": "feed"}},
    }
    fields.update(overrides)
    return fields


def with_context(**overrides: Any) -> dict[str, Any]:
    """A valid event whose context fields are replaced."""
    fields = event_fields()
    fields["context"] = {**fields["context"], **overrides}
    return fields


def to_raw(fields: Any) -> bytes:
    return json.dumps(fields).encode()


def with_token(path: tuple[str, ...], token: str, fields: dict[str, Any] | None = None) -> bytes:
    """The JSON of a valid event with the raw text ``token`` as the value at ``path``."""
    fields = json.loads(json.dumps(fields or event_fields()))
    parent = fields
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = _RAW
    return to_raw(fields).replace(json.dumps(_RAW).encode(), token.encode())


def without(path: tuple[str, ...]) -> bytes:
    """The JSON of a valid event lacking the field at ``path``."""
    fields = event_fields()
    parent = fields
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    return to_raw(fields)


def decode(raw: bytes | None, key: bytes | None = KEY) -> BehaviorEvent | Rejection:
    return decode_event(raw, key, NOW_MS, POLICY)


GOOD = to_raw(event_fields())


# ------------------------------------------------------------------------- round trip


def test_good_event_round_trips_through_to_json_and_decode_event() -> None:
    event = BehaviorEvent(
        event_id="evt-9",
        user_id="用户-😀",
        item_id=MAX_ITEM_ID,
        action=Action.PURCHASE,
        event_time_ms=NOW_MS,
        context=EventContext(
            category=3,
            modality=Modality.LIVE,
            extra={"price": 19.99, "qty": 2, "gift": True, "coupon": "X1", "tiny": 5e-324},
        ),
    )

    decoded = decode(event.to_json(), "用户-😀".encode())

    assert decoded == event


def test_to_json_is_compact_utf8_with_every_field() -> None:
    """Producers in other languages copy this form; it must carry the version explicitly."""
    event = decode(GOOD)
    assert isinstance(event, BehaviorEvent)

    wire = event.to_json()

    assert b" " not in wire
    assert json.loads(wire) == event_fields()


def test_schema_version_defaults_to_one_when_absent() -> None:
    fields = event_fields()
    del fields["schema_version"]

    event = decode(to_raw(fields))

    assert isinstance(event, BehaviorEvent) and event.schema_version == 1


# ---------------------------------------------------------------------- bad inputs


def case(name: str, raw: bytes | None, reason: Reason, key: bytes | None = KEY) -> Any:
    return pytest.param(raw, key, reason, id=name)


_MISSING = [
    ("event_id",),
    ("user_id",),
    ("item_id",),
    ("action",),
    ("event_time_ms",),
    ("context",),
    ("context", "category"),
    ("context", "modality"),
]

BAD_INPUTS = [
    # Not JSON at all, or not decodable as UTF-8 JSON text.
    case("not_json", b"user-1 clicked 42", Reason.NOT_JSON),
    case("truncated_json", GOOD[:-1], Reason.NOT_JSON),
    case("truncated_json_halfway", GOOD[: len(GOOD) // 2], Reason.NOT_JSON),
    case("empty_bytes", b"", Reason.NOT_JSON),
    case("tombstone_none_value", None, Reason.NOT_JSON),
    case("invalid_utf8", GOOD.replace(b"user-1", b"user-\xff"), Reason.NOT_JSON, key=None),
    case("cesu8_surrogate_bytes", GOOD.replace(b"user-1", b"\xed\xa0\x80"), Reason.NOT_JSON, key=None),
    case("utf8_bom", b"\xef\xbb\xbf" + GOOD, Reason.NOT_JSON),
    case("nested_too_deep", b"[" * 5_000 + b"]" * 5_000, Reason.NOT_JSON),
    # A lone surrogate escape is grammatical JSON but names no character: pydantic's parser
    # (jiter) refuses it, so it can never reach a key comparison or a UTF-8 encode.
    case("lone_high_surrogate_user_id", to_raw(event_fields(user_id="\ud800")), Reason.NOT_JSON, key=None),
    case("lone_low_surrogate_event_id", to_raw(event_fields(event_id="a\udc00b")), Reason.NOT_JSON),
    case("lone_surrogate_extra_key", to_raw(with_context(extra={"\ud800": 1})), Reason.NOT_JSON),
    case("lone_surrogate_extra_value", to_raw(with_context(extra={"k": "\udfff"})), Reason.NOT_JSON),
    # Valid JSON that is not an event object.
    case("json_array", b"[1, 2, 3]", Reason.SCHEMA_VIOLATION),
    case("json_array_of_event", to_raw([event_fields()]), Reason.SCHEMA_VIOLATION),
    case("json_string", b'"click"', Reason.SCHEMA_VIOLATION),
    case("json_number", b"42", Reason.SCHEMA_VIOLATION),
    case("json_null", b"null", Reason.SCHEMA_VIOLATION),
    *[case("missing_" + ".".join(p), without(p), Reason.SCHEMA_VIOLATION) for p in _MISSING],
    # Wrong types: the model is strict, nothing is coerced.
    case("string_item_id", to_raw(event_fields(item_id="42")), Reason.SCHEMA_VIOLATION),
    case("float_item_id", to_raw(event_fields(item_id=42.0)), Reason.SCHEMA_VIOLATION),
    case("bool_item_id", to_raw(event_fields(item_id=True)), Reason.SCHEMA_VIOLATION),
    case("negative_item_id", to_raw(event_fields(item_id=-1)), Reason.SCHEMA_VIOLATION),
    case("item_id_2_pow_63", to_raw(event_fields(item_id=2**63)), Reason.SCHEMA_VIOLATION),
    case("item_id_2_pow_100", to_raw(event_fields(item_id=2**100)), Reason.SCHEMA_VIOLATION),
    case("int_user_id", to_raw(event_fields(user_id=1)), Reason.SCHEMA_VIOLATION, key=b"1"),
    case("null_user_id", to_raw(event_fields(user_id=None)), Reason.SCHEMA_VIOLATION),
    case("string_event_time", to_raw(event_fields(event_time_ms=str(NOW_MS))), Reason.SCHEMA_VIOLATION),
    case("float_event_time", to_raw(event_fields(event_time_ms=NOW_MS + 0.5)), Reason.SCHEMA_VIOLATION),
    case("negative_event_time", to_raw(event_fields(event_time_ms=-1)), Reason.SCHEMA_VIOLATION),
    case("event_time_past_2_pow_53", to_raw(event_fields(event_time_ms=2**53 + 1)), Reason.SCHEMA_VIOLATION),
    case("string_category", to_raw(with_context(category="7")), Reason.SCHEMA_VIOLATION),
    case("negative_category", to_raw(with_context(category=-7)), Reason.SCHEMA_VIOLATION),
    case("context_not_object", to_raw(event_fields(context=[7, "video"])), Reason.SCHEMA_VIOLATION),
    # NaN and infinities: jiter reads the tokens, the strict schema refuses the values.
    case("nan_item_id", with_token(("item_id",), "NaN"), Reason.SCHEMA_VIOLATION),
    case("infinity_event_time", with_token(("event_time_ms",), "Infinity"), Reason.SCHEMA_VIOLATION),
    case("minus_infinity_category", with_token(("context", "category"), "-Infinity"), Reason.SCHEMA_VIOLATION),
    case("nan_extra_float", with_token(("context", "extra", "score"), "NaN"), Reason.SCHEMA_VIOLATION),
    case("infinity_extra_float", with_token(("context", "extra", "score"), "Infinity"), Reason.SCHEMA_VIOLATION),
    case("minus_infinity_extra_float", with_token(("context", "extra", "score"), "-Infinity"), Reason.SCHEMA_VIOLATION),
    case("overflowing_extra_float_1e400", with_token(("context", "extra", "score"), "1e400"), Reason.SCHEMA_VIOLATION),
    # Vocabularies are closed and case-sensitive.
    case("unknown_action", to_raw(event_fields(action="dislike")), Reason.SCHEMA_VIOLATION),
    case("action_wrong_case", to_raw(event_fields(action="Click")), Reason.SCHEMA_VIOLATION),
    case("action_by_index", to_raw(event_fields(action=1)), Reason.SCHEMA_VIOLATION),
    case("unknown_modality", to_raw(with_context(modality="hologram")), Reason.SCHEMA_VIOLATION),
    # Nothing extra at the top level or in the context; extra values are flat scalars.
    case("extra_top_level_field", to_raw(event_fields(session="s-1")), Reason.SCHEMA_VIOLATION),
    case("extra_context_field", to_raw(with_context(device="ios")), Reason.SCHEMA_VIOLATION),
    case("extra_value_null", to_raw(with_context(extra={"k": None})), Reason.SCHEMA_VIOLATION),
    case("extra_value_list", to_raw(with_context(extra={"k": [1]})), Reason.SCHEMA_VIOLATION),
    case("extra_value_object", to_raw(with_context(extra={"k": {"a": 1}})), Reason.SCHEMA_VIOLATION),
    case("extra_key_too_long", to_raw(with_context(extra={"k" * 65: 1})), Reason.SCHEMA_VIOLATION),
    case("extra_too_many_entries", to_raw(with_context(extra={f"k{i}": i for i in range(33)})), Reason.SCHEMA_VIOLATION),
    # Id bounds.
    case("user_id_too_long", to_raw(event_fields(user_id="u" * (MAX_ID_LENGTH + 1))), Reason.SCHEMA_VIOLATION, key=None),
    case("empty_user_id", to_raw(event_fields(user_id="")), Reason.SCHEMA_VIOLATION, key=b""),
    case("empty_event_id", to_raw(event_fields(event_id="")), Reason.SCHEMA_VIOLATION),
    case("event_id_too_long", to_raw(event_fields(event_id="e" * (MAX_ID_LENGTH + 1))), Reason.SCHEMA_VIOLATION),
    # Schema versions: a version this worker does not read is not a schema violation of v1.
    case("schema_version_2", to_raw(event_fields(schema_version=2)), Reason.UNKNOWN_SCHEMA_VERSION),
    case("schema_version_2_other_shape", to_raw({"schema_version": 2, "payload": {"who": 1}}), Reason.UNKNOWN_SCHEMA_VERSION),
    case("schema_version_2_v1_fields_wrong", to_raw(event_fields(schema_version=2, item_id="42")), Reason.UNKNOWN_SCHEMA_VERSION),
    case("schema_version_2_with_nan_elsewhere", with_token(("item_id",), "NaN", event_fields(schema_version=2)), Reason.UNKNOWN_SCHEMA_VERSION),
    case("schema_version_beyond_uint64", to_raw({"schema_version": 2**70, "payload": 1}), Reason.UNKNOWN_SCHEMA_VERSION),
    case("schema_version_0", to_raw(event_fields(schema_version=0)), Reason.UNKNOWN_SCHEMA_VERSION),
    case("schema_version_string_1", to_raw(event_fields(schema_version="1")), Reason.SCHEMA_VIOLATION),
    case("schema_version_string_2", to_raw(event_fields(schema_version="2")), Reason.SCHEMA_VIOLATION),
    case("schema_version_float_2", to_raw(event_fields(schema_version=2.0)), Reason.SCHEMA_VIOLATION),
    case("schema_version_true", to_raw(event_fields(schema_version=True)), Reason.SCHEMA_VIOLATION),
    case("schema_version_false", to_raw(event_fields(schema_version=False)), Reason.SCHEMA_VIOLATION),
    case("schema_version_false_other_shape", to_raw({"schema_version": False}), Reason.SCHEMA_VIOLATION),
    case("schema_version_null", to_raw(event_fields(schema_version=None)), Reason.SCHEMA_VIOLATION),
    # Context beyond the JSON: the record key, the clock, the size limit.
    case("key_mismatch", GOOD, Reason.KEY_MISMATCH, key=b"user-2"),
    case("key_differs_in_case", GOOD, Reason.KEY_MISMATCH, key=b"USER-1"),
    case("key_empty", GOOD, Reason.KEY_MISMATCH, key=b""),
    case("key_latin1_not_utf8", to_raw(event_fields(user_id="josé")), Reason.KEY_MISMATCH, key="josé".encode("latin-1")),
    case("far_future_event_time", to_raw(event_fields(event_time_ms=NOW_MS + POLICY.max_future_skew_ms + 1)), Reason.FUTURE_EVENT_TIME),
    case("event_time_max_allowed_value", to_raw(event_fields(event_time_ms=2**53)), Reason.FUTURE_EVENT_TIME),
    case("event_before_horizon", to_raw(event_fields(event_time_ms=POLICY.min_event_time_ms - 1)), Reason.EVENT_TIME_BEFORE_HORIZON),
    case("event_time_zero", to_raw(event_fields(event_time_ms=0)), Reason.EVENT_TIME_BEFORE_HORIZON),
    case("oversized_valid_event", GOOD + b" " * (POLICY.max_event_bytes - len(GOOD) + 1), Reason.OVERSIZED),
    case("oversized_garbage", b"\xff" * (POLICY.max_event_bytes + 1), Reason.OVERSIZED),
    case("oversized_deep_nesting", b"[" * 100_000 + b"]" * 100_000, Reason.OVERSIZED),
]


@pytest.mark.parametrize(("raw", "key", "reason"), BAD_INPUTS)
def test_bad_input_is_rejected_with_its_reason(raw: bytes | None, key: bytes | None, reason: Reason) -> None:
    result = decode(raw, key)

    assert isinstance(result, Rejection), f"accepted: {result!r}"
    assert result.reason is reason, result.detail
    assert result.detail


def test_rejection_detail_names_the_offending_field() -> None:
    """An operator reading the dead-letter topic must see where the event went wrong."""
    result = decode(to_raw(event_fields(item_id="42")))

    assert isinstance(result, Rejection) and result.detail.startswith("item_id:")


def test_pydantic_refuses_lone_surrogates_in_python_strings_too() -> None:
    """Python-side construction is as strict as the wire: no id can fail to encode as UTF-8."""
    with pytest.raises(ValueError, match="unicode"):
        BehaviorEvent(
            event_id="e",
            user_id="\ud800",
            item_id=1,
            action=Action.CLICK,
            event_time_ms=NOW_MS,
            context=EventContext(category=1, modality=Modality.VIDEO),
        )


# --------------------------------------------------------------- accepted edge cases


def padded_to(size: int) -> bytes:
    return GOOD + b" " * (size - len(GOOD))


ACCEPTED = [
    pytest.param(GOOD, KEY, id="plain"),
    pytest.param(GOOD, None, id="no_record_key"),
    pytest.param(to_raw(event_fields(user_id="😀🎉")), "😀🎉".encode(), id="emoji_user_id"),
    pytest.param(to_raw(event_fields(user_id="用户名")), "用户名".encode(), id="cjk_user_id"),
    pytest.param(GOOD.replace(b'"user-1"', b'"\\ud83d\\ude00"'), "😀".encode(), id="escaped_surrogate_pair"),
    pytest.param(json.dumps(event_fields(user_id="josé"), ensure_ascii=False).encode(), "josé".encode(), id="raw_utf8_user_id"),
    pytest.param(to_raw(event_fields(user_id="u" * MAX_ID_LENGTH)), b"u" * MAX_ID_LENGTH, id="user_id_at_max_length"),
    pytest.param(to_raw(event_fields(user_id="用" * MAX_ID_LENGTH)), "用".encode() * MAX_ID_LENGTH, id="cjk_user_id_at_max_length"),
    pytest.param(to_raw(event_fields(item_id=0)), KEY, id="item_id_zero"),
    pytest.param(to_raw(event_fields(item_id=MAX_ITEM_ID)), KEY, id="item_id_max"),
    pytest.param(to_raw(with_context(extra={})), KEY, id="empty_extra"),
    pytest.param(to_raw(with_context(extra={"b": True, "i": -3, "f": 1.5, "s": ""})), KEY, id="every_extra_type"),
    pytest.param(to_raw(event_fields(event_time_ms=NOW_MS + POLICY.max_future_skew_ms)), KEY, id="at_future_skew"),
    pytest.param(to_raw(event_fields(event_time_ms=POLICY.min_event_time_ms)), KEY, id="at_horizon"),
    pytest.param(padded_to(POLICY.max_event_bytes), KEY, id="exactly_max_bytes"),
]


@pytest.mark.parametrize(("raw", "key"), ACCEPTED)
def test_valid_edge_case_is_accepted(raw: bytes, key: bytes | None) -> None:
    result = decode(raw, key)

    assert isinstance(result, BehaviorEvent), result
    if key is not None:
        assert result.user_id.encode("utf-8") == key


def test_escaped_surrogate_pair_decodes_to_one_character() -> None:
    result = decode(GOOD.replace(b'"user-1"', b'"\\ud83d\\ude00"'), None)

    assert isinstance(result, BehaviorEvent) and result.user_id == "😀"


def test_size_limit_comes_from_the_policy() -> None:
    strict = EventPolicy(max_event_bytes=len(GOOD) - 1)

    result = decode_event(GOOD, KEY, NOW_MS, strict)

    assert isinstance(result, Rejection) and result.reason is Reason.OVERSIZED


# ------------------------------------------------------------------ never raises

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities too: json.dumps writes them as bare tokens
    | st.text(max_size=20)  # lone surrogates too: json.dumps escapes them as \udxxx
)
json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(valid, json_values)


# Objects shaped like events, so that fuzzing reaches the field validators and the checks
# after validation (key, clock, version), not only the "not an object" branch.
event_like = st.fixed_dictionaries(
    {
        "event_id": _field(st.text(max_size=5)),
        "user_id": _field(st.sampled_from([USER, "", "用户", "\ud800"])),
        "item_id": _field(st.integers(min_value=-1, max_value=2**64)),
        "action": _field(st.sampled_from([a.value for a in Action])),
        "event_time_ms": _field(st.integers(min_value=0, max_value=2**54)),
        "context": _field(
            st.fixed_dictionaries(
                {"category": _field(st.integers(-1, 10)), "modality": _field(st.sampled_from([m.value for m in Modality]))},
                optional={"extra": _field(st.dictionaries(st.text(max_size=3), _json_scalars, max_size=3))},
            )
        ),
    },
    optional={"schema_version": _field(st.integers(-1, 3)), "junk": json_values},
)

record_keys = st.none() | st.just(KEY) | st.binary(max_size=10)


def _assert_outcome(result: object, key: bytes | None) -> None:
    assert isinstance(result, (BehaviorEvent, Rejection))
    if isinstance(result, Rejection):
        assert isinstance(result.reason, Reason) and isinstance(result.detail, str)
    elif key is not None:
        assert result.user_id.encode("utf-8") == key


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300), key=record_keys)
def test_arbitrary_bytes_never_raise(raw: bytes, key: bytes | None) -> None:
    _assert_outcome(decode(raw, key), key)


@settings(max_examples=300, deadline=None)
@given(value=json_values, key=record_keys)
def test_arbitrary_json_never_raises(value: Any, key: bytes | None) -> None:
    _assert_outcome(decode(json.dumps(value).encode(), key), key)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=event_like, key=record_keys, ensure_ascii=st.booleans())
def test_arbitrary_event_like_objects_never_raise(value: dict[str, Any], key: bytes | None, ensure_ascii: bool) -> None:
    try:
        raw = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written raw: send the escaped form instead
        raw = json.dumps(value).encode()
    _assert_outcome(decode(raw, key), key)
