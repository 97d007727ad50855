"""The ranking backend's entry point: a user's state from the local view, scored with numpy.

``RankingClient.score(user_id, candidates, now)`` reads the state from the local store,
checks that the view can vouch for it, and runs :class:`vql.model.scoring.Scorer`: the cost
is O(N * H * K * d_h) whatever the length of the user's history. Nothing here imports torch
or Faust, so a backend installs numpy, rocksdict and kafka-python to score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vql.model.features import Candidates
from vql.model.scoring import Scorer, Scores
from vql.schemas.events import Modality
from vql.schemas.user_state import UserState, decode_user_state
from vql.serving.errors import InvalidCandidates, StaleState, UserNotFound
from vql.serving.follower import StateFollower
from vql.serving.store import StateStore


@dataclass(frozen=True)
class Freshness:
    """How far the local view may be behind the topic, and whether that is too far."""

    lag: int | None  # records published but not applied; None without a follower
    age_s: float | None  # seconds since the follower last reached the broker
    stale: bool
    reason: str  # why it is stale, empty when it is not


@dataclass(frozen=True)
class Ranking:
    """The scores of one request and what they were computed from."""

    scores: Scores  # interest (N, H, d_h) and ctr (N,)
    state: UserState
    freshness: Freshness


@dataclass(frozen=True)
class FreshnessPolicy:
    """When the view stops vouching for its states: more than ``max_lag`` records behind,
    or no contact with the broker for ``max_silence_s`` seconds."""

    max_lag: int = 1000
    max_silence_s: float = 10.0


class RankingClient:
    """Scores candidates for users of one states topic with one model artifact."""

    def __init__(self, scorer: Scorer, store: StateStore, follower: StateFollower | None = None,
                 policy: FreshnessPolicy = FreshnessPolicy()) -> None:
        """Without a follower the store is served as it is on disk (a restored copy, or a
        benchmark's), and freshness is the operator's concern: nothing is flagged stale."""
        self.scorer = scorer
        self.store = store
        self.follower = follower
        self.policy = policy

    @classmethod
    def connect(cls, bootstrap: str, topic: str, model_path: Path, store_dir: Path, *,
                policy: FreshnessPolicy = FreshnessPolicy(), follow: bool = True,
                restore_timeout_s: float = 120.0) -> "RankingClient":
        """Open the local copy of ``topic`` under ``store_dir``, catch up with the topic
        (the restore on start: only what the copy lacks is read), then follow it in a thread.
        A restore that times out is not fatal: the view reports its lag, requests see
        staleness. With ``follow`` False the copy is served as it is on disk."""
        scorer = Scorer.from_path(model_path)
        store = StateStore(store_dir / topic, topic)
        follower = None
        if follow:
            try:
                follower = StateFollower(bootstrap, store)
            except BaseException:
                store.close()
                raise
            follower.catch_up(restore_timeout_s)
            follower.start()
        return cls(scorer, store, follower, policy)

    @property
    def model_version(self) -> str:
        return self.scorer.version

    def freshness(self) -> Freshness:
        if self.follower is None:
            return Freshness(lag=None, age_s=None, stale=False, reason="")
        status = self.follower.status
        age = time.monotonic() - status.checked_at
        if status.checked_at == -float("inf"):
            return Freshness(lag=None, age_s=None, stale=True, reason="the view has not reached the broker yet")
        if age > self.policy.max_silence_s:
            reason = f"no contact with the broker for {age:.1f} s (limit {self.policy.max_silence_s} s)"
        elif status.total_lag > self.policy.max_lag:
            reason = f"the view is {status.total_lag} records behind the topic (limit {self.policy.max_lag})"
        else:
            reason = ""
        return Freshness(lag=status.total_lag, age_s=age, stale=bool(reason), reason=reason)

    def state(self, user_id: str) -> UserState:
        """The user's state as the local view holds it (:class:`UserNotFound` if none)."""
        blob = self.store.get(user_id)
        if blob is None:
            raise UserNotFound(f"no state for user {user_id!r} in topic {self.store.topic!r}")
        return decode_user_state(blob)

    def score(self, user_id: str, candidates: Candidates, now_s: float | None = None, *,
              allow_stale: bool = False) -> Ranking:
        """Interest vectors and CTR probabilities of every candidate for this user at ``now_s``
        (epoch seconds, default: the clock). Raises :class:`UserNotFound`, :class:`StaleState`
        (unless ``allow_stale``), :class:`InvalidCandidates`, or
        :class:`vql.model.scoring.ModelVersionMismatch` for a state of another model."""
        check_candidates(candidates)
        freshness = self.freshness()
        if freshness.stale and not allow_stale:
            raise StaleState(freshness.reason)
        state = self.state(user_id)
        now = time.time() if now_s is None else float(now_s)
        return Ranking(scores=self.scorer.score(state, candidates, now), state=state, freshness=freshness)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.store.close()


def check_candidates(candidates: Candidates) -> None:
    """Reject what the scorer would mis-score silently: ragged columns, negative ids, or a
    modality outside the schema's (an embedding row that does not exist)."""
    columns = {name: np.asarray(getattr(candidates, name)) for name in ("item", "category", "modality")}
    shapes = {name: column.shape for name, column in columns.items()}
    if len(set(shapes.values())) != 1 or len(shapes["item"]) != 1 or shapes["item"][0] == 0:
        raise InvalidCandidates(f"candidate columns must be 1-d, non-empty and of one length, got {shapes}")
    for name, column in columns.items():
        if not np.issubdtype(column.dtype, np.integer):
            raise InvalidCandidates(f"candidate {name} ids must be integers, got {column.dtype}")
        if column.min() < 0:
            raise InvalidCandidates(f"candidate {name} ids must be >= 0")
    if columns["modality"].max() >= len(Modality):
        raise InvalidCandidates(f"candidate modality must be an index below {len(Modality)} "
                                f"({', '.join(m.value for m in Modality)})")
