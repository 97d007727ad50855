"""Refuse, at start, a model whose states Kafka would refuse.

A state's size is bounded by the model's shape, not by the history (every (group, code,
rate) cell occupied: docs/state-format.md). A model whose largest state record does not fit
the states topic's ``max.message.bytes`` would start, consume, and stop at the first heavy
user's publication, and so would every worker after it: the partition halts. So the worker
computes that bound from the artifact's config and refuses to start, naming what to change.
"""

from __future__ import annotations

from vql.model.config import ModelConfig
from vql.schemas.events import MAX_ID_LENGTH
from vql.schemas.user_state import full_state_bytes
from vql.streams import record_limits
from vql.streams.record_limits import record_bytes
from vql.streams.settings import Settings

MAX_USER_ID_BYTES = MAX_ID_LENGTH * 4  # the longest user id the contract accepts, in UTF-8
# The states producer's batches are never larger than this, whatever the topic allows.
MAX_BATCH_BYTES = 1024 * 1024


class StateLimitError(RuntimeError):
    """The model's states cannot be published under the configured limits; the message says
    which setting to change."""


def largest_state_record(config: ModelConfig) -> int:
    """The largest record batch one published state can need: every cell occupied, in the
    topic's float32 layout, under the longest user id (as value and as key)."""
    state = full_state_bytes(config.groups, config.codes, config.rates, config.group_dim, MAX_USER_ID_BYTES)
    return record_bytes(b"\0" * MAX_USER_ID_BYTES, b"\0" * state)


def check_states_fit(config: ModelConfig, limit: int, topic: str) -> int:
    """Raise :class:`StateLimitError` unless the largest state fits ``limit``; returns it."""
    largest = largest_state_record(config)
    if largest > limit:
        raise StateLimitError(
            f"the model's largest state record is {largest} bytes (G={config.groups} groups x "
            f"K={config.codes} codes x R={config.rates} rates, {config.group_dim} floats a cell), but "
            f"{topic} accepts {limit} bytes a record batch: raise VQL_MAX_STATE_BYTES and the topic's "
            f"max.message.bytes to at least {largest} (with the brokers' replica.fetch.max.bytes), "
            "or train a model with fewer codes, groups or decay rates (docs/operations.md)"
        )
    return largest


def states_limit(settings: Settings) -> int:
    """What the states topic accepts a record batch: its ``max.message.bytes`` capped by
    ``max_state_bytes``."""
    return record_limits.topic_limit(settings, settings.states_topic, settings.max_state_bytes,
                                     "VQL_MAX_STATE_BYTES")


def state_batch_bytes(limit: int) -> int:
    """The states producer's batch size: many states a batch, within the topic's limit."""
    return min(limit, MAX_BATCH_BYTES) - record_limits.FRAMING_MARGIN
