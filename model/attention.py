"""Target attention over a user's events, the one formula every model here shares.

    o[b, t, h] = sum_l w[b, t, h, l] v[b, l, h] / sum_l w[b, t, h, l]
    w = exp(logit) * kernel * mask

VQL uses quantized keys in the logit and the decay-bank kernel; full attention the raw keys
and the same kernel; DIN and SIM raw keys and a mask of the last k (or same-category)
events; SDIM and mean pooling a zero logit and a mask. A target that sees no event gets a
zero interest vector.

When every target of a row sees the row's whole history and comes after its newest event
(the ultra-long synthetic set, the state scorer's case), the decay kernel factorises around
the landmark T0 = newest event: exp(-lambda (t - t_l)) = exp(-lambda (t - T0)) exp(-lambda (T0 - t_l)).
:func:`decayed_attention` then needs no (T, L, R) kernel tensor, and
:func:`code_sum_attention` collapses VQL's quantized attention into per-code sums, the same
O(L + T K) computation the per-user state does (vql.md section 6), with the exact
straight-through gradient for the keys. Both equal :func:`masked_attention` with
:func:`decay_log_kernel` on such rows (tests/test_attention.py).
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

    queries (B, T, H, d); keys, values (B, L, H, d), or (B, T, L, H, d) when each target
    has events of its own (retrieval: SIM) (``keys`` None: all logits zero); mask (B, T, L)
    or (B, T, H, L) bool; log_kernel broadcastable to (B, T, H, L). Returns (B, T, H, d).
    """
    events = "btlhd" if values.dim() == 5 else "blhd"
    if keys is None:
        logits = torch.zeros(queries.shape[:3] + (values.shape[-3],), dtype=values.dtype, device=values.device)
    else:
        logits = torch.einsum(f"bthd,{events}->bthl", queries, keys) / math.sqrt(queries.shape[-1])
    if log_kernel is not None:
        logits = logits + log_kernel
    if mask.dim() == 3:
        mask = mask[:, :, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    seen = mask.any(dim=-1, keepdim=True)
    weights = torch.softmax(logits.masked_fill(~seen, 0.0), dim=-1) * seen
    return torch.einsum(f"bthl,{events}->bthd", weights, values)


def prefix_mask(visible: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, L): target t of row b sees events [0, visible[b, t])."""
    return torch.arange(length, device=visible.device)[None, None, :] < visible[..., None]


def last_k_mask(visible: torch.Tensor, length: int, k: int) -> torch.Tensor:
    """(B, T, L): the k most recent events each target sees."""
    positions = torch.arange(length, device=visible.device)[None, None, :]
    return (positions < visible[..., None]) & (positions >= visible[..., None] - k)


def whole_history_decays(
    time_s: torch.Tensor,
    row_length: torch.Tensor,
    target_time_s: torch.Tensor,
    decay_rates: torch.Tensor,
    log_mixture: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factorised decay kernel of rows whose targets all see events [0, row_length).

    Returns event weights (B, L, R) = exp(-lambda_r (T0 - t_l)), zero past the row, and target
    weights (B, T, H, R) = w_{h,r} exp(-lambda_r (t - T0)), with T0 the row's newest event;
    their product summed over r is the kernel kappa_h(t - t_l) (``log_mixture`` is log w, (H, R)) up to a
factor per (target, head), which cancels in the attention.
    """
    length = time_s.shape[1]
    inside = torch.arange(length, device=time_s.device)[None, :] < row_length[:, None]  # (B, L)
    landmark = torch.where(inside, time_s, torch.full_like(time_s, -math.inf)).amax(dim=1, keepdim=True)
    landmark = torch.where(torch.isfinite(landmark), landmark, torch.zeros_like(landmark))
    age = (landmark - time_s).clamp(min=0)
    event_weight = torch.exp(-age[..., None] * decay_rates) * inside[..., None]
    ahead = (target_time_s - landmark).clamp(min=0)  # (B, T)
    log_target = log_mixture - ahead[..., None, None] * decay_rates  # (B, T, H, R)
    # A common factor per (target, head) cancels in the attention's ratio: take out the
    # largest, so that a target long after the row's newest event does not underflow to 0.
    target_weight = torch.exp(log_target - log_target.amax(dim=-1, keepdim=True))
    return event_weight, target_weight


def _normalise(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, with a zero interest where a target sees nothing."""
    seen = denominator > 0
    return numerator / torch.where(seen, denominator, torch.ones_like(denominator))[..., None] * seen[..., None]


def decayed_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    event_weight: torch.Tensor,
    target_weight: torch.Tensor,
) -> torch.Tensor:
    """Attention with the decay-bank kernel over whole-history rows, no (T, L, R) tensor.

    queries (B, T, H, d); keys, values (B, L, H, d); event/target weights from
    :func:`whole_history_decays`. Returns (B, T, H, d).
    """
    logits = torch.einsum("bthd,blhd->bthl", queries, keys) / math.sqrt(queries.shape[-1])
    inside = event_weight.sum(-1) > 0  # (B, L)
    logits = logits.masked_fill(~inside[:, None, None, :], -math.inf)
    top = logits.amax(dim=-1, keepdim=True)
    scores = torch.exp(logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))  # (B, T, H, L)
    weights = event_weight[:, :, None, :, None].expand(-1, -1, values.shape[2], -1, 1)
    weighted = torch.cat([weights * values[..., None, :], weights], dim=-1)  # (B, L, H, R, d + 1)
    sums = torch.einsum("bthl,blhrx->bthrx", scores, weighted)
    total = torch.einsum("bthr,bthrx->bthx", target_weight, sums)
    return _normalise(total[..., :-1], total[..., -1])


def code_sum_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    codes: torch.Tensor,
    code_keys: torch.Tensor,
    values: torch.Tensor,
    event_weight: torch.Tensor,
    target_weight: torch.Tensor,
) -> torch.Tensor:
    """VQL's quantized attention over whole-history rows through per-code sums.

    queries (B, T, H, d); keys (B, L, H, d) the UNquantized keys (for the gradient only);
    codes (B, L, H) each event's code as seen by head h; code_keys (K, H, d) the codebook
    split per head; values (B, L, H, d); weights from :func:`whole_history_decays`.

    The forward equals attention with keys C_z. For the straight-through gradient, the logit
    of event l carries delta_l = k_l - sg(k_l) (zero, gradient one), linearised:
    exp(u.C_z + u.delta_l) = exp(u.C_z) (1 + u.delta_l), exact in value and first derivative;
    its sums over a code are d x d matrices (M, below), so the cost is O(L d^2 + T K d^2)
    instead of O(T L d).
    """
    batch, length, heads, width = values.shape
    n_codes = code_keys.shape[0]
    scale = 1.0 / math.sqrt(width)
    delta = keys - keys.detach()
    slot = (torch.arange(batch, device=codes.device)[:, None, None] * n_codes + codes) * heads \
        + torch.arange(heads, device=codes.device)  # (B, L, H): one bin per (row, code, head)
    weighted_values = event_weight[:, :, None, :, None] * values[..., None, :]  # (B, L, H, R, d)
    per_event = torch.cat([
        weighted_values.unsqueeze(-1) * delta[:, :, :, None, None, :],  # M: (d, d)
        event_weight[:, :, None, :, None, None] * delta[:, :, :, None, None, :],  # m: (1, d)
    ], dim=-2)  # (B, L, H, R, d + 1, d)
    plain = torch.cat([weighted_values, event_weight[:, :, None, :, None].expand(-1, -1, heads, -1, 1)], dim=-1)

    def per_code(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(batch * length * heads, *x.shape[3:])
        out = torch.zeros((batch * n_codes * heads, *x.shape[3:]), dtype=x.dtype, device=x.device)
        return out.index_add_(0, slot.reshape(-1), flat).view(batch, n_codes, heads, *x.shape[3:])

    sums = per_code(plain)  # (B, K, H, R, d + 1): S and N
    linear = per_code(per_event)  # (B, K, H, R, d + 1, d): M and m
    u = queries * scale
    logits = torch.einsum("bthd,khd->btkh", u, code_keys)
    used = sums[..., -1].sum(-1) > 0  # (B, K, H)
    logits = logits.masked_fill(~used[:, None], -math.inf)
    top = logits.amax(dim=2, keepdim=True)
    scores = torch.exp(logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))  # (B, T, K, H)
    terms = sums[:, None] + torch.einsum("bkhrxd,bthd->btkhrx", linear, u)  # (B, T, K, H, R, d + 1)
    total = torch.einsum("btkh,bthr,btkhrx->bthx", scores, target_weight, terms)
    return _normalise(total[..., :-1], total[..., -1])
