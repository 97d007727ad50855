"""SIM-hard: attention over the most recent k behaviors of the target's category."""

from __future__ import annotations

import torch

from vql.model.attention import masked_attention, prefix_mask
from vql.model.config import ModelConfig
from vql.model.ctr import CTRModel, TensorBatch


class SIMHardModel(CTRModel):
    def __init__(self, config: ModelConfig, k: int) -> None:
        super().__init__(config)
        self.k = k

    def interest(self, batch: TensorBatch, events: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        same = prefix_mask(batch.visible, events.shape[1]) & (
            batch.raw_category[:, None, :] == batch.target_raw_category[:, :, None]
        )
        # Rank same-category events from the newest: keep the k most recent.
        newer_or_equal = same.flip(-1).cumsum(-1).flip(-1)
        mask = same & (newer_or_equal <= self.k)
        keys, values = self.split_heads(self.key(events)), self.split_heads(self.value(events))
        return masked_attention(queries, keys, values, mask)
