"""Training works, and a trained model's state-based scores equal its full forward pass."""

from __future__ import annotations

import numpy as np
import torch

from vql.model.artifact import load_artifact
from vql.model.config import ModelConfig
from vql.model.ctr import TensorBatch
from vql.research.datasets import SyntheticSpec, make_synthetic, user_batches
from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns, Candidates
from vql.model.scoring import Scorer
from vql.model.state import apply_events, empty_state
from vql.research.training import TrainConfig, train
from vql.research.zoo import MODELS

CPU = torch.device("cpu")
TINY = SyntheticSpec(users=60, events_per_user=300, targets_per_user=16, items_per_category=10, recent_noise=50)
SMALL_MODEL = ModelConfig(item_buckets=1024, category_buckets=128)


def test_training_reduces_the_loss_of_every_model():
    data = make_synthetic(TINY)
    for name, build in MODELS.items():
        report = train(build(SMALL_MODEL), data.histories, data.train, TrainConfig(epochs=4, users_per_batch=8),
                       CPU, progress=False)
        assert report.epoch_losses[-1] < report.epoch_losses[0], (name, report.epoch_losses)


def test_trained_state_scores_equal_the_full_forward_pass(tmp_path):
    data = make_synthetic(TINY)
    model = VQLModel(SMALL_MODEL)
    train(model, data.histories, data.train, TrainConfig(epochs=2, users_per_batch=8), CPU, progress=False)
    version = model.save(tmp_path / "model.npz")
    scorer = Scorer(load_artifact(tmp_path / "model.npz"))
    model.eval()

    batch = next(user_batches(data.histories, data.test, 1, None, shuffle=False, seed=0))
    with torch.no_grad():
        forward = torch.sigmoid(model(TensorBatch.from_numpy(batch, model.config, CPU)))[0].numpy()

    cfg = model.config
    seen = int(batch.visible[0].max())
    events = BehaviorColumns(item=batch.item[0, :seen], action=batch.action[0, :seen],
                             category=batch.category[0, :seen], modality=batch.modality[0, :seen],
                             time_s=batch.time_s[0, :seen])
    codes, values = model.encode(events)
    state = empty_state("u", version, (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim))
    apply_events([state], np.zeros(seen, np.int64), codes, values.astype(np.float64), events.time_s,
                 np.asarray(cfg.decay_rates))
    for t in np.flatnonzero(batch.target_mask[0]):
        assert batch.visible[0, t] == seen
        candidate = Candidates(item=batch.target_item[0, t:t + 1], category=batch.target_category[0, t:t + 1],
                               modality=batch.target_modality[0, t:t + 1])
        from_state = scorer.score(state, candidate, float(batch.target_time_s[0, t])).ctr[0]
        assert abs(from_state - forward[t]) <= 1e-5


def test_extra_quantized_epochs_go_to_a_quantizing_vql_only():
    data = make_synthetic(TINY)
    config = TrainConfig(epochs=2, users_per_batch=16, warmup_epochs=2, extra_quantized_epochs=1)
    vql = VQLModel(SMALL_MODEL)
    seeded = vql.codebooks.clone()
    assert len(train(vql, data.histories, data.train, config, CPU, progress=False).epoch_seconds) == 3
    assert vql.quantize and not torch.equal(vql.codebooks, seeded), "k-means codebooks, then quantized epochs"
    for name in ("full", "mean"):
        report = train(MODELS[name](SMALL_MODEL), data.histories, data.train, config, CPU, progress=False)
        assert len(report.epoch_seconds) == 2, name
