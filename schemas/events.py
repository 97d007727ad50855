"""The behavior event: what producers write to the `behaviors` topic.

JSON on the wire, one object per Kafka message, keyed by ``user_id`` (UTF-8), so that all
events of a user land on one partition in offset order. The model is strict on purpose
(``extra="forbid"`` at the top level, no type coercion): an event that a producer got wrong
must reach the dead-letter topic with a reason, not be guessed into shape.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

SCHEMA_VERSION = 1

# Ids are user-supplied; bound them so that one hostile event cannot blow up a key or a row.
MAX_ID_LENGTH = 128
MAX_ITEM_ID = 2**63 - 1


class Action(str, Enum):
    """What the user did with the item. The order is the model's action vocabulary: append only."""

    IMPRESSION = "impression"
    CLICK = "click"
    LIKE = "like"
    SHARE = "share"
    COMMENT = "comment"
    FOLLOW = "follow"
    WATCH = "watch"
    PURCHASE = "purchase"


class Modality(str, Enum):
    """The item's medium. The order is the model's modality vocabulary: append only."""

    VIDEO = "video"
    IMAGE = "image"
    TEXT = "text"
    LIVE = "live"
    AUDIO = "audio"


ExtraValue = StrictStr | StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)] | bool


class EventContext(BaseModel):
    """Static context of one behavior: it depends on the behavior alone, never on the query.

    ``category`` and ``modality`` feed the model; ``extra`` carries further context fields
    through the contract without a schema change (the model ignores them until it learns them).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    category: Annotated[int, Field(ge=0, le=MAX_ITEM_ID)]
    modality: Modality
    extra: dict[Annotated[str, Field(max_length=64)], ExtraValue] = Field(
        default_factory=dict, max_length=32
    )


class BehaviorEvent(BaseModel):
    """One user behavior.

    ``event_time_ms`` is when the behavior happened (epoch milliseconds, UTC), not when it
    was produced: the state's time decay is computed from it, so late events stay exact.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Annotated[int, Field(ge=1)] = SCHEMA_VERSION
    event_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
    user_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
    item_id: Annotated[int, Field(ge=0, le=MAX_ITEM_ID)]
    action: Action
    event_time_ms: Annotated[int, Field(ge=0, le=2**53)]
    context: EventContext

    def to_json(self) -> bytes:
        """The wire form (compact JSON, UTF-8)."""
        return self.model_dump_json().encode()
