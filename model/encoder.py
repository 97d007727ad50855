"""The VQL encoder in torch: behavior -> key per group -> code, and value (design/vql.md 1-4).

Two entry points, as in HSTU's STU module: :meth:`VQLModel.encode` turns behaviors into
(codes, values), which is all the per-user state needs; :meth:`VQLModel.attend` runs attention
over a user's raw events, the reference that the state-based scorer must equal.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vql.model.artifact import ArtifactError, load_artifact, save_artifact
from vql.model.config import ModelConfig
from vql.model.features import BehaviorColumns, Candidates, hash_buckets
from vql.schemas.events import Action, Modality


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class VQLModel(nn.Module):
    """Embeddings, key/value/query projections, codebooks, rate mixture and CTR head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width = config.heads * config.head_dim
        generator = torch.Generator().manual_seed(config.seed)
        self.item_embedding = nn.Embedding(config.item_buckets, config.item_dim)
        self.action_embedding = nn.Embedding(len(Action), config.action_dim)
        self.category_embedding = nn.Embedding(config.category_buckets, config.category_dim)
        self.modality_embedding = nn.Embedding(len(Modality), config.modality_dim)
        self.key = nn.Linear(config.behavior_dim, width, bias=False)
        self.value = nn.Linear(config.behavior_dim, width, bias=False)
        self.query = nn.Linear(config.target_dim, width, bias=False)
        self.codebooks = nn.Parameter(torch.zeros(config.groups, config.codes, config.group_dim))
        # Per-head mixture over the decay bank (softmax over r), target-independent here.
        self.rate_logits = nn.Parameter(torch.zeros(config.heads, config.rates))
        self.head = nn.Sequential(
            nn.Linear(width + config.target_dim, config.mlp_hidden),
            nn.ReLU(),
            nn.Linear(config.mlp_hidden, 1),
        )
        self.register_buffer(
            "decay_rates", torch.tensor(config.decay_rates, dtype=torch.float64), persistent=False
        )
        # Initialise from the config's seed alone, so that equal configs give equal models.
        with torch.no_grad():
            for parameter in self.parameters():
                if parameter.dim() > 1:
                    scale = 1.0 / math.sqrt(parameter.shape[-1])
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
                else:
                    parameter.zero_()
            self.rate_logits.copy_(torch.randn(self.rate_logits.shape, generator=generator))
            self._seed_codebooks(generator)

    # -- features ---------------------------------------------------------------------------

    def _device_long(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.codebooks.device)

    def behavior_features(self, columns: BehaviorColumns) -> torch.Tensor:
        """b_i = [e(x_i); e(a_i); e(category_i); e(modality_i)], shape (n, behavior_dim)."""
        cfg = self.config
        return torch.cat(
            [
                self.item_embedding(self._device_long(hash_buckets(columns.item, cfg.item_buckets))),
                self.action_embedding(self._device_long(columns.action)),
                self.category_embedding(
                    self._device_long(hash_buckets(columns.category, cfg.category_buckets))
                ),
                self.modality_embedding(self._device_long(columns.modality)),
            ],
            dim=-1,
        )

    def target_features(self, candidates: Candidates) -> torch.Tensor:
        """[e(y); e(s_y)], shape (N, target_dim)."""
        cfg = self.config
        return torch.cat(
            [
                self.item_embedding(self._device_long(hash_buckets(candidates.item, cfg.item_buckets))),
                self.category_embedding(
                    self._device_long(hash_buckets(candidates.category, cfg.category_buckets))
                ),
                self.modality_embedding(self._device_long(candidates.modality)),
            ],
            dim=-1,
        )

    # -- keys, codes, values ----------------------------------------------------------------

    def keys(self, features: torch.Tensor) -> torch.Tensor:
        """Unquantized keys per group, (n, G, group_dim)."""
        cfg = self.config
        return self.key(features).view(-1, cfg.groups, cfg.group_dim)

    def assign_codes(self, keys: torch.Tensor) -> torch.Tensor:
        """z_i^g = argmin_c ||k_i^g - C^g_c||^2, shape (n, G)."""
        # ||k||^2 is the same for every code of a row, so it drops out of the argmin.
        cross = torch.einsum("ngd,gkd->ngk", keys, self.codebooks)
        return ((self.codebooks**2).sum(-1) - 2 * cross).argmin(dim=-1)

    @torch.inference_mode()
    def encode(self, columns: BehaviorColumns) -> tuple[np.ndarray, np.ndarray]:
        """Codes (n, G) int64 and exact values (n, G, group_dim) float32 of a batch."""
        features = self.behavior_features(columns)
        codes = self.assign_codes(self.keys(features))
        values = self.value(features).view(-1, self.config.groups, self.config.group_dim)
        return codes.cpu().numpy(), values.float().cpu().numpy()

    # -- attention over raw events (the reference) ------------------------------------------

    def head_mixture(self) -> torch.Tensor:
        """w_{h,r} >= 0, summing to 1 over rates, shape (H, R)."""
        return torch.softmax(self.rate_logits, dim=-1)

    @torch.inference_mode()
    def attend(
        self,
        events: BehaviorColumns,
        candidates: Candidates,
        now_s: float,
        *,
        quantized: bool = True,
    ) -> torch.Tensor:
        """Attention of each candidate over every raw event, in float64: (N, H, head_dim).

        With ``quantized`` the keys are the codebook entries (what the per-user state
        computes exactly); without, this is unquantized full attention, the accuracy ceiling.
        Time is read at max(now, latest event), the convention of the state (vql.md 6).
        """
        cfg = self.config
        n_cand = len(candidates)
        if len(events) == 0:
            return torch.zeros(n_cand, cfg.heads, cfg.head_dim, dtype=torch.float64)
        features = self.behavior_features(events)
        keys = self.keys(features)
        if quantized:
            group_index = torch.arange(cfg.groups, device=keys.device)
            keys = self.codebooks[group_index, self.assign_codes(keys)]
        keys = keys.double().reshape(-1, cfg.heads, cfg.head_dim)
        values = self.value(features).double().reshape(-1, cfg.heads, cfg.head_dim)
        queries = self.query(self.target_features(candidates)).double().view(n_cand, cfg.heads, cfg.head_dim)
        times = torch.from_numpy(events.time_s).to(keys.device)
        dt = torch.clamp(max(float(now_s), float(times.max())) - times, min=0.0)
        # log kappa_h(dt) = logsumexp_r(log w_{h,r} - lambda_r dt): (H, L)
        log_mix = torch.log(self.head_mixture().double())
        log_kernel = torch.logsumexp(log_mix[:, None, :] - dt[None, :, None] * self.decay_rates, dim=-1)
        logits = torch.einsum("nhd,lhd->nhl", queries, keys) / math.sqrt(cfg.head_dim)
        weights = torch.softmax(logits + log_kernel[None], dim=-1)
        return torch.einsum("nhl,lhd->nhd", weights, values)

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
    def _seed_codebooks(self, generator: torch.Generator) -> None:
        """Start each code at the key of a random behavior, so that every code is in use."""
        cfg = self.config
        n = cfg.codes
        sample = BehaviorColumns(
            item=torch.randint(0, 2**62, (n,), generator=generator).numpy(),
            action=torch.randint(0, len(Action), (n,), generator=generator).numpy(),
            category=torch.randint(0, cfg.category_buckets, (n,), generator=generator).numpy(),
            modality=torch.randint(0, len(Modality), (n,), generator=generator).numpy(),
            time_s=np.zeros(n),
        )
        self.codebooks.copy_(self.keys(self.behavior_features(sample)).transpose(0, 1))
