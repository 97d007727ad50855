"""`vql bench state-size`: published state bytes per user against history length L.

Builds one user's state from L random behaviors with the default model and reports the
float32 layout's size, next to the raw history's size as JSON events for contrast.
"""

from __future__ import annotations

from itertools import islice

import numpy as np

from vql.bench.history import synthetic_history
from vql.bench.report import emit
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.user_state import encode_user_state
from vql.streams.demo_events import DemoSpec, generate


def mean_event_bytes(sample: int = 1000) -> float:
    """Mean size of a demo event as compact JSON, the raw form of one behavior."""
    spec = DemoSpec(users=100, mean_events=10, heavy_users=0)
    sizes = [len(value) for _key, value in islice(generate(spec, now_ms=1_795_000_000_000), sample)]
    return sum(sizes) / len(sizes)


def measure(lengths: list[int], user: str = "user-000000") -> list[dict]:
    """Per L: the published state's bytes, its occupied cells, and the raw history's bytes."""
    model = VQLModel(ModelConfig()).eval()
    event_bytes = mean_event_bytes()
    rows = []
    for length in lengths:
        state, _ = synthetic_history(model, "0" * 16, user, length)
        rows.append({"L": length, "state_bytes": len(encode_user_state(state, np.float32)),
                     "cells": state.occupied_cells, "raw_bytes": length * event_bytes})
    return rows


def run(lengths: list[int]) -> None:
    config = ModelConfig()
    user = "user-000000"
    for row in measure(lengths, user):
        emit("state_size", "state_bytes", row["state_bytes"], "B", L=row["L"], cells=row["cells"],
             max_cells=config.groups * config.codes * config.rates, user_id_bytes=len(user))
        emit("state_size", "raw_history_bytes", row["raw_bytes"], "B", L=row["L"],
             note="L x mean JSON size of demo events")
