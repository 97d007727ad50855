"""DIN-style target attention over the user's last k behaviors only (no time kernel)."""

from __future__ import annotations

import torch

from vql.model.attention import last_k_mask, masked_attention
from vql.model.config import ModelConfig
from vql.model.ctr import CTRModel, TensorBatch


class DINModel(CTRModel):
    def __init__(self, config: ModelConfig, k: int) -> None:
        super().__init__(config)
        self.k = k

    def interest(self, batch: TensorBatch, events: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        if batch.row_length is not None:
            # Every target of a row sees the same last k events: project only those.
            positions = batch.row_length[:, None] - self.k + torch.arange(self.k, device=events.device)
            inside = positions >= 0  # (B, k)
            events = torch.gather(events, 1, positions.clamp(min=0)[..., None].expand(-1, -1, events.shape[-1]))
            mask = inside[:, None, :].expand(-1, queries.shape[1], -1)
        else:
            mask = last_k_mask(batch.visible, events.shape[1], self.k)
        keys, values = self.split_heads(self.key(events)), self.split_heads(self.value(events))
        return masked_attention(queries, keys, values, mask)
