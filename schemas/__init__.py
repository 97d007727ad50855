"""Contracts of vql-stream: what travels on its topics, and how it is laid out."""

from vql.schemas.events import (
    Action,
    BehaviorEvent,
    EventContext,
    Modality,
    SCHEMA_VERSION,
)
from vql.schemas.user_state import UserState, decode_user_state, encode_user_state

__all__ = [
    "Action",
    "BehaviorEvent",
    "EventContext",
    "Modality",
    "SCHEMA_VERSION",
    "UserState",
    "decode_user_state",
    "encode_user_state",
]
