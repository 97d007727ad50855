"""Mean pooling of the values over the whole history: the target-blind reference."""

from __future__ import annotations

import torch

from vql.model.attention import masked_attention, prefix_mask
from vql.model.ctr import CTRModel, TensorBatch


class MeanPoolModel(CTRModel):
    def interest(self, batch: TensorBatch, events: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        values = self.split_heads(self.value(events))
        if batch.row_length is not None:
            # One mean per row, shared by its targets: O(L), not O(T L).
            inside = prefix_mask(batch.row_length[:, None], events.shape[1])[:, 0]  # (B, L)
            pooled = (values * inside[..., None, None]).sum(1) / batch.row_length.clamp(min=1)[:, None, None]
            return pooled[:, None].expand(-1, queries.shape[1], -1, -1)
        return masked_attention(queries, None, values, prefix_mask(batch.visible, events.shape[1]))
