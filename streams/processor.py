"""One micro-batch of raw records -> updated, persisted user states and dead letters.

The Faust agent (streams/app.py) only moves records in and out of Kafka; everything between
lives here, so that it can be tested without a broker and shared with replay:
decode (schemas/) -> encode (model/, torch) -> fold into states (model/state.py) -> the
partition's write-behind cache (streams/state_cache.py) -> one RocksDB WriteBatch per
partition and flush (streams/state_store.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns
from vql.model.state import fold_events
from vql.schemas.batch_decode import decode_batch
from vql.schemas.control import DeleteUser, decode_control, is_control
from vql.schemas.decode import EventPolicy, Reason, Rejection
from vql.schemas.event_time import NO_TIMESTAMP, fold_time_s, judged_against_ms
from vql.schemas.placement import misplaced
from vql.schemas.user_state import StateBatch, UserState, encode_states, full_state_bytes
from vql.streams.state_cache import StateCache
from vql.streams.state_store import PartitionStore, partition_store_path


class Record(Protocol):
    """A consumed Kafka record, as the processor needs it: aiokafka's ConsumerRecord is one,
    so the worker passes fetched records through without a copy per record."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class RawRecord:
    """A record made by hand (tools, tests): the fields of :class:`Record`, and its Kafka
    timestamp if it has one."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int = NO_TIMESTAMP


@dataclass(frozen=True)
class DeadLetter:
    record: Record
    rejection: Rejection


@dataclass
class BatchResult:
    """What a batch changed: states to publish, records to dead-letter, writes to commit
    (per partition: the changed states, as one StateBatch, and the processed offset)."""

    dead_letters: list[DeadLetter] = field(default_factory=list)
    writes: list[tuple[int, StateBatch | None, int]] = field(default_factory=list)
    event_ids: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # partition -> user -> window
    applied: int = 0
    duplicates: int = 0
    encode_s: float = 0.0
    store_s: float = 0.0
    code_counts: np.ndarray | None = None  # (G, K) codes assigned in this batch
    wire: list[list[bytes]] | None = None  # per write, its states as the states topic carries them
    # partition -> users deleted by control messages -> the delete request's input offset:
    # published as tombstones before the partition's states, deleted from the store at the flush.
    deletions: dict[int, dict[str, int]] = field(default_factory=dict)
    model_version: str = ""  # of the states and tombstones

    @property
    def deleted_count(self) -> int:
        """Users deleted by the batch, over all partitions."""
        return sum(len(users) for users in self.deletions.values())

    def encode_wire(self) -> list[list[bytes]]:
        """Each write's states in the states topic's float32 encoding, encoded once. The
        worker calls this in its processing thread, so that the event loop, which is busy
        fetching and framing the previous batch's records, only frames these."""
        if self.wire is None:
            self.wire = [[] if states is None else encode_states(states, np.float32) for _p, states, _o in self.writes]
        return self.wire

    @property
    def state_count(self) -> int:
        """How many states the batch changed, over all partitions."""
        return sum(len(states) for _partition, states, _offset in self.writes if states is not None)

    @property
    def user_ids(self) -> list[str]:
        """The users whose states the batch changed."""
        return [u for _partition, states, _offset in self.writes if states is not None for u in states.user_ids]

    @property
    def states(self) -> list[UserState]:
        """Every state the batch changed, over all partitions (as objects: for tools and tests)."""
        return [state for _partition, states, _offset in self.writes if states is not None
                for state in states.states()]


class BatchProcessor:
    """Applies micro-batches of one topic's records to per-partition stores."""

    def __init__(
        self,
        model: VQLModel,
        model_version: str,
        data_dir: Path,
        topic: str,
        policy: EventPolicy,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        event_id_window: int = 256,
        cache_bytes: int = 0,
        partitions: int | None = None,
    ) -> None:
        self.model = model
        # The input topic's partition count: a record not on its key's murmur2 partition of
        # that many (or keyless) is dead-lettered (schemas/placement.py). None: not judged
        # (hand-made records in tests and tools, whose partitions are arbitrary).
        self.partitions = partitions
        self.model_version = model_version
        self.data_dir = data_dir
        self.topic = topic
        self.policy = policy
        self.clock_ms = clock_ms
        self.event_id_window = event_id_window  # recent event ids kept per user; 0: no id check
        cfg = model.config
        self._shape = (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim)
        self._decay = np.asarray(cfg.decay_rates)
        self._stores: dict[int, PartitionStore] = {}
        self._caches: dict[int, StateCache] = {}
        # The cache budget in states, shared by the partitions this processor holds.
        self._cache_states = cache_bytes // full_state_bytes(*self._shape, 0, np.float64)

    # -- partitions -------------------------------------------------------------------------

    def store(self, partition: int) -> PartitionStore:
        """The partition's durable store, opened on first use (what a restore writes to:
        before the partition's cache exists)."""
        store = self._stores.get(partition)
        if store is None:
            path = partition_store_path(self.data_dir, self.model_version, self.topic, partition)
            store = self._stores[partition] = PartitionStore(path, self.model_version)
        return store

    def open_unowned(self, partition: int) -> PartitionStore:
        """A partition's store opened outside the owned set (standby catch-up); the caller
        closes it. Raises StoreError while another process holds it open."""
        return PartitionStore(partition_store_path(self.data_dir, self.model_version, self.topic, partition),
                              self.model_version)

    def cache(self, partition: int) -> StateCache:
        """The partition's write-behind cache, in front of its store."""
        cache = self._caches.get(partition)
        if cache is None:
            cache = self._caches[partition] = StateCache(self.store(partition), self._shape)
            self._share_cache()
        return cache

    def _share_cache(self) -> None:
        for cache in self._caches.values():
            cache.capacity = self._cache_states // len(self._caches)

    def flush(self, partitions: Sequence[int] | None = None) -> dict[int, int]:
        """Write what the caches of ``partitions`` (default: all) hold that is not on disk;
        returns, per partition, the processed offset now durable: what may be committed."""
        durable = {}
        for partition in list(self._caches) if partitions is None else partitions:
            cache = self._caches.get(partition)
            offset = cache.flush() if cache is not None else None
            if offset is not None:
                durable[partition] = offset
        return durable

    def unpublished(self, limit: int) -> Iterator[BatchResult]:
        """What the next :meth:`flush` will write, as batches of at most ``limit`` states to
        publish first (their changelog offsets then go to :meth:`reached`): for a replay,
        which coalesces its publications per flush where the worker publishes every batch."""
        for partition, cache in self._caches.items():
            deletions = cache.unflushed_deletions()
            if deletions:  # first: a state of the same flush re-creates the user
                yield BatchResult(writes=[(partition, None, cache.processed_offset())],
                                  deletions={partition: deletions}, model_version=self.model_version)
            for states in cache.unflushed_states(limit):
                yield BatchResult(writes=[(partition, states, cache.processed_offset())])

    def needs_flush(self) -> bool:
        """Whether a cache has outgrown its share of the budget."""
        return any(cache.over_capacity for cache in self._caches.values())

    def unflushed(self) -> list[int]:
        """The partitions whose caches hold batches not yet written (an idle worker still
        flushes them)."""
        return [partition for partition, cache in self._caches.items() if cache.unflushed]

    def release(self, partitions: Sequence[int]) -> None:
        """Flush and close the stores of partitions this worker no longer owns."""
        self.flush(partitions)
        for partition in partitions:
            self._caches.pop(partition, None)
            store = self._stores.pop(partition, None)
            if store is not None:
                store.close()
        if self._caches:
            self._share_cache()

    def discard(self) -> None:
        """Drop every cache unwritten (a batch they hold was never published): the states
        are read from the stores again, as they were at the last flush."""
        self._caches.clear()

    def forget(self, partitions: Sequence[int]) -> None:
        """Drop these partitions' caches unwritten: their last batches will never be published
        (a fenced worker's); the store keeps what was written at the last flush."""
        for partition in partitions:
            self._caches.pop(partition, None)
        if self._caches:
            self._share_cache()

    def close(self) -> None:
        self.release(list(self._stores))

    # -- the batch --------------------------------------------------------------------------

    def process(self, records: Sequence[Record]) -> BatchResult:
        """Decode, encode and fold ``records`` into copies of their users' states: nothing
        changes until :meth:`commit`, nothing is durable until :meth:`flush` (which the worker runs
        only once the batch is published).

        Two lines of defence against redelivery: records at or below the partition's
        processed offset are skipped whole; an event at or below its user's applied offset is
        skipped by the state math (for stores restored from elsewhere, issue 4).
        """
        result = BatchResult(model_version=self.model_version)
        partition_of = np.fromiter((r.partition for r in records), np.int64, len(records))
        offset_of = np.fromiter((r.offset for r in records), np.int64, len(records))
        partitions, slot = np.unique(partition_of, return_inverse=True)
        done = np.array([_or_before_first(self.cache(p).processed_offset()) for p in partitions.tolist()], np.int64)
        # A whole batch at or below a partition's processed offset was published and written:
        # a redelivery after a crash or a rewind. Skip it before decoding, so that it neither
        # counts twice nor dead-letters twice.
        fresh = np.flatnonzero(offset_of > done[slot])
        result.duplicates += len(records) - fresh.size
        if self.partitions is not None:
            fresh = self._placed(records, fresh, partition_of, result)
        fresh, deletes = self._controls(records, fresh, result)
        stamps = record_timestamps(records)
        decoded = decode_batch([records[i].value for i in fresh], [records[i].key for i in fresh],
                               judged_against_ms(self.clock_ms(), stamps[fresh]), self.policy)
        result.dead_letters.extend(DeadLetter(records[fresh[i]], why) for i, why in decoded.rejections)
        kept = fresh[decoded.index]  # record position of every valid event

        started = time.perf_counter()
        columns = BehaviorColumns.from_table(decoded.table)
        # Folded at the bounded time (schemas/event_time.py): the encoder does not read it.
        columns = replace(columns, time_s=fold_time_s(decoded.table.column("event_time_ms").to_numpy(), stamps[kept],
                                                       self.policy.max_landmark_lead_ms))
        codes, values = self.model.encode(columns) if kept.size else (None, None)
        result.encode_s = time.perf_counter() - started
        if codes is not None:
            cfg = self.model.config
            result.code_counts = np.stack([np.bincount(codes[:, g], minlength=cfg.codes) for g in range(cfg.groups)])

        started = time.perf_counter()
        events = _EventRows(decoded.table, partition_of[kept], offset_of[kept], kept, records, columns, codes, values)
        # Never move a partition's processed offset backwards (a rewound or redelivered batch).
        reached = done.copy()
        np.maximum.at(reached, slot, offset_of)
        for partition, offset in zip(partitions.tolist(), reached.tolist()):
            changed = self._apply_partition(partition, events, result, deletes.get(partition, {}))
            result.writes.append((partition, changed, offset))
        result.encode_wire()
        result.store_s = time.perf_counter() - started
        return result

    def _placed(self, records: Sequence[Record], fresh: np.ndarray, partition_of: np.ndarray,
                result: BatchResult) -> np.ndarray:
        """The positions of ``fresh`` whose records are on their key's partition; the others
        are dead-lettered (missing_key, wrong_partition): folded where they arrived, a user's
        events would split over two stores, which no replay or serving view reproduces."""
        rejected = misplaced([records[i].key for i in fresh.tolist()], partition_of[fresh], self.partitions)
        if not rejected:
            return fresh
        result.dead_letters.extend(DeadLetter(records[fresh[j]], why) for j, why in sorted(rejected.items()))
        keep = np.ones(fresh.size, bool)
        keep[list(rejected)] = False
        return fresh[keep]

    def commit(self, result: BatchResult, changelog_offsets: dict[int, int] | None = None) -> None:
        """Hand a batch to the caches: states, event-id windows, processed offset and, if
        published already, the changelog offset they reach (else :meth:`reached` gives it).
        Durable at the next :meth:`flush`, which must come only after its publication."""
        started = time.perf_counter()
        for partition, states, offset in result.writes:
            self.cache(partition).put(states, offset, (changelog_offsets or {}).get(partition),
                                      result.event_ids.get(partition), result.deletions.get(partition))
        result.store_s += time.perf_counter() - started

    def reached(self, changelog_offsets: dict[int, int]) -> None:
        """The changelog offsets a committed batch's publication reached."""
        for partition, offset in changelog_offsets.items():
            cache = self._caches.get(partition)
            if cache is not None:
                cache.reached(offset)

    def _controls(self, records: Sequence[Record], fresh: np.ndarray,
                  result: BatchResult) -> tuple[np.ndarray, dict[int, dict[str, int]]]:
        """Take the control messages out of ``fresh`` (the record positions to process):
        returns the rest, and per partition the users to delete with the input offset of
        their last delete request; a malformed control message is dead-lettered."""
        controls = [i for i in fresh.tolist() if is_control(records[i].headers)]
        if not controls:
            return fresh, {}
        deletes: dict[int, dict[str, int]] = {}
        for i in controls:
            record = records[i]
            request = decode_control(record.key, record.value, record.headers)
            if isinstance(request, DeleteUser):
                mine = deletes.setdefault(record.partition, {})
                mine[request.user_id] = max(record.offset, mine.get(request.user_id, -1))
            else:
                result.dead_letters.append(DeadLetter(record, request))
        return np.setdiff1d(fresh, np.asarray(controls, np.int64), assume_unique=True), deletes

    def _apply_partition(self, partition: int, events: "_EventRows", result: BatchResult,
                         deletes: dict[str, int]) -> StateBatch | None:
        """Fold the partition's events into its users' states; a user with a delete request
        in the batch starts from an empty state at the request's offset, so that only the
        events after the request apply (the state math skips those at or below it)."""
        rows = np.flatnonzero(events.partition == partition)
        if rows.size == 0 and not deletes:
            return None
        users, owner = events.users(rows) if rows.size else ([], np.empty(0, np.int64))
        if deletes:
            users, owner = _with_users(users, owner, deletes)
            result.deletions[partition] = deletes
        states = self.cache(partition).load(users)
        deleted = np.flatnonzero(np.isin(users, list(deletes))) if deletes else np.empty(0, np.int64)
        if deleted.size:
            states.clear(deleted)
            states.applied_offset[deleted] = [deletes[users[i]] for i in deleted.tolist()]
        if rows.size == 0:  # delete requests only
            return states.take(np.empty(0, np.int64))
        offsets = events.offset[rows]
        keep = np.ones(rows.size, dtype=bool)
        if self.event_id_window:
            keep = self._drop_repeated_ids(partition, rows, events, states, owner, offsets, result, deletes)
        applied = fold_events(
            states, owner[keep], events.codes[rows[keep]], events.values[rows[keep]].astype(np.float64),
            events.columns.time_s[rows[keep]], self._decay, offsets[keep],
        )
        result.applied += int(applied.sum())
        result.duplicates += int((~applied).sum())
        changed = np.unique(owner[keep][applied])
        return states if changed.size == len(states) else states.take(changed)

    def _drop_repeated_ids(
        self,
        partition: int,
        rows: np.ndarray,
        events: "_EventRows",
        states: StateBatch,
        owner: np.ndarray,
        offsets: np.ndarray,
        result: BatchResult,
        deletes: dict[str, int],
    ) -> np.ndarray:
        """Dead-letter events whose id the user already sent (among the last
        ``event_id_window`` ids accepted before this batch, or earlier in this batch);
        returns the mask of rows to apply.

        Only rows above the user's applied offset are judged: a row at or below it is a
        redelivery of this very record, which the offsets already make a no-op.
        """
        users = states.user_ids
        windows = self.cache(partition).load_event_ids(users)
        if deletes:  # a deleted user's ids are forgotten with it
            windows = [_NO_IDS if user in deletes else window for user, window in zip(users, windows)]
        order = np.argsort(offsets, kind="stable")
        judged = order[offsets[order] > states.applied_offset[owner[order]]]
        event_ids = events.event_ids(rows[judged])
        fingerprints = _fingerprints(event_ids)
        who = owner[judged]
        repeated = _in_windows(windows, who, fingerprints)
        # Earlier in this batch: in (user, fingerprint, arrival) order, all but the first of equals.
        ranked = np.lexsort((np.arange(who.size), fingerprints, who))
        same = (who[ranked][1:] == who[ranked][:-1]) & (fingerprints[ranked][1:] == fingerprints[ranked][:-1])
        repeated[ranked[1:]] |= same

        keep = np.ones(rows.size, dtype=bool)
        keep[judged[repeated]] = False
        for j in np.flatnonzero(repeated).tolist():
            result.dead_letters.append(DeadLetter(events.record(rows[judged[j]]), Rejection(
                Reason.DUPLICATE_EVENT_ID, f"event_id {event_ids[j]!r} was already received for this user")))
        new_owner, new_ids = owner[judged[~repeated]], fingerprints[~repeated]
        by_user = np.argsort(new_owner, kind="stable")  # keeps offset order within a user
        bounds = np.searchsorted(new_owner[by_user], np.arange(len(users) + 1))
        new_ids = new_ids[by_user]
        result.event_ids[partition] = {
            users[u]: np.concatenate([windows[u], new_ids[bounds[u]:bounds[u + 1]]])[-self.event_id_window:]
            for u in np.flatnonzero(np.diff(bounds))
        }
        return keep


@dataclass(frozen=True)
class _EventRows:
    """A batch's valid events as aligned columns, with where each came from."""

    table: pa.Table  # the decoded events (schemas/batch_decode.py)
    partition: np.ndarray
    offset: np.ndarray
    position: np.ndarray  # index into the batch's records
    records: Sequence[Record]
    columns: BehaviorColumns
    codes: np.ndarray | None
    values: np.ndarray | None

    def users(self, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The distinct users of ``rows`` (sorted) and each row's index among them."""
        encoded = pc.dictionary_encode(self.table.column("user_id").take(pa.array(rows))).combine_chunks()
        names = encoded.dictionary.to_pylist()
        order = np.argsort(names)
        rank = np.empty(order.size, np.int64)
        rank[order] = np.arange(order.size)
        return [names[i] for i in order], rank[encoded.indices.to_numpy()]

    def event_ids(self, rows: np.ndarray) -> list[str]:
        return self.table.column("event_id").take(pa.array(rows)).to_pylist()

    def record(self, row: int) -> Record:
        return self.records[int(self.position[row])]


def record_timestamps(records: Sequence[Record]) -> np.ndarray:
    """Each record's Kafka timestamp in ms (int64), NO_TIMESTAMP where it has none."""
    stamps = (getattr(r, "timestamp", None) for r in records)
    return np.fromiter((NO_TIMESTAMP if s is None or s < 0 else s for s in stamps), np.int64, len(records))


_NO_IDS = np.empty(0, np.uint64)


def _with_users(users: list[str], owner: np.ndarray, extra: dict[str, int]) -> tuple[list[str], np.ndarray]:
    """``users`` (sorted) with the ``extra`` ones added, still sorted, and ``owner`` (rows'
    indices into ``users``) remapped to the new list."""
    merged = sorted(set(users).union(extra))
    where = {user: i for i, user in enumerate(merged)}
    remap = np.fromiter((where[user] for user in users), np.int64, len(users))
    return merged, remap[owner] if owner.size else owner


def _or_before_first(offset: int | None) -> int:
    """A processed offset, with -1 for a partition that has processed nothing."""
    return -1 if offset is None else offset


_USER_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: spreads user indices over the 64-bit key space


def _in_windows(windows: list[np.ndarray], who: np.ndarray, fingerprints: np.ndarray) -> np.ndarray:
    """Whether each fingerprint is in its user's window (``windows[who[i]]``).

    Why not one sort of windows and batch together: a worker that keeps up sees each user
    once or twice a batch, against a window of up to ``event_id_window`` stored ids each, so
    the sort ranked ~640,000 (user, id) pairs to judge ~5,000 events (190 ms a batch with
    2,500 users' full windows; this way 14 ms). Each (user, id) becomes one 64-bit key, the
    windows' keys are sorted once and the batch's looked up; a key that collides across
    users is told apart by comparing the user's own window (hits are the rare repeats)."""
    sizes = np.fromiter((w.size for w in windows), np.int64, len(windows))
    found = np.zeros(who.size, dtype=bool)
    if not sizes.sum() or not who.size:
        return found
    keys = np.concatenate(windows) + np.repeat(np.arange(len(windows), dtype=np.uint64), sizes) * _USER_MIX
    keys.sort()
    mine = fingerprints + who.astype(np.uint64) * _USER_MIX
    found = keys[np.searchsorted(keys, mine).clip(max=keys.size - 1)] == mine
    for i in np.flatnonzero(found).tolist():
        found[i] = bool((windows[who[i]] == fingerprints[i]).any())
    return found


def _fingerprints(event_ids: list[str]) -> np.ndarray:
    """Stable 64-bit fingerprints of event ids (Python's hash() changes per process)."""
    digests = b"".join([hashlib.blake2b(event_id.encode(), digest_size=8).digest() for event_id in event_ids])
    return np.frombuffer(digests, "<u8").copy()
