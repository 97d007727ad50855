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
        if batch.row_length is not None:
            positions, mask = self._newest_of_category(batch, events.shape[1])
            keys, values = self.split_heads(self.key(events)), self.split_heads(self.value(events))
            return masked_attention(queries, _gather(keys, positions), _gather(values, positions), mask)
        same = prefix_mask(batch.visible, events.shape[1]) & (
            batch.raw_category[:, None, :] == batch.target_raw_category[:, :, None]
        )
        # Rank same-category events from the newest: keep the k most recent.
        newer_or_equal = same.flip(-1).cumsum(-1).flip(-1)
        mask = same & (newer_or_equal <= self.k)
        keys, values = self.split_heads(self.key(events)), self.split_heads(self.value(events))
        return masked_attention(queries, keys, values, mask)

    def _newest_of_category(self, batch: TensorBatch, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For whole-history rows: the positions (B, T, k) of each target's k newest events
        of its category, and which of them exist. A stable sort by category keeps each
        category's events in time order, so they are the last k of the category's run:
        O(L log L + T k) a row instead of the (T, L) mask."""
        inside = torch.arange(length, device=batch.raw_category.device)[None, :] < batch.row_length[:, None]
        # Padding sorts after every real category; `inside` below also drops it should a
        # real category carry the same id.
        category = torch.where(inside, batch.raw_category, torch.iinfo(torch.int64).max)
        sorted_category, order = torch.sort(category, dim=1, stable=True)
        target = batch.target_raw_category.contiguous()
        first = torch.searchsorted(sorted_category, target, right=False)
        end = torch.searchsorted(sorted_category, target, right=True)
        slot = end[..., None] - self.k + torch.arange(self.k, device=end.device)  # (B, T, k)
        present = slot >= first[..., None]
        slot = slot.clamp(min=0, max=length - 1)
        positions = torch.gather(order[:, None, :].expand(-1, slot.shape[1], -1), 2, slot)
        present &= torch.gather(inside[:, None, :].expand(-1, slot.shape[1], -1), 2, positions)
        return positions, present


def _gather(per_event: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """per_event (B, L, H, d) at positions (B, T, k): (B, T, k, H, d)."""
    b = torch.arange(per_event.shape[0], device=per_event.device)[:, None, None]
    return per_event[b, positions]
