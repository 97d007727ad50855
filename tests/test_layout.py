"""The start checks of streams/layout.py on sampled states, without a broker."""

from __future__ import annotations

import pytest

from vql.schemas.placement import partition_of
from vql.streams.layout import LayoutRefused, SampledState, check_states_topic

MODEL = "a" * 16


def placed(key: bytes, partitions: int, header: int | None = None, model: str | None = MODEL) -> SampledState:
    return SampledState(partition_of(key, partitions), 7, key, model, header)


def test_states_placed_for_this_count_and_model_pass():
    sampled = [placed(f"u{i}".encode(), 4, header=4) for i in range(20)] + [placed(b"gone", 4, model=None)]
    check_states_topic("states", 4, sampled, MODEL)
    check_states_topic("states", 4, [], MODEL)  # an empty topic


def test_a_recorded_count_that_differs_refuses():
    with pytest.raises(LayoutRefused, match="had 2 partitions.*it has 4 now.*docs/operations.md"):
        check_states_topic("states", 4, [placed(b"u1", 4, header=2)], MODEL)


def test_states_without_the_header_are_judged_by_their_keys():
    keys = [f"u{i}".encode() for i in range(32)]
    legacy = [placed(k, 2) for k in keys]  # placed for 2, the topic now has 4
    check_states_topic("states", 2, legacy, MODEL)
    with pytest.raises(LayoutRefused, match="placed for another partition count"):
        check_states_topic("states", 4, legacy, MODEL)


def test_another_models_states_refuse():
    with pytest.raises(LayoutRefused, match="holds states of model b+, and this worker loads model a+.*docs/replay.md"):
        check_states_topic("states", 4, [placed(b"u1", 4, header=4, model="b" * 16)], MODEL)
