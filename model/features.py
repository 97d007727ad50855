"""Behavior events -> the model's integer feature columns, vectorised over a batch.

Ids are hashed into embedding buckets here, once, with numpy, so that the encoder, the
worker, replay and the scorer all see the same bucket for the same id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vql.schemas.events import Action, BehaviorEvent, Modality

ACTION_INDEX = {action: i for i, action in enumerate(Action)}
MODALITY_INDEX = {modality: i for i, modality in enumerate(Modality)}
_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: spreads consecutive ids


def hash_buckets(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Map non-negative int64 ids to [0, buckets) with a multiplicative hash (Fibonacci)."""
    mixed = ids.astype(np.uint64) * _MIX  # wraps modulo 2^64, as intended
    mixed ^= mixed >> np.uint64(29)
    return (mixed % np.uint64(buckets)).astype(np.int64)


@dataclass(frozen=True)
class BehaviorColumns:
    """One batch of behaviors as aligned columns (length n)."""

    item: np.ndarray  # int64 item ids
    action: np.ndarray  # int64 index into Action
    category: np.ndarray  # int64 category ids
    modality: np.ndarray  # int64 index into Modality
    time_s: np.ndarray  # float64 epoch seconds

    def __len__(self) -> int:
        return int(self.item.shape[0])

    @classmethod
    def from_events(cls, events: Sequence[BehaviorEvent]) -> "BehaviorColumns":
        return cls(
            item=np.fromiter((e.item_id for e in events), np.int64, len(events)),
            action=np.fromiter((ACTION_INDEX[e.action] for e in events), np.int64, len(events)),
            category=np.fromiter((e.context.category for e in events), np.int64, len(events)),
            modality=np.fromiter(
                (MODALITY_INDEX[e.context.modality] for e in events), np.int64, len(events)
            ),
            time_s=np.fromiter((e.event_time_ms for e in events), np.float64, len(events)) / 1e3,
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> "BehaviorColumns":
        """The columns of valid events held as Arrow (a decoded micro-batch, a replayed
        file), without a Python loop."""
        context = table.column("context")
        return cls(
            item=table.column("item_id").to_numpy(),
            action=_index(table.column("action"), list(Action), ACTION_INDEX),
            category=pc.struct_field(context, "category").to_numpy(),
            modality=_index(pc.struct_field(context, "modality"), list(Modality), MODALITY_INDEX),
            time_s=table.column("event_time_ms").to_numpy().astype(np.float64) / 1e3,
        )


def _index(column, members: list, index: dict) -> np.ndarray:
    positions = pc.index_in(column, pa.array([m.value for m in members])).to_numpy(zero_copy_only=False)
    order = np.array([index[m] for m in members], np.int64)
    return order[positions.astype(np.int64)]


@dataclass(frozen=True)
class Candidates:
    """Target items to score: the query side, [e(y); e(s_y)]."""

    item: np.ndarray
    category: np.ndarray
    modality: np.ndarray

    def __len__(self) -> int:
        return int(self.item.shape[0])
