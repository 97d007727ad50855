"""What a ranker without VQL states runs per request, in numpy, as the scoring bench's baselines.

Both read a :class:`RawHistory`: the user's per-event keys and values already projected (a
KV cache, computed once per user and not timed), which is generous to them: a real server must
also fetch the L events and embed them. What is timed is what depends on the request.

- :func:`full_attention`: exact target attention over all L events with the model's
  unquantized keys and decay kernel (``VQLModel.attend(quantized=False)``), streamed over
  chunks of events with a running softmax so that memory stays bounded at L = 10^6.
- :func:`topk_attention`: SIM-hard (research/zoo/sim.py): the k newest events of the candidate's
  category, retrieved from an index built once per user, then plain softmax attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vql.bench.history import CHUNK
from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns, hash_buckets


@dataclass(frozen=True)
class RawHistory:
    """One user's events as a raw-history ranker keeps them. Heads first, (H, L, d), for the
    full scan; events sorted by (category, time), (L, H, d), for category retrieval."""

    keys: np.ndarray
    values: np.ndarray
    time_s: np.ndarray  # (L,)
    sorted_category: np.ndarray  # (L,) categories in (category, time) order
    sorted_keys: np.ndarray
    sorted_values: np.ndarray

    @classmethod
    def encode(cls, model: VQLModel, events: BehaviorColumns, dtype: type = np.float32) -> "RawHistory":
        cfg = model.config
        keys, values = [], []
        with torch.inference_mode():
            for start in range(0, len(events), CHUNK):
                part = slice(start, start + CHUNK)
                features = model.behavior_features(
                    torch.from_numpy(hash_buckets(events.item[part], cfg.item_buckets)),
                    torch.from_numpy(events.action[part]),
                    torch.from_numpy(hash_buckets(events.category[part], cfg.category_buckets)),
                    torch.from_numpy(events.modality[part]),
                )
                keys.append(model.split_heads(model.key(features)).double().numpy())
                values.append(model.split_heads(model.value(features)).double().numpy())
        key, value = np.concatenate(keys).astype(dtype), np.concatenate(values).astype(dtype)
        order = np.lexsort((events.time_s, events.category))
        return cls(
            keys=np.ascontiguousarray(key.transpose(1, 0, 2)),
            values=np.ascontiguousarray(value.transpose(1, 0, 2)),
            time_s=events.time_s,
            sorted_category=events.category[order],
            sorted_keys=key[order],
            sorted_values=value[order],
        )


def full_attention(history: RawHistory, queries: np.ndarray, now_s: float, decay_rates: np.ndarray,
                   log_mixture: np.ndarray, chunk_cells: int = 2**22) -> np.ndarray:
    """Exact decayed attention of queries (H, N, d) over every event: (N, H, d).

    logit = q.k / sqrt(d) + log kappa_h(t - t_i), kappa_h = sum_r w_{h,r} exp(-lambda_r dt),
    time read at max(now, newest event) as the state does (design/vql.md sections 3, 4).
    """
    heads, n, width = queries.shape
    dtype = history.keys.dtype
    read_at = max(float(now_s), float(history.time_s.max()))
    dt = read_at - history.time_s  # (L,)
    exponents = log_mixture[:, None, :] - dt[None, :, None] * decay_rates  # (H, L, R)
    top = exponents.max(-1, keepdims=True)
    log_kernel = (top[..., 0] + np.log(np.exp(exponents - top).sum(-1))).astype(dtype)  # (H, L)
    scaled = (queries / math.sqrt(width)).astype(dtype)
    peak = np.full((heads, n), -np.inf, dtype)
    numerator = np.zeros((heads, n, width), dtype)
    denominator = np.zeros((heads, n), dtype)
    step = max(1, chunk_cells // (heads * n))
    for start in range(0, history.keys.shape[1], step):
        part = slice(start, start + step)
        logits = scaled @ history.keys[:, part].transpose(0, 2, 1) + log_kernel[:, None, part]  # (H, N, c)
        new_peak = np.maximum(peak, logits.max(-1))
        rescale = np.exp(peak - new_peak)
        weights = np.exp(logits - new_peak[..., None])
        numerator = numerator * rescale[..., None] + weights @ history.values[:, part]
        denominator = denominator * rescale + weights.sum(-1)
        peak = new_peak
    return (numerator / denominator[..., None]).transpose(1, 0, 2)


def topk_attention(history: RawHistory, queries: np.ndarray, category: np.ndarray, k: int = 200) -> np.ndarray:
    """SIM-hard: attention of each candidate over the k newest events of its category,
    (N, H, d); a candidate whose category the user never touched gets zeros."""
    heads, n, width = queries.shape
    low = np.searchsorted(history.sorted_category, category, side="left")
    high = np.searchsorted(history.sorted_category, category, side="right")
    picks = high[:, None] - k + np.arange(k)[None, :]  # (N, k), newest last
    found = picks >= low[:, None]
    picks = np.where(found, picks, 0)
    keys, values = history.sorted_keys[picks], history.sorted_values[picks]  # (N, k, H, d)
    scaled = (queries.transpose(1, 0, 2) / math.sqrt(width)).astype(keys.dtype)  # (N, H, d)
    logits = np.einsum("nhd,nkhd->nhk", scaled, keys)
    logits = np.where(found[:, None, :], logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(-1, keepdims=True)
    out = np.einsum("nhk,nkhd->nhd", weights, values)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)
