"""The ranking backend's local copy of the `user-states` topic, in RocksDB (rocksdict).

States are kept as published (the float32 bytes of docs/state-format.md) and decoded per
request, which costs microseconds. Every applied poll writes its states, tombstones and the
next offset of each partition in one WriteBatch, so a restarted backend resumes from a
consistent copy and reads only what it missed, as the worker's stores do (streams/state_store.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from rocksdict import WriteBatch

from vql.schemas.newest import newest
from vql.schemas.user_state import StateFormatError, read_state_header
from vql.serving.errors import StoreMismatch, StoreUnavailable
from vql.streams.state_store import open_rocksdb

_META = b"\x00meta/"
_TOPIC_KEY = _META + b"topic"
_OFFSET = b"\x00offset/"
_USER = b"u/"


class StateStore:
    """User id -> published state bytes, plus the next offset to read per partition."""

    def __init__(self, path: Path, topic: str) -> None:
        self.path = path
        self.topic = topic
        self._db = open_rocksdb(path, StoreUnavailable, "the local state store")
        stamp = self._db.get(_TOPIC_KEY)
        if stamp is None:
            self._db[_TOPIC_KEY] = topic.encode()
        elif stamp.decode() != topic:
            self._db.close()
            raise StoreMismatch(
                f"{path} holds a copy of topic {stamp.decode()!r}, not {topic!r}: "
                "use another directory (VQL_SERVE_DIR) or delete this one"
            )

    def get(self, user_id: str) -> bytes | None:
        return self._db.get(_USER + user_id.encode())

    def apply(self, changes: Iterable[tuple[bytes, bytes | None]], next_offsets: dict[int, int]) -> None:
        """Write (key, state or None for a tombstone) and the partitions' next offsets
        atomically. Of a user's states, the one with the larger applied offset is kept, not
        the last one read (schemas/newest.py): a late publication cannot replace a newer state.
        A state whose header cannot be read counts as older than any readable one."""
        batch = WriteBatch(raw_mode=True)
        for key, value in newest([(key, value, _applied(value)) for key, value in changes], self._applied).items():
            if value is None:
                batch.delete(_USER + key)
            else:
                batch.put(_USER + key, value)
        for partition, offset in next_offsets.items():
            batch.put(_OFFSET + str(partition).encode(), str(offset).encode())
        self._db.write(batch)

    def _applied(self, keys: Sequence[bytes]) -> list[int | None]:
        return [_applied(blob) for blob in self._db.get([_USER + key for key in keys])]

    def next_offsets(self) -> dict[int, int]:
        """Where to resume reading each partition (empty for a new store)."""
        offsets = {}
        for key, value in self._db.items(from_key=_OFFSET):
            if not key.startswith(_OFFSET):
                break
            offsets[int(key[len(_OFFSET):])] = int(value)
        return offsets

    def close(self) -> None:
        self._db.close()


def _applied(blob: bytes | None) -> int | None:
    """A published state's applied offset (None: a tombstone or no state; -1: unreadable)."""
    if blob is None:
        return None
    try:
        return read_state_header(memoryview(blob)).applied_offset
    except StateFormatError:
        return -1
