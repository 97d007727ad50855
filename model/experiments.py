"""The evaluation grid behind docs/results.md: every model x dataset x seed, one command.

Each run trains a fresh model on the dataset's train split and reports AUC, GAUC and log
loss on its test split; figures are aggregated as mean and std over seeds and written as
JSON lines (docs/results.jsonl) and a Markdown table with plots (docs/results.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vql.model.config import ModelConfig
from vql.model.datasets import Dataset
from vql.model.training import TrainConfig, evaluate, train
from vql.model.zoo import MODELS


@dataclass(frozen=True)
class RunResult:
    dataset: str
    model: str
    seed: int
    metrics: dict[str, float]
    epoch_seconds: float
    history_length: int


def run_one(dataset: Dataset, model_name: str, seed: int, model_config: ModelConfig, train_config: TrainConfig,
            device: torch.device, progress: bool = True) -> RunResult:
    model = MODELS[model_name](model_config.model_copy(update={"seed": seed}))
    report = train(model, dataset.histories, dataset.train, TrainConfig(**{**train_config.__dict__, "seed": seed}),
                   device, progress=progress, label=f"{dataset.name}/{model_name}/seed {seed}")
    metrics = evaluate(model, dataset.histories, dataset.test, device, max_events=train_config.max_events)
    lengths = np.diff(dataset.histories.offsets)
    return RunResult(dataset.name, model_name, seed, metrics, float(np.mean(report.epoch_seconds)),
                     int(lengths.max()))


def aggregate(results: list[RunResult]) -> list[dict]:
    """One JSON record per (dataset, model, metric): mean and std over seeds."""
    records = []
    keys = sorted({(r.dataset, r.model) for r in results}, key=lambda k: (k[0], list(MODELS).index(k[1])))
    for dataset, model in keys:
        runs = [r for r in results if (r.dataset, r.model) == (dataset, model)]
        for metric in ("auc", "gauc", "logloss"):
            values = np.array([r.metrics[metric] for r in runs])
            records.append({"dataset": dataset, "L": runs[0].history_length, "model": model, "metric": metric,
                            "value": round(float(values.mean()), 5), "std": round(float(values.std()), 5),
                            "seeds": len(runs)})
        records.append({"dataset": dataset, "L": runs[0].history_length, "model": model,
                        "metric": "train_seconds_per_epoch",
                        "value": round(float(np.mean([r.epoch_seconds for r in runs])), 2), "std": 0.0,
                        "seeds": len(runs)})
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - started
