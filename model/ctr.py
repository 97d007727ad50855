"""The CTR model frame every model here shares: embeddings, projections and the MLP head.

A model differs only in how a target attends over the user's events
(:meth:`CTRModel.interest`); VQL (model/encoder.py) and the baselines (research/zoo/) each
override that one method, so that comparisons measure the attention and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vql.model.config import ModelConfig
from vql.model.features import hash_buckets
from vql.schemas.events import Action, Modality


@dataclass
class TensorBatch:
    """A user-grouped batch on a device (see model/batch.py UserBatch): B users with
    L events each (padded) and T targets each (padded)."""

    item: torch.Tensor  # (B, L) hashed bucket
    action: torch.Tensor
    category: torch.Tensor  # (B, L) hashed bucket
    raw_category: torch.Tensor  # (B, L) category id, for category filters (SIM)
    modality: torch.Tensor
    time_s: torch.Tensor  # (B, L) float64
    target_item: torch.Tensor  # (B, T) hashed
    target_category: torch.Tensor  # (B, T) hashed
    target_raw_category: torch.Tensor
    target_modality: torch.Tensor
    target_time_s: torch.Tensor  # (B, T) float64
    visible: torch.Tensor  # (B, T) events [0, visible) of the row
    label: torch.Tensor  # (B, T) float32
    target_mask: torch.Tensor  # (B, T) bool
    # (B,) when every target of row b sees exactly events [0, row_length[b]) and comes no
    # earlier than the newest of them (whole-history rows: the decay kernel factorises, see
    # model/attention.py); None otherwise.
    row_length: torch.Tensor | None = None

    @staticmethod
    def whole_history_rows(batch) -> np.ndarray | None:
        """row_length of a ``UserBatch`` if all its rows are whole-history rows, else None."""
        length = batch.visible.max(axis=1)
        same_prefix = np.all((batch.visible == length[:, None]) | ~batch.target_mask)
        last = np.take_along_axis(batch.time_s, np.maximum(length - 1, 0)[:, None], axis=1)
        after = np.all((batch.target_time_s >= last) | ~batch.target_mask | (length[:, None] == 0))
        return length if same_prefix and after else None

    @classmethod
    def from_numpy(cls, batch, config: ModelConfig, device: torch.device) -> "TensorBatch":
        """From a ``UserBatch`` of numpy arrays: hash ids and move to ``device``."""

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        return cls(
            item=tensor(hash_buckets(batch.item, config.item_buckets)),
            action=tensor(batch.action),
            category=tensor(hash_buckets(batch.category, config.category_buckets)),
            raw_category=tensor(batch.category),
            modality=tensor(batch.modality),
            time_s=tensor(batch.time_s.astype(np.float64)),
            target_item=tensor(hash_buckets(batch.target_item, config.item_buckets)),
            target_category=tensor(hash_buckets(batch.target_category, config.category_buckets)),
            target_raw_category=tensor(batch.target_category),
            target_modality=tensor(batch.target_modality),
            target_time_s=tensor(batch.target_time_s.astype(np.float64)),
            visible=tensor(batch.visible),
            label=tensor(batch.label.astype(np.float32)),
            target_mask=tensor(batch.target_mask),
            row_length=None if (rows := cls.whole_history_rows(batch)) is None else tensor(rows),
        )


class CTRModel(nn.Module):
    """Embeddings of item, action and context; key/value/query projections; MLP head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width = config.heads * config.head_dim
        self.item_embedding = nn.Embedding(config.item_buckets, config.item_dim)
        self.action_embedding = nn.Embedding(len(Action), config.action_dim)
        self.category_embedding = nn.Embedding(config.category_buckets, config.category_dim)
        self.modality_embedding = nn.Embedding(len(Modality), config.modality_dim)
        self.key = nn.Linear(config.behavior_dim, width, bias=False)
        self.value = nn.Linear(config.behavior_dim, width, bias=False)
        self.query = nn.Linear(config.target_dim, width, bias=False)
        self.head = nn.Sequential(
            nn.Linear(width + config.target_dim, config.mlp_hidden),
            nn.ReLU(),
            nn.Linear(config.mlp_hidden, 1),
        )
        # Every random draw of a model comes from this generator, seeded by the config alone,
        # so that equal configs give equal models; subclasses draw their own extras from it.
        self.generator = torch.Generator().manual_seed(config.seed)
        self._seed_parameters(self.generator)

    def _seed_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for parameter in self.parameters():
                if parameter.dim() > 1:
                    scale = 1.0 / np.sqrt(parameter.shape[-1])
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
                else:
                    parameter.zero_()
            # Start the query as the key's view of the same features, so that attention begins
            # as embedding similarity (same item, same category score high) and training
            # refines it; from random, unrelated projections a target over 10^4 behaviors gets
            # almost no gradient towards the few that match it.
            cfg = self.config
            item = slice(0, cfg.item_dim)
            context = slice(cfg.item_dim + cfg.action_dim, cfg.behavior_dim)
            self.query.weight.copy_(torch.cat([self.key.weight[:, item], self.key.weight[:, context]], dim=1))

    # -- features (all inputs hashed already) -------------------------------------------------

    def behavior_features(self, item, action, category, modality) -> torch.Tensor:
        """b = [e(x); e(a); e(category); e(modality)], shape (..., behavior_dim)."""
        return torch.cat(
            [self.item_embedding(item), self.action_embedding(action),
             self.category_embedding(category), self.modality_embedding(modality)],
            dim=-1,
        )

    def target_features(self, item, category, modality) -> torch.Tensor:
        """[e(y); e(s_y)], shape (..., target_dim)."""
        return torch.cat(
            [self.item_embedding(item), self.category_embedding(category), self.modality_embedding(modality)],
            dim=-1,
        )

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.config.heads, self.config.head_dim)

    # -- the CTR forward -----------------------------------------------------------------------

    def interest(self, batch: TensorBatch, events: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(B, T, H, d_h): what a target attends to. Each model defines it."""
        raise NotImplementedError

    def forward(self, batch: TensorBatch) -> torch.Tensor:
        """CTR logits (B, T)."""
        events = self.behavior_features(batch.item, batch.action, batch.category, batch.modality)
        targets = self.target_features(batch.target_item, batch.target_category, batch.target_modality)
        queries = self.split_heads(self.query(targets))
        interest = self.interest(batch, events, queries)
        return self.logit(interest, targets)

    def logit(self, interest: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = interest.reshape(*interest.shape[:-2], -1).to(targets.dtype)
        return self.head(torch.cat([flat, targets], dim=-1)).squeeze(-1)

    def auxiliary_loss(self) -> torch.Tensor:
        """Extra training loss of the last forward (VQL: commitment); zero by default."""
        return torch.zeros(())

    def after_step(self) -> None:
        """Hook after each optimiser step (VQL: EMA codebook update)."""
