"""The scoring bench's numpy baselines compute what they claim: full attention equals the
model's own unquantized attention, top-k equals SIM-hard's definition event by event."""

from __future__ import annotations

import math

import numpy as np
import torch

from test_state_math import make_model, random_candidates, random_events
from vql.bench.baselines import RawHistory, full_attention, topk_attention


def test_full_attention_equals_the_models_unquantized_attention(tmp_path):
    model, scorer = make_model(tmp_path)
    rng = np.random.default_rng(0)
    events = random_events(rng, 3000)
    candidates = random_candidates(rng, 9)
    now = events.time_s.max() + 3 * 86400
    history = RawHistory.encode(model, events, dtype=np.float64)
    queries = scorer.queries(scorer.target_features(candidates))
    log_mixture = torch.log_softmax(model.rate_logits.detach(), -1).double().numpy()
    got = full_attention(history, queries, now, np.asarray(model.config.decay_rates), log_mixture, chunk_cells=4096)
    expected = model.attend(events, candidates, now, quantized=False).numpy()
    assert np.abs(got - expected).max() <= 1e-5


def test_topk_attends_over_the_k_newest_events_of_the_category(tmp_path):
    model, scorer = make_model(tmp_path)
    rng = np.random.default_rng(1)
    events = random_events(rng, 2000)
    candidates = random_candidates(rng, 12)
    candidates.category[0] = 10**6  # a category the user never touched: zeros
    history = RawHistory.encode(model, events, dtype=np.float64)
    queries = scorer.queries(scorer.target_features(candidates))
    got = topk_attention(history, queries, candidates.category, k=5)
    keys = history.keys.transpose(1, 0, 2)
    values = history.values.transpose(1, 0, 2)
    for n in range(len(candidates)):
        same = np.flatnonzero(events.category == candidates.category[n])
        picked = same[np.argsort(events.time_s[same])][-5:]
        if picked.size == 0:
            assert not got[n].any()
            continue
        logits = np.einsum("hd,khd->hk", queries[:, n], keys[picked]) / math.sqrt(queries.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        expected = np.einsum("hk,khd->hd", weights / weights.sum(-1, keepdims=True), values[picked])
        assert np.abs(got[n] - expected).max() <= 1e-6  # queries are float32
