"""Mean pooling of the values over the whole history: the target-blind reference."""

from __future__ import annotations

import torch

from vql.model.attention import masked_attention, prefix_mask
from vql.model.ctr import CTRModel, TensorBatch


class MeanPoolModel(CTRModel):
    def interest(self, batch: TensorBatch, events: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        values = self.split_heads(self.value(events))
        return masked_attention(queries, None, values, prefix_mask(batch.visible, events.shape[1]))
