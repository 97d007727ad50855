"""The evaluation grid behind docs/results.md: every model x dataset x seed, one command.

Each run trains a fresh model on the dataset's train split and reports AUC, GAUC and log
loss on its test split; figures are aggregated as mean and std over seeds and written as
JSON lines (docs/results.jsonl) and a Markdown table with plots (docs/results.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vql.model.config import ModelConfig
from vql.research.datasets import Dataset
from vql.research.training import TrainConfig, evaluate, train
from vql.research.zoo import MODELS


@dataclass(frozen=True)
class Recipe:
    """How the grid builds and trains on a dataset: one place, so that docs/results.md is
    reproduced by one command."""

    data: dict  # load_dataset overrides
    train: TrainConfig


RECIPES: dict[str, Recipe] = {
    "movielens": Recipe({}, TrainConfig(epochs=2, users_per_batch=16, learning_rate=3e-3)),
    # Ultra-long histories (10^4 behaviors a user). 500 items and 256 labelled targets a
    # user, so that attention can learn which behaviors share a target's hidden topic; the
    # categories mix topics (Dirichlet(2)), so the category is a weak proxy for the topic.
    # 10 epochs: full attention levels off after about 9 (0.847 AUC at 9, 0.845-0.843 at
    # 10-12, seed 0). VQL trains those 10 epochs unquantized (the very training full
    # attention gets: same model, seed and batches), then fits its codebooks by k-means and
    # goes on 4 epochs quantized: quantized epochs learn more slowly than unquantized ones
    # (seed 0, 4 warm-up epochs: 0.817 after 12 epochs against full attention's 0.845), so
    # the keys are learnt first and the quantized phase adapts the model to its codebooks.
    "synthetic": Recipe(
        dict(users=300, events_per_user=10_000, targets_per_user=256, items_per_category=10,
             category_topic_concentration=2.0),
        TrainConfig(epochs=10, users_per_batch=8, learning_rate=1e-2, warmup_epochs=10, extra_quantized_epochs=4),
    ),
}


@dataclass(frozen=True)
class RunResult:
    dataset: str
    model: str
    seed: int
    metrics: dict[str, float]
    epoch_seconds: float
    history_length: int


def aggregate(results: list[RunResult]) -> list[dict]:
    """One JSON record per (dataset, model, metric): mean and std over seeds."""
    records = []
    keys = sorted({(r.dataset, r.model, r.history_length) for r in results},
                  key=lambda k: (k[0], list(MODELS).index(k[1]), k[2]))
    for dataset, model, length in keys:
        runs = [r for r in results if (r.dataset, r.model, r.history_length) == (dataset, model, length)]
        for metric in ("auc", "gauc", "logloss"):
            values = np.array([r.metrics[metric] for r in runs])
            records.append({"dataset": dataset, "L": length, "model": model, "metric": metric,
                            "value": round(float(values.mean()), 5), "std": round(float(values.std()), 5),
                            "seeds": len(runs)})
        records.append({"dataset": dataset, "L": length, "model": model, "metric": "train_seconds_per_epoch",
                        "value": round(float(np.mean([r.epoch_seconds for r in runs])), 2), "std": 0.0,
                        "seeds": len(runs)})
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def run_grid(
    datasets: list[tuple[Dataset, TrainConfig]],
    models: list[str],
    seeds: list[int],
    lengths: list[int],
    model_config: ModelConfig,
    device: torch.device,
) -> list[dict]:
    """Train (each dataset with its TrainConfig) and test every (dataset, model, seed); evaluate
    each trained model again with its test histories cut to the newest L events for every L in
    ``lengths`` (AUC vs L). Returns the aggregated records (``aggregate``)."""
    results: list[RunResult] = []
    for dataset, train_config in datasets:
        full_length = int(np.diff(dataset.histories.offsets).max())
        for model_name in models:
            for seed in seeds:
                model = MODELS[model_name](model_config.model_copy(update={"seed": seed}))
                config = TrainConfig(**{**train_config.__dict__, "seed": seed})
                report = train(model, dataset.histories, dataset.train, config, device,
                               label=f"{dataset.name}/{model_name}/seed {seed}")
                for length in sorted({*(l for l in lengths if l < full_length), full_length}):
                    metrics = evaluate(model, dataset.histories, dataset.test, device,
                                       max_events=None if length == full_length else length)
                    results.append(RunResult(dataset.name, model_name, seed, metrics,
                                             float(np.mean(report.epoch_seconds)), length))
                print(f"{dataset.name} {model_name} seed {seed}: " +
                      ", ".join(f"{k} {v:.4f}" for k, v in results[-1].metrics.items()), flush=True)
    return aggregate(results)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merge_records(previous: list[dict], fresh: list[dict]) -> list[dict]:
    """``previous`` with every (dataset, model) pair that ``fresh`` has replaced by ``fresh``'s
    figures: a rerun of some models keeps the grid's other figures. Sorted as ``aggregate``
    sorts (dataset, then the order of MODELS, then L)."""
    rerun = {(r["dataset"], r["model"]) for r in fresh}
    kept = [r for r in previous if (r["dataset"], r["model"]) not in rerun]
    order = list(MODELS)
    return sorted(kept + fresh, key=lambda r: (r["dataset"], order.index(r["model"]), r["L"]))
