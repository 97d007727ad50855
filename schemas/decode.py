"""Raw Kafka records -> validated events, or a machine-readable reason why not.

Validation that needs context beyond the JSON itself (the record key, the clock, size
limits) lives here too, so that the worker and replay reject exactly the same events.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import ValidationError
from pydantic_core import from_json

from vql.schemas.events import SCHEMA_VERSION, BehaviorEvent


class Reason(str, Enum):
    """Why an event went to the dead-letter topic (the `reason` header)."""

    OVERSIZED = "oversized"
    NOT_JSON = "not_json"
    SCHEMA_VIOLATION = "schema_violation"
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    KEY_MISMATCH = "key_mismatch"
    FUTURE_EVENT_TIME = "future_event_time"
    EVENT_TIME_BEFORE_HORIZON = "event_time_before_horizon"
    DUPLICATE_EVENT_ID = "duplicate_event_id"  # judged by the processor, against the user's recent ids
    INVALID_CONTROL = "invalid_control"  # a control message (schemas/control.py) that cannot be applied
    MISSING_KEY = "missing_key"  # a keyless record: its user's partition is unknown (schemas/placement.py)
    WRONG_PARTITION = "wrong_partition"  # not on its key's murmur2 partition (schemas/placement.py)


@dataclass(frozen=True)
class Rejection:
    reason: Reason
    detail: str


@dataclass(frozen=True)
class EventPolicy:
    """Limits an event must meet beyond its schema."""

    max_event_bytes: int = 64 * 1024
    max_future_skew_ms: int = 3_600_000  # events from more than 1 h ahead of the clock
    min_event_time_ms: int = 946_684_800_000  # 2000-01-01: older is a producer bug
    max_landmark_lead_ms: int = 3_600_000  # no event is folded further ahead of its record's timestamp


def decode_event(
    raw: bytes | None, key: bytes | None, now_ms: int, policy: EventPolicy
) -> BehaviorEvent | Rejection:
    """Parse and validate one record's value; never raises on bad input."""
    if raw is None:
        return Rejection(Reason.NOT_JSON, "record has no value (tombstone)")
    if len(raw) > policy.max_event_bytes:
        return Rejection(Reason.OVERSIZED, f"{len(raw)} bytes > limit {policy.max_event_bytes}")
    try:
        event = BehaviorEvent.model_validate_json(raw)
    except ValidationError as exc:
        return _classify(raw, exc)
    if event.schema_version != SCHEMA_VERSION:
        return _unknown_version(event.schema_version)
    if key is not None and key != event.user_id.encode("utf-8"):
        return Rejection(Reason.KEY_MISMATCH, "record key differs from user_id")
    if event.event_time_ms > now_ms + policy.max_future_skew_ms:
        return Rejection(
            Reason.FUTURE_EVENT_TIME,
            f"event_time_ms {event.event_time_ms} is {event.event_time_ms - now_ms} ms ahead",
        )
    if event.event_time_ms < policy.min_event_time_ms:
        return Rejection(
            Reason.EVENT_TIME_BEFORE_HORIZON,
            f"event_time_ms {event.event_time_ms} < horizon {policy.min_event_time_ms}",
        )
    return event


def _classify(raw: bytes, exc: ValidationError) -> Rejection:
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return Rejection(Reason.NOT_JSON, errors[0]["msg"][:200])
    # Read the version with the parser that validated the event (jiter), so that whatever it
    # accepted (NaN tokens, integers beyond 64 bits) cannot hide a version number here.
    try:
        version = from_json(raw).get("schema_version", SCHEMA_VERSION)
    except (ValueError, AttributeError):
        version = SCHEMA_VERSION
    # bool is an int subclass in Python, but `false` is a type error, not a version.
    if type(version) is int and version != SCHEMA_VERSION:
        return _unknown_version(version)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "<root>"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return Rejection(Reason.SCHEMA_VIOLATION, f"{where}: {first['msg']}{more}"[:300])


def _unknown_version(version: int) -> Rejection:
    return Rejection(
        Reason.UNKNOWN_SCHEMA_VERSION, f"schema_version {version}, this worker reads {SCHEMA_VERSION}"
    )
