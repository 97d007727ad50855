"""`vql bench encode`: code assignment throughput of the default model, per batch size.

What is timed is the worker's encode step as it runs in the pipeline: hashing the ids of a
decoded batch, the embedding lookups, key projection and nearest-code search per group, and
the values, from numpy columns in to numpy codes and values out.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vql.bench.report import emit
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns


def sample_columns(n: int, seed: int = 0) -> BehaviorColumns:
    rng = np.random.default_rng(seed)
    return BehaviorColumns(
        item=rng.integers(0, 2**40, n),
        action=rng.integers(0, 8, n),
        category=rng.integers(0, 5000, n),
        modality=rng.integers(0, 5, n),
        time_s=1.7e9 + rng.uniform(0, 1e7, n),
    )


def measure(model: VQLModel, batch: int, seconds: float) -> float:
    """Events per second over repeated encodes of distinct batches of this size."""
    pool = [sample_columns(batch, seed) for seed in range(8)]
    model.encode(pool[0])  # warm-up: first-call allocations, CUDA context
    done, started = 0, time.perf_counter()
    while True:
        model.encode(pool[done % len(pool)])
        done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 3:
            return done * batch / elapsed


def run(batches: list[int], seconds: float, devices: list[str] | None = None) -> None:
    config = ModelConfig()
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        model = VQLModel(config).to(device).eval()
        for batch in batches:
            emit("encode", "events_per_s", measure(model, batch, seconds), "1/s",
                 batch=batch, device=device, threads=torch.get_num_threads(),
                 groups=config.groups, codes=config.codes, heads=config.heads, head_dim=config.head_dim)
