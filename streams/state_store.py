"""Per-partition RocksDB stores of user states (rocksdict), the worker's only state.

One RocksDB per input partition, as in Kafka Streams and Quix Streams: a user's state lives
with the partition its events arrive on. A micro-batch's states and the partition's processed
offset go in one WriteBatch, so after a crash the store is either before or after a batch,
never in between; the stream code talks to this object and never to RocksDB.

Each store is stamped with the model version on creation. Codes of one model mean nothing to
another, so opening a store with a different model is refused, never silently mixed.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from rocksdict import Options, Rdict, WriteBatch

from vql.schemas.user_state import (
    StateBatch,
    StateFormatError,
    UserState,
    decode_states,
    decode_user_state,
    encode_states,
    read_state_header,
)

ENCODE_ROWS = 256  # states copied and encoded at a time by a write (~7 MB in float64)

_META = b"\x00meta/"
_MODEL_KEY = _META + b"model_version"
_OFFSET_KEY = _META + b"processed_offset"
_CHANGELOG_KEY = _META + b"changelog_offset"
_USER = b"u/"
_EVENT_IDS = b"e/"  # per user: fingerprints of the most recent event ids, oldest first
_DELETED = b"d/"  # per deleted user: the input offset of the delete request (a deletion marker)


def open_rocksdb(path: Path, error: type[Exception], what: str) -> Rdict:
    """A raw-bytes RocksDB at ``path``, created if missing; a failure (a lock held by another
    process, I/O, corruption: rocksdict raises plain Exception) becomes ``error``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    try:
        return Rdict(str(path), options)
    except Exception as exc:
        raise error(f"cannot open {what} at {path}: {exc}") from exc


class StoreError(RuntimeError):
    """The store on disk cannot be used by this worker; the message says why and what to do."""


class CorruptStoreError(StoreError):
    """The store's files are damaged (RocksDB reports corruption, or a stored state does not
    decode). Nothing in it can be trusted, and nothing needs to be: the states topic holds
    every state the store held, so the recovery is to delete the directory and restore."""

    def __init__(self, path: Path, detail: object) -> None:
        self.path = path
        super().__init__(
            f"the RocksDB store at {path} is corrupt ({detail}). To recover: stop the worker on this host, "
            f"delete the directory {path} (this partition's store only) and start the worker again; the "
            "partition's store is rebuilt from the states topic before it consumes (docs/operations.md, "
            "'A corrupt store')"
        )


def is_corruption(exc: BaseException | None) -> bool:
    """Whether RocksDB reported damaged files (rocksdict raises plain Exception with RocksDB's
    status text, ``Corruption: ...``)."""
    return exc is not None and "Corruption:" in str(exc)


class PartitionStore:
    """User states of one input partition, plus the offset processed up to."""

    def __init__(self, path: Path, model_version: str) -> None:
        self.path = path
        self.model_version = model_version
        try:
            self._db = open_rocksdb(path, StoreError, "the RocksDB store")
        except StoreError as exc:
            if is_corruption(exc.__cause__):
                raise CorruptStoreError(path, exc.__cause__) from exc.__cause__
            raise
        stamp = self._get(_MODEL_KEY)
        if stamp is None:
            if next(iter(self._db.keys()), None) is not None:
                self._db.close()
                raise StoreError(f"{path} holds data but no model stamp: not a vql-stream store")
            self._db[_MODEL_KEY] = model_version.encode()
        elif stamp.decode() != model_version:
            self._db.close()
            raise StoreError(
                f"{path} was built with model {stamp.decode()}, the worker loads {model_version}: "
                "a new model needs a new store, built by replay (docs/operations.md)"
            )

    def _get(self, keys):
        """``Rdict.get`` (one key or a list), with RocksDB's corruption as :class:`CorruptStoreError`."""
        try:
            return self._db.get(keys)
        except Exception as exc:
            if is_corruption(exc):
                raise CorruptStoreError(self.path, exc) from exc
            raise

    def load(self, user_ids: Sequence[str], shape: tuple[int, int, int, int]) -> StateBatch:
        """The stored states of these users, in order, as one batch; a user never seen gets
        an empty state of ``shape``."""
        batch = StateBatch.empty(user_ids, self.model_version, shape)
        self.load_into(batch, np.arange(len(user_ids)))
        return batch

    def load_into(self, batch: StateBatch, rows: np.ndarray) -> None:
        """Decode the stored states of ``batch``'s users at ``rows`` into those rows, which
        must hold empty states; a user never seen keeps its empty state. A deleted user with
        no state since gets an empty state whose applied offset is the delete request's, so
        that a redelivery of the events before it applies nothing."""
        raw = self._get([_USER + batch.user_ids[row].encode() for row in rows.tolist()])
        found = [i for i, blob in enumerate(raw) if blob is not None]
        if found:
            try:
                decode_states([raw[i] for i in found], into=batch, rows=rows[found], rows_empty=True)
            except StateFormatError as exc:
                raise CorruptStoreError(self.path, f"a stored state does not decode: {exc}") from exc
        if len(found) < rows.size:
            missing = np.setdiff1d(np.arange(rows.size), np.asarray(found, np.int64))
            markers = self._get([_DELETED + batch.user_ids[rows[i]].encode() for i in missing.tolist()])
            for i, marker in zip(missing.tolist(), markers):
                if marker is not None:
                    batch.applied_offset[rows[i]] = int(marker)

    def deletion_marker(self, user_id: str) -> int | None:
        """The input offset of the user's last applied delete request, or None."""
        raw = self._get(_DELETED + user_id.encode())
        return None if raw is None else int(raw)

    def applied_offsets(self, user_ids: Sequence[str]) -> list[int | None]:
        """Each user's stored applied offset (None: no state), from the headers alone."""
        raw = self._db.get([_USER + u.encode() for u in user_ids])
        try:
            return [None if blob is None else read_state_header(memoryview(blob)).applied_offset for blob in raw]
        except StateFormatError as exc:
            raise StoreError(f"{self.path} holds a state this worker cannot read: {exc}") from exc

    def load_event_ids(self, user_ids: Sequence[str]) -> list[np.ndarray]:
        """Each user's recent event-id fingerprints (uint64, oldest first; empty if none)."""
        raw = self._get([_EVENT_IDS + u.encode() for u in user_ids])
        return [np.empty(0, np.uint64) if blob is None else np.frombuffer(blob, "<u8") for blob in raw]

    def write(self, states: StateBatch | None, processed_offset: int | None,
              changelog_offset: int | None = None, event_ids: dict[str, np.ndarray] | None = None,
              rows: np.ndarray | None = None, deletions: dict[str, int | None] | None = None) -> None:
        """Delete users (``deletions``: user -> the delete request's input offset, kept as the
        user's deletion marker; None: no marker), then persist states (those at ``rows`` of ``states``, default all), users' recent event
        ids, the partition's processed offset and the offset of the changelog (the published
        states topic) they reach, atomically.

        The states are copied and encoded ENCODE_ROWS at a time: a write-behind flush holds
        up to a whole commit interval of states (~26 KB each in float64), and copies that
        size took fresh pages from the kernel on every flush, where chunks reuse the same
        memory (docs/performance.md)."""
        batch = WriteBatch(raw_mode=True)
        for user_id, offset in (deletions or {}).items():  # first: a state put below re-creates the user
            key = user_id.encode()
            batch.delete(_USER + key)
            batch.delete(_EVENT_IDS + key)
            if offset is not None:
                batch.put(_DELETED + key, str(offset).encode())
        if states is not None:
            rows = np.arange(len(states)) if rows is None else rows
            for start in range(0, rows.size, ENCODE_ROWS):
                chunk = states.take(rows[start:start + ENCODE_ROWS])
                for user_id, blob in zip(chunk.user_ids, encode_states(chunk, np.float64)):
                    batch.put(_USER + user_id.encode(), blob)
        for user_id, fingerprints in (event_ids or {}).items():
            batch.put(_EVENT_IDS + user_id.encode(), fingerprints.astype("<u8").tobytes())
        if processed_offset is not None:
            batch.put(_OFFSET_KEY, str(processed_offset).encode())
        if changelog_offset is not None:
            batch.put(_CHANGELOG_KEY, str(changelog_offset).encode())
        try:
            self._db.write(batch)
        except Exception as exc:
            if is_corruption(exc):
                raise CorruptStoreError(self.path, exc) from exc
            raise

    def processed_offset(self) -> int | None:
        """The last input offset whose batch was written, or None for a new store."""
        raw = self._get(_OFFSET_KEY)
        return None if raw is None else int(raw)

    def changelog_offset(self) -> int | None:
        """The last offset of the partition's changelog this store holds, or None."""
        raw = self._get(_CHANGELOG_KEY)
        return None if raw is None else int(raw)

    def states(self) -> Iterator[UserState]:
        """Every stored state (for verification and export). RocksDB's iterator ends early,
        without an error, at a damaged block: its status is checked at the end, so that a
        corrupt store raises instead of yielding part of its states."""
        it = self._db.iter()
        it.seek(_USER)
        while it.valid() and it.key().startswith(_USER):
            try:
                yield decode_user_state(it.value())
            except StateFormatError as exc:
                raise CorruptStoreError(self.path, f"a stored state does not decode: {exc}") from exc
            it.next()
        try:
            it.status()
        except Exception as exc:
            if is_corruption(exc):
                raise CorruptStoreError(self.path, exc) from exc
            raise

    def deletion_markers(self) -> dict[str, int]:
        """Every deleted user's marker: the input offset of its last delete request."""
        markers = {}
        for key, value in self._db.items(from_key=_DELETED):
            if not key.startswith(_DELETED):
                break
            markers[key[len(_DELETED):].decode()] = int(value)
        return markers

    def approximate_keys(self) -> int:
        return int(self._db.property_int_value("rocksdb.estimate-num-keys") or 0)

    def approximate_bytes(self) -> int:
        """On-disk SST files plus memtables."""
        sst = self._db.property_int_value("rocksdb.total-sst-files-size") or 0
        memtables = self._db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
        return int(sst + memtables)

    def close(self) -> None:
        self._db.close()


def rocksdb_started() -> bool:
    """Whether this process runs RocksDB's background threads: its first store started them,
    and they outlive every store. A forked child inherits RocksDB's state but not the threads,
    and its first store waits for them for ever on close, so a process that has them must not
    fork workers that open stores (streams/jobs.py). Linux names them ``rocksdb:<pool>``."""
    for comm in glob.glob("/proc/self/task/*/comm"):
        try:
            if Path(comm).read_text().startswith("rocksdb:"):
                return True
        except OSError:  # the thread ended meanwhile
            continue
    return False


def partition_store_path(data_dir: Path, model_version: str, topic: str, partition: int) -> Path:
    """Where a partition's store lives: versioned, so that a new model starts a new store."""
    return data_dir / "stores" / model_version / f"{topic}-{partition}"
