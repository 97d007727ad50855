"""The evaluation grid: one record per (dataset, model, L, metric), and a rerun of some models
merged into an earlier grid's figures."""

from __future__ import annotations

import torch

from vql.model.config import ModelConfig
from vql.research.datasets import SyntheticSpec, make_synthetic
from vql.research.experiments import merge_records, read_jsonl, run_grid, write_jsonl
from vql.research.training import TrainConfig

TINY = SyntheticSpec(users=40, events_per_user=200, targets_per_user=8, items_per_category=10, recent_noise=20)
SMALL_MODEL = ModelConfig(item_buckets=1024, category_buckets=128)
METRICS = ("auc", "gauc", "logloss", "train_seconds_per_epoch")


def _grid(models: list[str]) -> list[dict]:
    data = make_synthetic(TINY)
    return run_grid([(data, TrainConfig(epochs=1, users_per_batch=16))], models, [0, 1], [10, 50], SMALL_MODEL,
                    torch.device("cpu"))


def test_grid_reports_every_metric_of_every_model_at_every_length():
    records = _grid(["vql", "mean"])
    full_length = TINY.events_per_user
    assert {(r["model"], r["L"], r["metric"]) for r in records} == {
        (m, length, metric) for m in ("vql", "mean") for length in (10, 50, full_length) for metric in METRICS}
    assert all(r["seeds"] == 2 and r["dataset"] == "synthetic" for r in records)
    auc = [r["value"] for r in records if r["metric"] == "auc"]
    assert all(0.0 <= value <= 1.0 for value in auc)


def test_merge_replaces_the_rerun_models_and_keeps_the_others(tmp_path):
    previous = _grid(["vql", "mean"])
    write_jsonl(previous, tmp_path / "results.jsonl")
    stale = [dict(r, value=-1.0) for r in read_jsonl(tmp_path / "results.jsonl")]
    rerun = _grid(["mean"])
    merged = merge_records(stale, rerun)
    assert [r for r in merged if r["model"] == "mean"] == rerun
    assert [r for r in merged if r["model"] == "vql"] == [r for r in stale if r["model"] == "vql"]
    assert [r["model"] for r in merged] == [r["model"] for r in previous], "the grid's order"
