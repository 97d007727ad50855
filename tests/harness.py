"""Runs real workers against a real broker, and verifies what they published.

The verifier recomputes every user's state offline from the `behaviors` topic with the same
model and the same state math (vql.model.state), and compares it with what a worker
published: the states themselves and the scores they give candidates.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition

from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns, Candidates
from vql.model.scoring import Scorer
from vql.model.state import apply_events, empty_state
from vql.schemas.control import DeleteUser, decode_control, is_control
from vql.schemas.decode import EventPolicy, Reason, Rejection, decode_event
from vql.schemas.event_time import fold_time_s, judged_against_ms
from vql.schemas.placement import misplaced
from vql.schemas.user_state import UserState, decode_user_state
from vql.streams.demo import read_states, start_worker, stop_worker
from vql.streams.kafka_security import kafka_python_security
from vql.streams.settings import Settings
from vql.streams.topics import ensure_topics, read_topic

TOLERANCE = 1e-5


@dataclass
class Pipeline:
    """Topics, a model and a data dir of one test, with workers started on demand."""

    settings: Settings
    workers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, bootstrap: str, tmp_path: Path, partitions: int = 3) -> "Pipeline":
        model_path = tmp_path / "model.npz"
        VQLModel(ModelConfig()).save(model_path)
        settings = Settings(
            kafka_bootstrap=bootstrap, data_dir=tmp_path, model_path=model_path, partitions=partitions,
            web_port=0, batch_size=500, session_timeout_s=6.0,
            commit_interval_s=1.0,  # tests wait for commits: the same protocol as the default 5 s, sooner
        ).scoped(f"test-{uuid.uuid4().hex[:8]}")
        ensure_topics(settings)
        return cls(settings)

    def start_worker(self, host: str | None = None, **overrides) -> subprocess.Popen:
        """A worker process; with ``host``, its stores live in a data dir of their own, as on
        another machine (by default all workers share one). ``overrides``: Settings fields."""
        index = len(list(self.settings.data_dir.glob("worker-*.log")))
        settings = self.settings.model_copy(update=overrides)
        if host is not None:
            settings = settings.model_copy(update={"data_dir": self.settings.data_dir / "hosts" / host})
        worker = start_worker(settings, self.settings.data_dir / f"worker-{index}.log")
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            stop_worker(worker)
        self.workers.clear()

    def committed(self) -> int:
        """Input records the consumer group has committed, over all partitions."""
        consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                 group_id=self.settings.app_id, enable_auto_commit=False,
                                 **kafka_python_security())
        try:
            parts = consumer.partitions_for_topic(self.settings.behaviors_topic) or set()
            return sum(consumer.committed(TopicPartition(self.settings.behaviors_topic, p)) or 0 for p in parts)
        finally:
            consumer.close()

    def wait_until_committed(self, total: int, timeout_s: float = 180.0, poll_s: float = 0.5) -> None:
        """Until the group has committed ``total`` records; fails if a live worker dies."""
        deadline = time.monotonic() + timeout_s
        while self.committed() < total:
            for worker in self.workers:
                if worker.poll() not in (None, -9):  # -9: killed on purpose by a test
                    raise AssertionError(f"a worker exited with {worker.returncode}\n{self.worker_logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.committed()} of {total} committed\n{self.worker_logs()}")
            time.sleep(poll_s)

    def batch_totals(self, log_index: int) -> dict[str, int]:
        """Sums of the per-batch counts a worker logged: applied, duplicates, dead letters."""
        totals = {"applied": 0, "duplicates": 0, "dead letters": 0}
        text = (self.settings.data_dir / f"worker-{log_index}.log").read_text()
        for line in text.splitlines():
            if "batch:" in line:
                for part in line.split("batch:")[1].split(","):
                    number, _, name = part.strip().partition(" ")
                    if name in totals:
                        totals[name] += int(number)
        return totals

    def worker_logs(self) -> str:
        logs = sorted(self.settings.data_dir.glob("worker-*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)

    def published(self) -> dict[str, UserState]:
        return {key.decode(): decode_user_state(value) for key, value in read_states(self.settings).items()}


@dataclass
class Recomputed:
    states: dict[str, UserState]
    rejected: dict[tuple[int, int], Rejection]  # (partition, offset) -> why


def surviving_events(records) -> set[tuple[int, int]]:
    """(partition, offset) of the records (partition, offset, key, value, headers; each
    partition in offset order) that no later delete request of their user deletes: the
    deletion rule (docs/operations.md). Control messages themselves never survive."""
    last_delete: dict[str, tuple[int, int]] = {}  # user -> (partition, offset) of its last request
    users: dict[tuple[int, int], str] = {}
    for partition, offset, key, value, headers in records:
        if is_control(headers):
            request = decode_control(key, value, headers)
            if isinstance(request, DeleteUser):
                last_delete[request.user_id] = (partition, offset)
        else:
            users[(partition, offset)] = _user_of(key, value)
    return {where for where, user in users.items()
            if user not in last_delete or where[0] != last_delete[user][0] or where[1] > last_delete[user][1]}


def _user_of(key: bytes | None, value: bytes | None) -> str:
    """The user an event record is for: its user_id if it has one, else its key."""
    try:
        user = orjson.loads(value).get("user_id") if value else None
    except (orjson.JSONDecodeError, AttributeError):
        user = None
    return user if isinstance(user, str) else (key or b"").decode("utf-8", "replace")


def recompute(settings: Settings, now_ms: int | None = None) -> Recomputed:
    """Every user's state rebuilt offline from the behaviors topic, in one batch: the events
    after each user's last delete request (a user whose last word was a delete has none);
    an event id counts once per user since the user's last delete request."""
    model, version = VQLModel.load(settings.model_path)
    cfg = model.config
    policy: EventPolicy = settings.event_policy()
    now_ms = now_ms or int(time.time() * 1000)
    read = list(read_topic(settings.kafka_bootstrap, settings.behaviors_topic, with_timestamps=True))
    records = [record[:5] for record in read]
    stamp_of = {(record[0], record[1]): record[5] for record in read}  # Kafka timestamps
    survivors = surviving_events(records)
    events, stamps, rejected, seen_ids = [], [], {}, set()
    for partition, offset, key, value, headers in records:
        if wrong := misplaced([key], np.array([partition]), settings.partitions).get(0):
            rejected[(partition, offset)] = wrong
            continue
        if is_control(headers):
            request = decode_control(key, value, headers)
            if isinstance(request, Rejection):
                rejected[(partition, offset)] = request
            else:
                seen_ids = {(user, event_id) for user, event_id in seen_ids if user != request.user_id}
            continue
        stamp = stamp_of[(partition, offset)]
        decoded = decode_event(value, key, int(judged_against_ms(now_ms, np.array([stamp]))[0]), policy)
        if not isinstance(decoded, Rejection) and (decoded.user_id, decoded.event_id) in seen_ids:
            decoded = Rejection(Reason.DUPLICATE_EVENT_ID, decoded.event_id)  # a user's id counts once
        if isinstance(decoded, Rejection):
            rejected[(partition, offset)] = decoded
        else:
            seen_ids.add((decoded.user_id, decoded.event_id))
            if (partition, offset) in survivors:
                events.append(decoded)
                stamps.append(stamp)
    users = sorted({e.user_id for e in events})
    slot = {u: i for i, u in enumerate(users)}
    states = [empty_state(u, version, (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim)) for u in users]
    if events:
        columns = BehaviorColumns.from_events(events)
        codes, values = model.encode(columns)
        owner = np.fromiter((slot[e.user_id] for e in events), np.int64, len(events))
        # The worker's rule for the time an event is folded at, from the same module.
        times_s = fold_time_s(np.array([e.event_time_ms for e in events], np.int64), np.array(stamps, np.int64),
                              policy.max_landmark_lead_ms)
        apply_events(states, owner, codes, values.astype(np.float64), times_s, np.asarray(cfg.decay_rates))
    return Recomputed(states={s.user_id: s for s in states}, rejected=rejected)


@dataclass
class Comparison:
    users_compared: int
    users_missing: list[str]
    users_unexpected: list[str]
    users_differing: list[str]
    events_expected: int
    events_published: int
    max_score_diff: float

    @property
    def ok(self) -> bool:
        return not (self.users_missing or self.users_unexpected or self.users_differing)

    def summary(self) -> str:
        return (f"users compared {self.users_compared}, missing {len(self.users_missing)}, "
                f"unexpected {len(self.users_unexpected)}, differing {len(self.users_differing)}; "
                f"events expected {self.events_expected}, in states {self.events_published} "
                f"(lost {max(0, self.events_expected - self.events_published)}, "
                f"doubled {max(0, self.events_published - self.events_expected)}); "
                f"max score diff {self.max_score_diff:.2e}")


def compare(settings: Settings, published: dict[str, UserState], expected: dict[str, UserState],
            candidates: int = 64) -> Comparison:
    """Published vs recomputed: event counts, landmarks, and scores of random candidates."""
    scorer = Scorer.from_path(settings.model_path)
    rng = np.random.default_rng(0)
    cands = Candidates(item=rng.integers(0, 2_000_000, candidates), category=rng.integers(0, 200, candidates),
                       modality=rng.integers(0, 5, candidates))
    differing, worst = [], 0.0
    for user in sorted(set(published) & set(expected)):
        got, want = published[user], expected[user]
        now = max(got.last_event_time, want.last_event_time) + 3600.0
        a, b = scorer.score(got, cands, now), scorer.score(want, cands, now)
        diff = max(np.abs(a.interest - b.interest).max(), np.abs(a.ctr - b.ctr).max())
        worst = max(worst, float(diff))
        same_cells = np.array_equal(np.isfinite(got.log_count), np.isfinite(want.log_count))
        if got.event_count != want.event_count or got.landmark_t0 != want.landmark_t0 or not same_cells \
                or diff > TOLERANCE:
            differing.append(user)
    return Comparison(
        users_compared=len(set(published) & set(expected)),
        users_missing=sorted(set(expected) - set(published)),
        users_unexpected=sorted(set(published) - set(expected)),
        users_differing=differing,
        events_expected=sum(s.event_count for s in expected.values()),
        events_published=sum(s.event_count for s in published.values()),
        max_score_diff=worst,
    )
