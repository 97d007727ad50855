"""One user's synthetic history of L behaviors and the state the pipeline would publish for it.

Encoded and folded in chunks, as the worker does with micro-batches, so that L = 10^6 takes
seconds and bounded memory. Shared by the state-size and scoring benchmarks.
"""

from __future__ import annotations

import numpy as np

from vql.bench.encode import sample_columns
from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns
from vql.model.state import apply_events, empty_state
from vql.schemas.user_state import UserState

CHUNK = 65536


def synthetic_history(model: VQLModel, version: str, user: str, length: int) -> tuple[UserState, BehaviorColumns]:
    """The state of ``user`` after ``length`` random behaviors, and those behaviors."""
    cfg = model.config
    rates = np.asarray(cfg.decay_rates)
    state = empty_state(user, version, (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim))
    chunks = []
    for start in range(0, length, CHUNK):
        columns = sample_columns(min(CHUNK, length - start), seed=start)
        codes, values = model.encode(columns)
        apply_events([state], np.zeros(len(columns), np.int64), codes, values.astype(np.float64),
                     columns.time_s, rates)
        chunks.append(columns)
    history = BehaviorColumns(*(np.concatenate([getattr(c, name) for c in chunks])
                                for name in ("item", "action", "category", "modality", "time_s")))
    return state, history
