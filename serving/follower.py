"""Keeps a :class:`StateStore` current with the compacted `user-states` topic.

A group-less kafka-python consumer (the backend tracks its own positions in the store, so
any number of backends read the topic independently) resumes each partition where the store
says, applies what it reads, and measures its lag against the partitions' end offsets. The
consumer is not thread-safe, so one thread owns it (:meth:`start`); readers see only the
immutable :class:`FollowerStatus` it publishes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kafka import TopicPartition
from kafka.errors import KafkaError

from vql.serving.store import StateStore
from vql.streams.topics import BrokerUnavailable, reader

log = logging.getLogger(__name__)


class TopicMissing(RuntimeError):
    """The states topic does not exist (yet): nothing publishes states under that name."""


@dataclass(frozen=True)
class FollowerStatus:
    """What the view knows of its own freshness, as of ``checked_at`` (time.monotonic)."""

    lag: dict[int, int]  # partition -> records published but not yet applied
    checked_at: float  # last successful contact with the broker; -inf before the first

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())


class StateFollower:
    """Tails the states topic into the store; :attr:`status` tells how far behind it is."""

    def __init__(self, bootstrap: str, store: StateStore, max_records: int = 10_000,
                 metadata_max_age_s: float = 30.0) -> None:
        self.store = store
        self._max_records = max_records
        self.partition_changes = 0  # times the topic's partition count changed under this view
        try:
            # The metadata age bounds how soon a partition-count change is seen (:meth:`_follow_partitions`).
            self._consumer = reader(bootstrap, allow_auto_create_topics=False,
                                    metadata_max_age_ms=int(metadata_max_age_s * 1000))
        except KafkaError as exc:
            raise BrokerUnavailable(f"no Kafka broker answers at {bootstrap}: {exc}") from exc
        partitions = self._consumer.partitions_for_topic(store.topic)
        if not partitions:
            self._consumer.close()
            raise TopicMissing(f"topic {store.topic!r} does not exist at {bootstrap}")
        self._partitions = [TopicPartition(store.topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._partitions)
        resume = store.next_offsets()
        for tp in self._partitions:
            if tp.partition in resume:
                self._consumer.seek(tp, resume[tp.partition])
            else:
                self._consumer.seek_to_beginning(tp)
        self.status = FollowerStatus(lag={tp.partition: -1 for tp in self._partitions}, checked_at=-float("inf"))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, timeout_s: float = 0.5) -> int:
        """Apply what arrived within ``timeout_s`` and refresh the lag; return records applied."""
        self._follow_partitions()
        batch = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=self._max_records)
        changes = [(m.key, m.value) for messages in batch.values() for m in messages if m.key is not None]
        positions = {tp: self._consumer.position(tp) for tp in self._partitions}
        if batch:
            self.store.apply(changes, {tp.partition: positions[tp] for tp in batch})
        ends = self._consumer.end_offsets(self._partitions)
        self.status = FollowerStatus(
            lag={tp.partition: max(0, ends[tp] - positions[tp]) for tp in self._partitions},
            checked_at=time.monotonic(),
        )
        return len(changes)

    def _follow_partitions(self) -> None:
        """Read the partitions the topic has now. A partition-count change means the workers
        that publish here were restarted on re-created topics, or ought to be (they stop and
        refuse to start: docs/operations.md); the view follows the new partitions from their
        beginning, so that the states published there reach it, and logs the change."""
        current = self._consumer.partitions_for_topic(self.store.topic) or set()
        if not current or len(current) == len(self._partitions):
            return
        log.warning("state follower: %s now has %d partitions, not %d: following them all (a partition-count "
                    "change; see docs/operations.md)", self.store.topic, len(current), len(self._partitions))
        positions = {tp: self._consumer.position(tp) for tp in self._partitions if tp.partition in current}
        self._partitions = [TopicPartition(self.store.topic, p) for p in sorted(current)]
        self._consumer.assign(self._partitions)
        resume = self.store.next_offsets()
        for tp in self._partitions:
            if tp in positions:
                self._consumer.seek(tp, positions[tp])
            elif tp.partition in resume:
                self._consumer.seek(tp, resume[tp.partition])
            else:
                self._consumer.seek_to_beginning(tp)
        self.partition_changes += 1

    def catch_up(self, timeout_s: float) -> bool:
        """Read until no partition lags (True) or ``timeout_s`` passes (False): the restore on start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._tolerant_step(min(0.5, max(0.0, deadline - time.monotonic())))
            if self.status.total_lag == 0:
                return True
        return False

    def start(self, interval_s: float = 0.5) -> None:
        """Follow in a daemon thread until :meth:`stop`."""

        def follow() -> None:
            while not self._stop.is_set():
                self._tolerant_step(interval_s)

        self._thread = threading.Thread(target=follow, name="vql-state-follower", daemon=True)
        self._thread.start()

    def _tolerant_step(self, timeout_s: float) -> None:
        """A broker outage is not fatal: the status stops being refreshed, and its age is what
        requests see as staleness."""
        try:
            self.step(timeout_s)
        except KafkaError as exc:
            log.warning("state follower: %s", exc)
            self._stop.wait(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._consumer.close()
