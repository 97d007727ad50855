"""Target attention over a user's events, the one formula every model here shares.

    o[b, t, h] = sum_l w[b, t, h, l] v[b, l, h] / sum_l w[b, t, h, l]
    w = exp(logit) * kernel * mask

VQL uses quantized keys in the logit and the decay-bank kernel; full attention the raw keys
and the same kernel; DIN and SIM raw keys and a mask of the last k (or same-category)
events; SDIM and mean pooling a zero logit and a mask. A target that sees no event gets a
zero interest vector.
"""

from __future__ import annotations

import math

import torch


def decay_log_kernel(dt_s: torch.Tensor, decay_rates: torch.Tensor, log_mixture: torch.Tensor) -> torch.Tensor:
    """log kappa_h(dt) = logsumexp_r(log w_{h,r} - lambda_r dt) for dt of shape (..., L).

    Returns (..., H, L); ``log_mixture`` is (H, R), ``decay_rates`` (R,).
    """
    exponents = log_mixture[:, None, :] - dt_s[..., None, :, None] * decay_rates  # (..., H, L, R)
    return torch.logsumexp(exponents, dim=-1)


def masked_attention(
    queries: torch.Tensor,
    keys: torch.Tensor | None,
    values: torch.Tensor,
    mask: torch.Tensor,
    log_kernel: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of targets over events.

    queries (B, T, H, d); keys, values (B, L, H, d) (``keys`` None: all logits zero);
    mask (B, T, L) or (B, T, H, L) bool; log_kernel broadcastable to (B, T, H, L).
    Returns (B, T, H, d).
    """
    if keys is None:
        logits = torch.zeros(queries.shape[:3] + (values.shape[1],), dtype=values.dtype, device=values.device)
    else:
        logits = torch.einsum("bthd,blhd->bthl", queries, keys) / math.sqrt(queries.shape[-1])
    if log_kernel is not None:
        logits = logits + log_kernel
    if mask.dim() == 3:
        mask = mask[:, :, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    seen = mask.any(dim=-1, keepdim=True)
    weights = torch.softmax(logits.masked_fill(~seen, 0.0), dim=-1) * seen
    return torch.einsum("bthl,blhd->bthd", weights, values)


def prefix_mask(visible: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, L): target t of row b sees events [0, visible[b, t])."""
    return torch.arange(length, device=visible.device)[None, None, :] < visible[..., None]


def last_k_mask(visible: torch.Tensor, length: int, k: int) -> torch.Tensor:
    """(B, T, L): the k most recent events each target sees."""
    positions = torch.arange(length, device=visible.device)[None, None, :]
    return (positions < visible[..., None]) & (positions >= visible[..., None] - k)
