"""The baselines VQL is measured against, one small module each, all on the CTRModel frame.

``MODELS`` maps the names used in results (docs/results.jsonl) to constructors.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from vql.model.config import ModelConfig
from vql.model.ctr import CTRModel
from vql.model.encoder import VQLModel
from vql.research.zoo.din import DINModel
from vql.research.zoo.full import FullAttentionModel
from vql.research.zoo.mean_pool import MeanPoolModel
from vql.research.zoo.sdim import SDIMModel
from vql.research.zoo.sim import SIMHardModel

MODELS: dict[str, Callable[[ModelConfig], CTRModel]] = {
    "vql": VQLModel,
    "full": FullAttentionModel,
    "din50": partial(DINModel, k=50),
    "din200": partial(DINModel, k=200),
    "sim": partial(SIMHardModel, k=200),
    "sdim": SDIMModel,
    "mean": MeanPoolModel,
}
