"""A write-behind cache of one partition's states in front of its RocksDB store.

Why: a worker touches most of its active users in every micro-batch, and without a cache
each of them costs a RocksDB read, a decode of its ~26 KB float64 state, an encode and a
RocksDB write per batch: more than the fold and the model together (docs/performance.md).
The cache keeps recently used states decoded, as the rows of one :class:`StateBatch` (the
arena): a batch copies its users' rows out, folds and publishes them, then copies them back
(:meth:`StateCache.put`). RocksDB gets the changed states, their event-id windows and the
partition's offsets in one WriteBatch per :meth:`StateCache.flush`: every commit interval,
when the cache outgrows its budget, before a partition leaves and on shutdown. Kafka
Streams' caching stores work the same way (``commit.interval.ms``,
``statestore.cache.max.bytes``).

Why it is safe (design/pipeline.md): the input offsets are committed only after a flush,
and a flush comes only after every state put before it is published (streams/consumer.py
waits for the publication in flight, and drops the caches if it failed). A crash loses what
was cached since the last flush; its records come again from the committed offset, to a store as it was at
that flush (the states topic, restored first, is never behind it), and per-user applied
offsets make every event count once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from vql.schemas.user_state import StateBatch
from vql.streams.state_store import PartitionStore

_NO_IDS = np.empty(0, np.uint64)


class StateCache:
    """One partition's recently used states and event-id windows, and what is not yet on disk."""

    def __init__(self, store: PartitionStore, shape: tuple[int, int, int, int], capacity: int = 0) -> None:
        self.store = store
        self.capacity = capacity  # states kept after a flush; more may be resident until the next one
        self._arena = StateBatch.empty([], store.model_version, shape)
        self._row: dict[str, int] = {}  # resident user -> arena row
        self._free: list[int] = []
        self._last_used = np.zeros(0, np.int64)  # per row: the load that last asked for it
        self._dirty = np.zeros(0, bool)  # per row: changed since the last flush
        self._loads = 0
        self._windows: dict[str, np.ndarray] = {}  # resident users' event-id fingerprints
        self._dirty_windows: set[str] = set()
        self._deleted: dict[str, int] = {}  # users deleted since the last flush -> the request's offset
        self._processed = store.processed_offset()
        self._changelog = store.changelog_offset()
        self._unflushed = False

    def __len__(self) -> int:
        """Resident states."""
        return len(self._row)

    @property
    def over_capacity(self) -> bool:
        return len(self._row) > self.capacity

    @property
    def unflushed(self) -> bool:
        """Whether anything was put since the last flush."""
        return self._unflushed

    def processed_offset(self) -> int | None:
        """The last input offset whose batch was put (durable or not), or None."""
        return self._processed

    def load(self, user_ids: Sequence[str]) -> StateBatch:
        """These users' states, in order, as a new batch (copies: the cache changes only by
        :meth:`put`); a user never seen gets an empty state."""
        rows = self._resident(user_ids)  # first: making room may replace the arena
        return self._arena.take(rows)

    def load_event_ids(self, user_ids: Sequence[str]) -> list[np.ndarray]:
        """Each user's recent event-id fingerprints (oldest first; empty if none)."""
        missing = [u for u in user_ids if u not in self._windows]
        if missing:
            self._windows.update(zip(missing, self.store.load_event_ids(missing)))
        return [self._windows.get(u, _NO_IDS) for u in user_ids]

    def put(self, states: StateBatch | None, processed_offset: int | None, changelog_offset: int | None = None,
            event_ids: dict[str, np.ndarray] | None = None, deletions: dict[str, int] | None = None) -> None:
        """Take a published batch's deleted users (user -> the delete request's input
        offset), states, its users' new event-id windows and the offsets it reached, to be
        written by the next :meth:`flush`. A deleted user stays resident (and unevictable
        until the flush deletes it from the store) as an empty state at the request's offset;
        a state of the same batch re-creates it from the events after the request."""
        if deletions:
            users = list(deletions)
            rows = self._resident(users, fetch=False)
            self._arena.clear(rows)
            self._arena.applied_offset[rows] = np.fromiter(deletions.values(), np.int64, len(users))
            self._dirty[rows] = False
            for user_id in users:
                self._windows[user_id] = _NO_IDS
                self._dirty_windows.discard(user_id)
            self._deleted.update(deletions)
        if states is not None and len(states):
            rows = self._resident(states.user_ids, fetch=False)
            self._arena.put(rows, states)
            self._dirty[rows] = True
        for user_id, window in (event_ids or {}).items():
            self._windows[user_id] = window
            self._dirty_windows.add(user_id)
        if processed_offset is not None:
            self._processed = processed_offset
        if changelog_offset is not None:
            self._changelog = changelog_offset
        self._unflushed = True

    def unflushed_states(self, limit: int) -> Iterator[StateBatch]:
        """The states put since the last flush (what it will write), as copies of at most
        ``limit`` states each: a replay publishes them just before the flush, each changed
        user once, instead of once per batch."""
        dirty = np.flatnonzero(self._dirty)
        for start in range(0, dirty.size, limit):
            yield self._arena.take(dirty[start:start + limit])

    def unflushed_deletions(self) -> dict[str, int]:
        """The users deleted since the last flush (what it will delete from the store), with
        the input offsets of their delete requests."""
        return dict(self._deleted)

    def reached(self, changelog_offset: int) -> None:
        """The changelog offset that the states put so far reach, once published."""
        self._changelog = max(changelog_offset, self._changelog if self._changelog is not None else -1)
        self._unflushed = True

    def flush(self) -> int | None:
        """Write everything put since the last flush in one WriteBatch, then shrink to
        ``capacity``; returns the processed offset now durable (None: nothing processed)."""
        if self._unflushed:
            dirty = np.flatnonzero(self._dirty)
            self.store.write(self._arena, self._processed, self._changelog,
                             {u: self._windows[u] for u in self._dirty_windows if u in self._windows}, rows=dirty,
                             deletions=self._deleted)
            self._dirty[:] = False
            self._dirty_windows.clear()
            self._deleted = {}
            self._unflushed = False
        self._evict(len(self._row) - self.capacity)
        return self._processed

    # -- residency ------------------------------------------------------------------------------

    def _resident(self, user_ids: Sequence[str], fetch: bool = True) -> np.ndarray:
        """The arena rows of these users, making room and (with ``fetch``) reading the
        missing ones from the store."""
        self._loads += 1
        rows = np.fromiter((self._row.get(u, -1) for u in user_ids), np.int64, len(user_ids))
        hit = rows >= 0
        self._last_used[rows[hit]] = self._loads
        missing = np.flatnonzero(~hit)
        if missing.size:
            self._evict(len(self._row) + missing.size - self.capacity, keep=rows[hit])
            new_rows = self._allocate(missing.size)
            for row, i in zip(new_rows.tolist(), missing.tolist()):
                self._row[user_ids[i]] = row
                self._arena.user_ids[row] = user_ids[i]
            self._arena.clear(new_rows)
            if fetch:
                self.store.load_into(self._arena, new_rows)
            self._last_used[new_rows] = self._loads
            rows[missing] = new_rows
        return rows

    def _allocate(self, count: int) -> np.ndarray:
        if len(self._free) < count:
            # Straight to the budget, then doubling: each growth copies the arena, while rows
            # never used cost no memory (their pages are not touched).
            size = len(self._arena)
            grown = max(2 * size, size + count - len(self._free), self.capacity, 64)
            self._arena = self._arena.grown(grown)
            self._last_used = np.concatenate([self._last_used, np.zeros(grown - size, np.int64)])
            self._dirty = np.concatenate([self._dirty, np.zeros(grown - size, bool)])
            self._free.extend(range(grown - 1, size - 1, -1))
        taken, self._free = self._free[-count:], self._free[:-count]
        return np.asarray(taken[::-1], np.int64)

    def _evict(self, count: int, keep: np.ndarray | None = None) -> None:
        """Drop up to ``count`` clean states, least recently used first, never the rows in
        ``keep`` (those of the load in progress): an evicted user is read from the store
        again when it returns."""
        if count <= 0:
            return
        candidate = np.zeros(len(self._arena), bool)
        candidate[list(self._row.values())] = True
        candidate &= ~self._dirty
        # A deleted user's store row goes only at the flush: read back now, it would return.
        candidate[[self._row[u] for u in self._deleted if u in self._row]] = False
        if keep is not None:
            candidate[keep] = False
        candidates = np.flatnonzero(candidate)
        victims = candidates[np.argsort(self._last_used[candidates], kind="stable")[:count]]
        for row in victims.tolist():
            user_id = self._arena.user_ids[row]
            del self._row[user_id]
            self._windows.pop(user_id, None)
            self._arena.user_ids[row] = ""
        self._free.extend(victims.tolist())
