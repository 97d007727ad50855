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
        key_sig = self.signatures(keys).permute(0, 2, 1, 3)  # (B, H, L, m)
        query_sig = self.signatures(queries)  # (B, T, H, m)
        visible = prefix_mask(batch.visible, events.shape[1])[:, :, None, :]  # (B, T, 1, L)
        outputs = [
            masked_attention(queries, None, values, visible & (query_sig[..., j, None] == key_sig[:, None, ..., j]))
            for j in range(self.planes.shape[0])
        ]
        return torch.stack(outputs).mean(0)
