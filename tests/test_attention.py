"""The whole-history fast paths (factorised decay kernel, per-code sums with the linearised
straight-through estimator) equal the per-event formula in value AND gradient."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vql.model.config import ModelConfig
from vql.model.ctr import TensorBatch
from vql.research.datasets import SyntheticSpec, make_synthetic, user_batches
from vql.research.zoo import MODELS
from vql.research.zoo.sim import SIMHardModel

CPU = torch.device("cpu")
SPEC = SyntheticSpec(users=12, events_per_user=400, targets_per_user=6, items_per_category=10, recent_noise=40)


def _loss_and_grads(model, batch):
    model.zero_grad()
    logits = model(batch)
    loss = F.binary_cross_entropy_with_logits(logits[batch.target_mask], batch.label[batch.target_mask])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("name", ["vql", "full", "din50", "sdim", "mean", "sim", "sim3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_whole_history_path_equals_the_per_event_formula(name, seed):
    data = make_synthetic(replace(SPEC, seed=seed))
    config = ModelConfig(item_buckets=512, category_buckets=64, codes=8, seed=seed)
    # sim3 keeps 3 events of a category, so that the cut to the newest k is exercised
    model = (SIMHardModel(config, k=3) if name == "sim3" else MODELS[name](config)).double()
    model.train()
    # ragged rows: cut users' histories to different lengths so that padding is exercised
    numpy_batch = next(user_batches(data.histories, data.train, 6, None, shuffle=True, seed=seed))
    cut = np.random.default_rng(seed).integers(1, numpy_batch.item.shape[1] + 1, numpy_batch.item.shape[0])
    numpy_batch = replace(numpy_batch, visible=np.where(numpy_batch.target_mask, cut[:, None], 0),
                          target_time_s=numpy_batch.target_time_s + 0.0)
    # each row's targets come after the row's newest visible event
    last = numpy_batch.time_s[np.arange(len(cut)), cut - 1]
    numpy_batch = replace(numpy_batch, target_time_s=np.maximum(numpy_batch.target_time_s, last[:, None] + 60.0))
    fast = TensorBatch.from_numpy(numpy_batch, model.config, CPU)
    assert fast.row_length is not None
    slow = replace(fast, row_length=None)
    fast_logits, fast_grads = _loss_and_grads(model, fast)
    slow_logits, slow_grads = _loss_and_grads(model, slow)
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-9, atol=1e-9)
    assert fast_grads.keys() == slow_grads.keys()
    for key in slow_grads:
        torch.testing.assert_close(fast_grads[key], slow_grads[key], rtol=1e-7, atol=1e-9, msg=key)


def test_rows_whose_targets_see_different_prefixes_take_the_per_event_path():
    data = make_synthetic(SPEC)
    numpy_batch = next(user_batches(data.histories, data.train, 4, None, shuffle=False, seed=0))
    assert TensorBatch.whole_history_rows(numpy_batch) is not None
    numpy_batch.visible[0, 0] -= 1
    assert TensorBatch.whole_history_rows(numpy_batch) is None
