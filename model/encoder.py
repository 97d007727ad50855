"""VQL: quantized-key target attention over a user's whole history (design/vql.md 1-5).

Three entry points over one set of weights, as in HSTU's STU module:
:meth:`VQLModel.forward` (via CTRModel) trains on user batches; :meth:`VQLModel.encode` turns
behaviors into (codes, values), all the per-user state needs; :meth:`VQLModel.attend` runs
the same attention over one user's raw events, the reference the state scorer must equal.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vql.model.artifact import ArtifactError, load_artifact, save_artifact
from vql.model.attention import (
    code_sum_attention,
    decay_log_kernel,
    decayed_attention,
    masked_attention,
    prefix_mask,
    whole_history_decays,
)
from vql.model.config import ModelConfig
from vql.model.ctr import CTRModel, TensorBatch
from vql.model.batch import UserBatch
from vql.model.features import BehaviorColumns, Candidates, hash_buckets
from vql.schemas.events import Action, Modality


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class VQLModel(CTRModel):
    """CTR model whose attention keys are quantized against one codebook per head group."""

    quantize = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        # Per-head mixture over the decay bank (softmax over r), target-independent, so that
        # the rates fold into the state before scoring (vql.md section 7).
        self.rate_logits = nn.Parameter(torch.zeros(config.heads, config.rates))
        self.register_buffer("codebooks", torch.zeros(config.groups, config.codes, config.group_dim))
        self.register_buffer("decay_rates", torch.tensor(config.decay_rates, dtype=torch.float64), persistent=False)
        # EMA codebook learning state (training only; not part of the artifact).
        self.register_buffer("ema_counts", torch.ones(config.groups, config.codes), persistent=False)
        self.register_buffer("ema_sums", torch.zeros(config.groups, config.codes, config.group_dim), persistent=False)
        with torch.no_grad():
            self.rate_logits.copy_(torch.randn(self.rate_logits.shape, generator=self.generator))
            self._seed_codebooks(self.generator)
        self._commitment = torch.zeros(())
        self._last_keys: torch.Tensor | None = None
        self._last_codes: torch.Tensor | None = None

    # -- keys, codes, values ----------------------------------------------------------------

    def keys(self, features: torch.Tensor) -> torch.Tensor:
        """Unquantized keys per group, (..., G, group_dim)."""
        cfg = self.config
        return self.key(features).view(*features.shape[:-1], cfg.groups, cfg.group_dim)

    def assign_codes(self, keys: torch.Tensor) -> torch.Tensor:
        """z^g = argmin_c ||k^g - C^g_c||^2 for keys (..., G, D): codes (..., G)."""
        # ||k||^2 is the same for every code of a row, so it drops out of the argmin.
        cross = torch.einsum("...gd,gkd->...gk", keys, self.codebooks)
        return ((self.codebooks**2).sum(-1) - 2 * cross).argmin(dim=-1)

    def quantized(self, keys: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """C_z with the straight-through estimator: forward C_z, gradient to the keys."""
        group_index = torch.arange(self.config.groups, device=keys.device)
        chosen = self.codebooks[group_index, codes]
        return keys + (chosen - keys).detach()

    @torch.inference_mode()
    def encode(self, columns: BehaviorColumns) -> tuple[np.ndarray, np.ndarray]:
        """Codes (n, G) int64 and exact values (n, G, group_dim) float32 of a batch."""
        cfg = self.config
        device = self.codebooks.device
        features = self.behavior_features(
            _tensor(hash_buckets(columns.item, cfg.item_buckets), device),
            _tensor(columns.action, device),
            _tensor(hash_buckets(columns.category, cfg.category_buckets), device),
            _tensor(columns.modality, device),
        )
        codes = self.assign_codes(self.keys(features))
        values = self.value(features).view(-1, cfg.groups, cfg.group_dim)
        return codes.cpu().numpy(), values.float().cpu().numpy()

    # -- attention --------------------------------------------------------------------------

    def head_mixture(self) -> torch.Tensor:
        """w_{h,r} >= 0, summing to 1 over rates, shape (H, R)."""
        return torch.softmax(self.rate_logits, dim=-1)

    def interest(self, batch: TensorBatch, events: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        dtype = queries.dtype
        raw_keys = self.keys(events)  # (B, L, G, group_dim)
        if self.quantize:
            codes = self.assign_codes(raw_keys.detach())
            chosen = self.quantized(raw_keys, codes)
            if self.training:
                seen = prefix_mask(batch.visible, raw_keys.shape[1]).any(dim=1)  # (B, L)
                error = ((raw_keys - chosen.detach()) ** 2).sum(-1).mean(-1)  # (B, L)
                self._commitment = (error * seen).sum() / seen.sum().clamp(min=1)
                self._last_keys, self._last_codes = raw_keys.detach()[seen], codes[seen]
        values = self.split_heads(self.value(events)).to(dtype)
        rates, log_mixture = self.decay_rates.to(dtype), torch.log_softmax(self.rate_logits, -1).to(dtype)
        per_head = (*raw_keys.shape[:2], cfg.heads, cfg.head_dim)
        if batch.row_length is not None:  # whole-history rows: the factorised kernel
            event_weight, target_weight = whole_history_decays(
                batch.time_s.to(dtype), batch.row_length, batch.target_time_s.to(dtype), rates, log_mixture)
            keys = raw_keys.to(dtype).reshape(per_head)
            if not self.quantize:
                return decayed_attention(queries, keys, values, event_weight, target_weight)
            head_codes = codes.repeat_interleave(cfg.heads_per_group, dim=-1)  # (B, L, H)
            code_keys = self.codebooks.to(dtype).transpose(0, 1).reshape(cfg.codes, cfg.heads, cfg.head_dim)
            return code_sum_attention(queries, keys, head_codes, code_keys, values, event_weight, target_weight)
        keys = (chosen if self.quantize else raw_keys).to(dtype).reshape(per_head)
        dt = (batch.target_time_s[:, :, None] - batch.time_s[:, None, :]).clamp(min=0).to(dtype)
        log_kernel = decay_log_kernel(dt, rates, log_mixture)
        mask = prefix_mask(batch.visible, events.shape[1])
        return masked_attention(queries, keys, values, mask, log_kernel)

    def auxiliary_loss(self) -> torch.Tensor:
        return self._commitment

    @torch.no_grad()
    def after_step(self, decay: float = 0.99, dead_below: float = 1e-3) -> None:
        """EMA codebook update from the last batch's keys, and dead-code restart."""
        if not self.quantize or self._last_keys is None or self._last_keys.shape[0] == 0:
            return
        cfg = self.config
        keys, codes = self._last_keys.float(), self._last_codes
        one_hot = F.one_hot(codes, cfg.codes).float()  # (n, G, K)
        counts = one_hot.sum(0)  # (G, K)
        sums = torch.einsum("ngk,ngd->gkd", one_hot, keys)
        self.ema_counts.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sums.mul_(decay).add_(sums, alpha=1 - decay)
        self.codebooks.copy_(self.ema_sums / self.ema_counts.clamp(min=1e-6)[..., None])
        dead = self.ema_counts < dead_below * self.ema_counts.sum(-1, keepdim=True) / cfg.codes
        if dead.any():
            groups, slots = dead.nonzero(as_tuple=True)
            picks = torch.randint(0, keys.shape[0], (groups.shape[0],), generator=self.generator).to(keys.device)
            self.codebooks[groups, slots] = keys[picks, groups]
            self.ema_sums[groups, slots] = keys[picks, groups]
            self.ema_counts[groups, slots] = 1.0
        self._last_keys = self._last_codes = None

    @torch.inference_mode()
    def attend(
        self,
        events: BehaviorColumns,
        candidates: Candidates,
        now_s: float,
        *,
        quantized: bool = True,
    ) -> torch.Tensor:
        """This model's attention of each candidate over one user's raw events, in float64:
        (N, H, head_dim). With ``quantized`` False the keys are left unquantized (the
        accuracy ceiling). Time is read at max(now, latest event), as the state does."""
        cfg = self.config
        n, length = len(candidates), len(events)
        if length == 0:
            return torch.zeros(n, cfg.heads, cfg.head_dim, dtype=torch.float64)
        read_at = max(float(now_s), float(events.time_s.max()))
        # One user's events and the candidates as a user batch of one row.
        row = UserBatch(
            item=events.item[None], action=events.action[None], category=events.category[None],
            modality=events.modality[None], time_s=events.time_s[None], event_mask=np.ones((1, length), bool),
            target_item=candidates.item[None], target_category=candidates.category[None],
            target_modality=candidates.modality[None], target_time_s=np.full((1, n), read_at),
            visible=np.full((1, n), length), label=np.zeros((1, n), np.float32),
            target_mask=np.ones((1, n), bool), sample_index=np.arange(n)[None], user=np.zeros(1, np.int64),
        )
        # The per-event formula, not the per-code sums: this is the reference they must equal.
        batch = replace(TensorBatch.from_numpy(row, cfg, self.codebooks.device), row_length=None)
        features = self.behavior_features(batch.item, batch.action, batch.category, batch.modality)
        targets = self.target_features(batch.target_item, batch.target_category, batch.target_modality)
        queries = self.split_heads(self.query(targets)).double()
        previous, self.quantize = self.quantize, quantized
        try:
            return self.interest(batch, features, queries)[0]
        finally:
            self.quantize = previous

    # -- artifact ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> str:
        """Write the artifact; return its version hash."""
        arrays = {name: t.detach().cpu().numpy() for name, t in self.state_dict().items()}
        return save_artifact(path, self.config, arrays)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | None = None) -> tuple["VQLModel", str]:
        """The model of an artifact, in eval mode on ``device``, and its version."""
        artifact = load_artifact(path)
        model = cls(artifact.config)
        try:
            model.load_state_dict({k: torch.from_numpy(v) for k, v in artifact.arrays.items()})
        except RuntimeError as exc:
            raise ArtifactError(f"{path} does not match its own config: {exc}") from exc
        return model.to(device or default_device()).eval(), artifact.version

    @torch.no_grad()
    def fit_codebooks(self, features: torch.Tensor, iterations: int = 20) -> None:
        """k-means (Lloyd) of the keys of ``features`` (n, behavior_dim), per group, started
        at random keys: the codebooks a model trained without quantization starts from when
        quantization is switched on (research/training.py, warm-up). Resets the EMA state to match."""
        keys = self.keys(features).float()  # (n, G, D)
        picks = torch.randperm(keys.shape[0], generator=self.generator)[: self.config.codes]
        codebooks = keys[picks].transpose(0, 1).clone()  # (G, K, D)
        for _ in range(iterations):
            self.codebooks.copy_(codebooks)
            codes = self.assign_codes(keys)  # (n, G)
            one_hot = F.one_hot(codes, self.config.codes).float()  # (n, G, K)
            counts = one_hot.sum(0)
            sums = torch.einsum("ngk,ngd->gkd", one_hot, keys)
            codebooks = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], codebooks)
        self.codebooks.copy_(codebooks)
        self.ema_counts.copy_(counts.clamp(min=1e-3) / keys.shape[0] * self.config.codes)
        self.ema_sums.copy_(codebooks * self.ema_counts[..., None])

    @torch.no_grad()
    def _seed_codebooks(self, generator: torch.Generator) -> None:
        """Start each code at the key of a random behavior, so that every code is in use."""
        cfg = self.config
        n = cfg.codes
        features = self.behavior_features(
            torch.randint(0, cfg.item_buckets, (n,), generator=generator),
            torch.randint(0, len(Action), (n,), generator=generator),
            torch.randint(0, cfg.category_buckets, (n,), generator=generator),
            torch.randint(0, len(Modality), (n,), generator=generator),
        )
        self.codebooks.copy_(self.keys(features).transpose(0, 1))
        self.ema_sums.copy_(self.codebooks)


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)
