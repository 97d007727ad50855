"""Control messages on the `behaviors` topic: requests the worker applies in input order.

A control message is a record with the header ``vql-control``; its value says more. The only
kind is ``delete-user``: forget a user (privacy deletion, docs/operations.md). It is keyed by
the user id, like the user's events, so that it lands on the user's partition and is applied
exactly between the events before it (deleted) and after it (a fresh history). Its value is
the JSON object ``{"user_id": "<id>"}``, which must name the key's user: a request that names
nobody, or somebody else, deletes nothing and goes to the DLQ as ``invalid_control``.

The states topic says a user was deleted with a tombstone (a null value) carrying the
headers below (docs/state-format.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from vql.schemas.decode import Reason, Rejection
from vql.schemas.events import MAX_ID_LENGTH

CONTROL_HEADER = "vql-control"
DELETE_USER = b"delete-user"
# On a states-topic tombstone the worker published: the input offset of the delete request
# and the model whose store applied it. A tombstone without them was written by someone else.
DELETED_OFFSET_HEADER = "vql-deleted-offset"
MODEL_VERSION_HEADER = "vql-model-version"
MAX_CONTROL_BYTES = 4096


@dataclass(frozen=True)
class DeleteUser:
    """A request to forget ``user_id``."""

    user_id: str


def header(headers: Iterable[tuple[str, bytes]] | None, name: str) -> bytes | None:
    """The value of the last header called ``name``, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value
    return found


def is_control(headers: Sequence[tuple[str, bytes]] | None) -> bool:
    """Whether a `behaviors` record is a control message (any ``vql-control`` header)."""
    return bool(headers) and any(key == CONTROL_HEADER for key, _value in headers)


def decode_control(key: bytes | None, value: bytes | None,
                   headers: Sequence[tuple[str, bytes]] | None) -> DeleteUser | Rejection:
    """Parse a control message; never raises on bad input."""
    kind = header(headers, CONTROL_HEADER)
    if kind != DELETE_USER:
        return Rejection(Reason.INVALID_CONTROL, f"unknown control {kind!r}, this worker knows {DELETE_USER!r}")
    if value is None or len(value) > MAX_CONTROL_BYTES:
        return Rejection(Reason.INVALID_CONTROL, "a delete-user request needs a JSON value {\"user_id\": ...}"
                         f" of at most {MAX_CONTROL_BYTES} bytes")
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejection(Reason.INVALID_CONTROL, f"not JSON: {exc}"[:200])
    user = body.get("user_id") if isinstance(body, dict) else None
    if not isinstance(user, str) or not 0 < len(user) <= MAX_ID_LENGTH:
        return Rejection(Reason.INVALID_CONTROL, f"user_id must be a string of 1 to {MAX_ID_LENGTH} characters")
    if key != user.encode("utf-8"):
        return Rejection(Reason.INVALID_CONTROL, "record key differs from user_id")
    return DeleteUser(user)


def delete_request(user_id: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a delete-user control message for ``user_id``."""
    if not 0 < len(user_id) <= MAX_ID_LENGTH:
        raise ValueError(f"a user id has 1 to {MAX_ID_LENGTH} characters: {user_id!r}")
    return user_id.encode("utf-8"), orjson.dumps({"user_id": user_id}), [(CONTROL_HEADER, DELETE_USER)]


def tombstone_headers(deleted_offset: int, model_version: str) -> list[tuple[str, bytes]]:
    """The headers of a tombstone the worker publishes for a deleted user."""
    return [(DELETED_OFFSET_HEADER, str(deleted_offset).encode()), (MODEL_VERSION_HEADER, model_version.encode())]


def deleted_offset(headers: Iterable[tuple[str, bytes]] | None) -> int | None:
    """The delete request's input offset a worker's tombstone carries; None for a bare one."""
    raw = header(headers, DELETED_OFFSET_HEADER)
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None
