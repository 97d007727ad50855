"""SDIM: SimHash the keys and the target's query; average the values of the behaviors that
land in the target's bucket, over several hash functions (no learned attention weights)."""

from __future__ import annotations

import torch

from vql.model.attention import masked_attention, prefix_mask
from vql.model.config import ModelConfig
from vql.model.ctr import CTRModel, TensorBatch


class SDIMModel(CTRModel):
    def __init__(self, config: ModelConfig, hashes: int = 4, bits: int = 3) -> None:
        super().__init__(config)
        self.register_buffer("planes", torch.randn(hashes, bits, config.head_dim, generator=self.generator))
        self.register_buffer("bit_values", 2 ** torch.arange(bits))

    def signatures(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., hashes) bucket ids from the signs of random projections."""
        bits = torch.einsum("...d,mbd->...mb", x, self.planes) > 0
        return (bits.long() * self.bit_values).sum(-1)

    def interest(self, batch: TensorBatch, events: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        keys, values = self.split_heads(self.key(events)), self.split_heads(self.value(events))
        query_sig = self.signatures(queries)  # (B, T, H, m)
        if batch.row_length is not None:
            return self._bucket_means(keys, values, query_sig, batch.row_length)
        key_sig = self.signatures(keys).permute(0, 2, 1, 3)  # (B, H, L, m)
        visible = prefix_mask(batch.visible, events.shape[1])[:, :, None, :]  # (B, T, 1, L)
        outputs = [
            masked_attention(queries, None, values, visible & (query_sig[..., j, None] == key_sig[:, None, ..., j]))
            for j in range(self.planes.shape[0])
        ]
        return torch.stack(outputs).mean(0)

    def _bucket_means(self, keys, values, query_sig, row_length) -> torch.Tensor:
        """Whole-history rows: sum the values per (row, head, hash, bucket) once, O(L), and let
        each target read its buckets, O(T); the mean over hashes of the bucket means."""
        buckets = int(self.bit_values.sum()) + 1
        inside = torch.arange(keys.shape[1], device=keys.device)[None, :] < row_length[:, None]  # (B, L)
        one_hot = torch.nn.functional.one_hot(self.signatures(keys), buckets).to(values.dtype)  # (B, L, H, m, n)
        one_hot = one_hot * inside[:, :, None, None, None]
        sums = torch.einsum("blhmn,blhd->bhmnd", one_hot, values)
        counts = one_hot.sum(1)  # (B, H, m, n)
        index = query_sig.permute(0, 2, 3, 1)[..., None]  # (B, H, m, T, 1)
        picked_sums = torch.gather(sums, 3, index.expand(-1, -1, -1, -1, values.shape[-1]))  # (B, H, m, T, d)
        picked_counts = torch.gather(counts, 3, index[..., 0])  # (B, H, m, T)
        means = picked_sums / picked_counts.clamp(min=1)[..., None]
        return means.mean(2).permute(0, 2, 1, 3)  # (B, T, H, d)
