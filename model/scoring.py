"""Scoring N candidates against a user state, on numpy alone (design/vql.md sections 4 and 7).

Cost is O(N * H * K * d_h) whatever the history length: the rates are folded into per-code
sums once per request, then attention is two matrix products per head. No torch import, so a
ranking backend can score with the artifact and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vql.model.artifact import Artifact, ArtifactError, load_artifact
from vql.model.config import ModelConfig
from vql.model.features import Candidates, hash_buckets
from vql.model.state import read_log_count
from vql.schemas.user_state import UserState


class ModelVersionMismatch(ValueError):
    """A state was built by another model than the scorer's: its codes mean other things."""


@dataclass(frozen=True)
class Scores:
    interest: np.ndarray  # (N, H, head_dim): the VQL attention output per candidate
    ctr: np.ndarray  # (N,): the CTR head's probability


class Scorer:
    """Scores candidates from states built by one model artifact."""

    def __init__(self, artifact: Artifact) -> None:
        self.config: ModelConfig = artifact.config
        self.version = artifact.version
        cfg = self.config
        w = artifact.arrays
        try:
            self._item = w["item_embedding.weight"]
            self._category = w["category_embedding.weight"]
            self._modality = w["modality_embedding.weight"]
            self._query = w["query.weight"].T  # (target_dim, H*d_h)
            # Codebook slice of head h (slot j of group g): (H, K, d_h).
            codebooks = w["codebooks"].reshape(cfg.groups, cfg.codes, cfg.heads_per_group, cfg.head_dim)
            self._head_codes = codebooks.transpose(0, 2, 1, 3).reshape(cfg.heads, cfg.codes, cfg.head_dim)
            logits = w["rate_logits"]
            self._mixture = np.exp(logits - logits.max(-1, keepdims=True))
            self._mixture /= self._mixture.sum(-1, keepdims=True)  # (H, R)
            self._mlp = [(w["head.0.weight"].T, w["head.0.bias"]), (w["head.2.weight"].T, w["head.2.bias"])]
        except KeyError as exc:
            raise ArtifactError(f"artifact {artifact.version} lacks the array {exc}") from exc
        self._decay = np.asarray(cfg.decay_rates)
        self._group_of_head = np.arange(cfg.heads) // cfg.heads_per_group
        self._slot_of_head = np.arange(cfg.heads) % cfg.heads_per_group

    @classmethod
    def from_path(cls, path: str | Path) -> "Scorer":
        return cls(load_artifact(path))

    def target_features(self, candidates: Candidates) -> np.ndarray:
        cfg = self.config
        return np.concatenate(
            [
                self._item[hash_buckets(candidates.item, cfg.item_buckets)],
                self._category[hash_buckets(candidates.category, cfg.category_buckets)],
                self._modality[candidates.modality],
            ],
            axis=1,
        )

    def queries(self, targets: np.ndarray) -> np.ndarray:
        """q_h of every candidate, (H, N, d_h), from its features (:meth:`target_features`);
        the benchmarks' raw-history baselines attend with the same queries."""
        cfg = self.config
        return (targets @ self._query).reshape(-1, cfg.heads, cfg.head_dim).transpose(1, 0, 2)

    def fold_rates(self, state: UserState, now_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Per head: Zbar (H, K) and Mbar (H, K, d_h), the rate-mixed counts and sums.

        Scaled by the largest log-count of the state, which cancels in the attention ratio.
        """
        cfg = self.config
        log_count = read_log_count(state, now_s, self._decay)  # (G, K, R)
        peak = np.max(log_count) if np.isfinite(log_count).any() else 0.0
        count = np.exp(log_count - peak)[self._group_of_head]  # (H, K, R)
        weighted = count * self._mixture[:, None, :]  # (H, K, R)
        means = state.mean.reshape(cfg.groups, cfg.codes, cfg.rates, cfg.heads_per_group, cfg.head_dim)
        head_means = means[self._group_of_head, :, :, self._slot_of_head]  # (H, K, R, d_h)
        z_bar = weighted.sum(-1)
        m_bar = np.einsum("hkr,hkrd->hkd", weighted, head_means)
        return z_bar, m_bar

    def score(self, state: UserState, candidates: Candidates, now_s: float) -> Scores:
        """Interest vectors and CTR probabilities of every candidate for this user."""
        if state.model_version != self.version:
            raise ModelVersionMismatch(
                f"state of user {state.user_id!r} was built by model {state.model_version}, "
                f"this scorer loads model {self.version}"
            )
        cfg = self.config
        targets = self.target_features(candidates)
        queries = self.queries(targets)
        z_bar, m_bar = self.fold_rates(state, now_s)
        # Codes first, (H, K, N): the max over K then runs across N-wide rows, several times
        # faster in numpy than over a 32-wide innermost axis; matmul reads the transpose.
        logits = self._head_codes @ queries.transpose(0, 2, 1) / np.sqrt(cfg.head_dim)
        logits -= logits.max(1, keepdims=True)
        attention = np.exp(logits).transpose(0, 2, 1)  # (H, N, K)
        numerator = attention @ m_bar  # (H, N, d_h)
        denominator = attention @ z_bar[:, :, None]  # (H, N, 1)
        interest = np.divide(
            numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0
        ).transpose(1, 0, 2)
        return Scores(interest=interest, ctr=self._ctr(interest, targets))

    def _ctr(self, interest: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The MLP head in float32, the precision it was trained in (half the time of float64)."""
        hidden = np.concatenate([interest.reshape(interest.shape[0], -1), targets], axis=1, dtype=np.float32)
        (w1, b1), (w2, b2) = self._mlp
        hidden = np.maximum(hidden @ w1 + b1, 0.0)
        logit = (hidden @ w2 + b2)[:, 0].astype(np.float64)
        return 1.0 / (1.0 + np.exp(-logit))
