"""A seeded generator of realistic-looking behavior streams, for the demo, tests and benches.

Each user has a few favourite categories and acts mostly on items from them; a handful of
heavy users have histories of 10^4+ events. Events come out in a shuffled time order within
each user's history, as late and out-of-order events do in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson

from vql.schemas.events import Action, Modality

_ACTIONS = [a.value for a in Action]
_ACTION_P = np.array([0.45, 0.25, 0.1, 0.03, 0.04, 0.02, 0.1, 0.01])
_MODALITIES = [m.value for m in Modality]
ITEMS_PER_CATEGORY = 10_000


@dataclass(frozen=True)
class DemoSpec:
    users: int = 3000
    mean_events: int = 30
    heavy_users: int = 5
    heavy_events: int = 12_000
    categories: int = 200
    span_days: float = 90.0
    seed: int = 7


def user_id(index: int) -> str:
    return f"user-{index:06d}"


def history_lengths(spec: DemoSpec) -> np.ndarray:
    rng = np.random.default_rng(spec.seed)
    lengths = rng.geometric(1.0 / spec.mean_events, size=spec.users)
    lengths[: spec.heavy_users] = spec.heavy_events
    return lengths


def generate(spec: DemoSpec, now_ms: int) -> Iterator[tuple[bytes, bytes]]:
    """(key, JSON value) records, users interleaved, ``sum(history_lengths(spec))`` in all."""
    rng = np.random.default_rng(spec.seed + 1)
    lengths = history_lengths(spec)
    owners = np.repeat(np.arange(spec.users), lengths)
    rng.shuffle(owners)  # interleave users, as a real topic does
    n = owners.size
    favourites = rng.integers(0, spec.categories, size=(spec.users, 3))
    explore = rng.random(n) < 0.2
    category = np.where(
        explore, rng.integers(0, spec.categories, n), favourites[owners, rng.integers(0, 3, n)]
    )
    item = category * ITEMS_PER_CATEGORY + rng.zipf(1.3, n) % ITEMS_PER_CATEGORY
    action = rng.choice(len(_ACTIONS), size=n, p=_ACTION_P / _ACTION_P.sum())
    modality = category % len(_MODALITIES)
    age_ms = (rng.random(n) ** 2 * spec.span_days * 86_400_000).astype(np.int64)
    times = now_ms - age_ms
    for i in range(n):
        user = user_id(int(owners[i]))
        record = {
            "event_id": f"{user}:{i}",
            "user_id": user,
            "item_id": int(item[i]),
            "action": _ACTIONS[action[i]],
            "event_time_ms": int(times[i]),
            "context": {"category": int(category[i]), "modality": _MODALITIES[modality[i]]},
        }
        yield user.encode(), orjson.dumps(record)
