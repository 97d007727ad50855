"""Full softmax attention over the whole history, keys unquantized: VQL's accuracy ceiling.

The same model as VQL (decay bank, per-head mixture) with the quantizer switched off, so the
gap between the two is exactly what quantizing the keys costs.
"""

from __future__ import annotations

from vql.model.encoder import VQLModel


class FullAttentionModel(VQLModel):
    quantize = False
