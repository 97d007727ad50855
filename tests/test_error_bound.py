"""Invariant 4 (design/vql.md section 5): on random data, the output error of quantized
against unquantized attention stays under (exp(2 delta) - 1) * max ||v||, for every L."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns, Candidates, hash_buckets


@pytest.mark.parametrize("length", [10, 100, 1_000, 10_000, 100_000])
def test_quantization_error_stays_under_the_bound(length):
    model = VQLModel(ModelConfig(seed=length)).eval()
    cfg = model.config
    rng = np.random.default_rng(length)
    events = BehaviorColumns(item=rng.integers(0, 10**9, length), action=rng.integers(0, 8, length),
                             category=rng.integers(0, 10**4, length), modality=rng.integers(0, 5, length),
                             time_s=1.7e9 + rng.uniform(0, 3e7, length))
    candidates = Candidates(item=rng.integers(0, 10**9, 8), category=rng.integers(0, 10**4, 8),
                            modality=rng.integers(0, 5, 8))
    now = float(events.time_s.max())
    exact = model.attend(events, candidates, now, quantized=False)
    quantized = model.attend(events, candidates, now, quantized=True)

    with torch.no_grad():
        features = model.behavior_features(
            torch.from_numpy(hash_buckets(events.item, cfg.item_buckets)), torch.from_numpy(events.action),
            torch.from_numpy(hash_buckets(events.category, cfg.category_buckets)), torch.from_numpy(events.modality))
        keys = model.keys(features)
        codes = model.assign_codes(keys)
        chosen = model.codebooks[torch.arange(cfg.groups), codes]
        key_error = (keys - chosen).reshape(length, cfg.heads, cfg.head_dim).double()
        queries = model.query(model.target_features(
            torch.from_numpy(hash_buckets(candidates.item, cfg.item_buckets)),
            torch.from_numpy(hash_buckets(candidates.category, cfg.category_buckets)),
            torch.from_numpy(candidates.modality))).view(-1, cfg.heads, cfg.head_dim).double()
        values = model.value(features).view(length, cfg.heads, cfg.head_dim).double()
    # delta per (candidate, head): the largest logit change quantization causes.
    delta = torch.einsum("nhd,lhd->nhl", queries, key_error).abs().amax(-1) / math.sqrt(cfg.head_dim)
    bound = (torch.exp(2 * delta) - 1) * values.norm(dim=-1).amax(0)[None, :]
    error = (quantized - exact).norm(dim=-1)
    assert (error <= bound + 1e-9).all(), f"max error/bound ratio {(error / bound).max():.3f}"
    print(f"L={length}: max error {error.max():.4f}, max bound {bound.max():.4f}")
