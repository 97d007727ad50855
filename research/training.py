"""Training and evaluation of any CTR model here on a Dataset (research/datasets.py).

Batches are grouped by user: every target of a user attends over that user's events, each
seeing only its own prefix. Loss: binary cross-entropy on the CTR logit plus the model's
auxiliary loss (VQL: beta x commitment); VQL's codebooks follow by EMA after each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vql.model.ctr import CTRModel, TensorBatch
from vql.model.encoder import VQLModel
from vql.model.features import hash_buckets
from vql.research.datasets import Histories, Samples, user_batches
from vql.research.metrics import auc, gauc, logloss


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    users_per_batch: int = 32
    learning_rate: float = 3e-3
    commitment: float = 0.25
    max_events: int | None = None  # truncate histories to the newest events (None: all)
    seed: int = 0
    # VQL: train the first epochs with unquantized keys (full attention), then fit the
    # codebooks to the learnt keys by k-means and go on quantized. From random codes, the keys
    # learn slowly: a code mixes behaviors that have nothing in common yet.
    warmup_epochs: int = 0
    # VQL: quantized epochs after ``epochs``. Quantized epochs learn more slowly than
    # unquantized ones (docs/training.md); these let VQL adapt to its codebooks after the
    # warm-up without giving every other model more epochs than it can use.
    extra_quantized_epochs: int = 0


@dataclass
class TrainReport:
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)


def train(
    model: CTRModel,
    histories: Histories,
    samples: Samples,
    config: TrainConfig,
    device: torch.device,
    progress: bool = True,
    label: str = "train",
) -> TrainReport:
    torch.manual_seed(config.seed)
    model.to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    report = TrainReport()
    quantizes = isinstance(model, VQLModel) and model.quantize
    epochs = config.epochs + (config.extra_quantized_epochs if quantizes else 0)
    for epoch in range(epochs):
        if quantizes:
            model.quantize = epoch >= config.warmup_epochs
            if config.warmup_epochs and epoch == config.warmup_epochs:
                model.fit_codebooks(_sample_features(model, histories, config.seed, device))
        started, losses, weights = time.perf_counter(), 0.0, 0
        batches = user_batches(histories, samples, config.users_per_batch, config.max_events,
                               shuffle=True, seed=config.seed * 1000 + epoch)
        total = len(np.unique(samples.user))
        with tqdm(total=total, desc=f"{label} epoch {epoch + 1}/{epochs}", unit="user",
                  disable=not progress, leave=False) as bar:
            for numpy_batch in batches:
                batch = TensorBatch.from_numpy(numpy_batch, model.config, device)
                logits = model(batch)
                bce = F.binary_cross_entropy_with_logits(logits[batch.target_mask], batch.label[batch.target_mask])
                loss = bce + config.commitment * model.auxiliary_loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                model.after_step()
                count = int(batch.target_mask.sum())
                losses += float(bce.detach()) * count
                weights += count
                bar.update(len(numpy_batch.user))
        report.epoch_seconds.append(time.perf_counter() - started)
        report.epoch_losses.append(losses / max(weights, 1))
    return report


@torch.no_grad()
def _sample_features(model: VQLModel, histories: Histories, seed: int, device: torch.device,
                     size: int = 100_000) -> torch.Tensor:
    """Behavior features of up to ``size`` events drawn uniformly from ``histories``."""
    rows = np.random.default_rng(seed).choice(histories.num_events, min(size, histories.num_events), replace=False)
    cfg = model.config

    def column(values: np.ndarray, buckets: int | None = None) -> torch.Tensor:
        picked = values[rows] if buckets is None else hash_buckets(values[rows], buckets)
        return torch.from_numpy(np.ascontiguousarray(picked)).to(device)

    return model.behavior_features(column(histories.item, cfg.item_buckets), column(histories.action),
                                   column(histories.category, cfg.category_buckets), column(histories.modality))


@torch.no_grad()
def predict(
    model: CTRModel,
    histories: Histories,
    samples: Samples,
    device: torch.device,
    users_per_batch: int = 64,
    max_events: int | None = None,
) -> np.ndarray:
    """CTR probability of every sample, in sample order."""
    model.to(device).eval()
    probabilities = np.full(len(samples.label), np.nan)
    for numpy_batch in user_batches(histories, samples, users_per_batch, max_events, shuffle=False, seed=0):
        batch = TensorBatch.from_numpy(numpy_batch, model.config, device)
        p = torch.sigmoid(model(batch)).cpu().numpy()
        keep = numpy_batch.target_mask
        probabilities[numpy_batch.sample_index[keep]] = p[keep]
    return probabilities


def evaluate(model: CTRModel, histories: Histories, samples: Samples, device: torch.device,
             max_events: int | None = None) -> dict[str, float]:
    p = predict(model, histories, samples, device, max_events=max_events)
    return {
        "auc": auc(samples.label, p),
        "gauc": gauc(samples.user, samples.label, p),
        "logloss": logloss(samples.label, p),
    }
