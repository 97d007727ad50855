"""The model's shape, in one typed object that travels inside every artifact."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


HOUR_S = 3600.0
DAY_S = 24 * HOUR_S


class ModelConfig(BaseModel):
    """Sizes of the VQL encoder and of the per-user state.

    The defaults are the compact configuration of design/vql.md section 7 sized so that a
    full state stays under 16 KB in float32 (docs/state-format.md has the arithmetic):
    H=4 heads of width 8 in G=2 groups, K=32 codes per group, R=3 decay rates.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_buckets: int = Field(65536, ge=1, description="hash buckets of the item embedding")
    item_dim: int = Field(32, ge=1)
    category_buckets: int = Field(4096, ge=1, description="hash buckets of the category embedding")
    category_dim: int = Field(16, ge=1)
    action_dim: int = Field(8, ge=1)
    modality_dim: int = Field(8, ge=1)
    heads: int = Field(4, ge=1)
    head_dim: int = Field(8, ge=1)
    groups: int = Field(2, ge=1)
    codes: int = Field(32, ge=2, le=4096)
    half_lives_s: tuple[float, ...] = Field((DAY_S, 30 * DAY_S, 365 * DAY_S), min_length=1)
    mlp_hidden: int = Field(64, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_split_into_groups(self) -> "ModelConfig":
        if self.heads % self.groups:
            raise ValueError(f"heads ({self.heads}) must split evenly into groups ({self.groups})")
        if any(h <= 0 or not math.isfinite(h) for h in self.half_lives_s):
            raise ValueError("half-lives must be positive and finite")
        if self.groups * self.codes * self.rates >= 2**16:
            raise ValueError("G*K*R cells must fit the state layout's uint16 cell index")
        return self

    @property
    def rates(self) -> int:
        return len(self.half_lives_s)

    @property
    def decay_rates(self) -> list[float]:
        """lambda_r = ln 2 / half-life_r, per second."""
        return [math.log(2.0) / h for h in self.half_lives_s]

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups

    @property
    def group_dim(self) -> int:
        """Width of one group's key, code and value: (H/G) * d_h."""
        return self.heads_per_group * self.head_dim

    @property
    def behavior_dim(self) -> int:
        return self.item_dim + self.action_dim + self.category_dim + self.modality_dim

    @property
    def target_dim(self) -> int:
        """Width of a candidate's features [e(y); e(s_y)]: the query side."""
        return self.item_dim + self.category_dim + self.modality_dim

