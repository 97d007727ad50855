"""Time rules (schemas/event_time.py): event times are judged against the later of the
worker's clock and the record's Kafka timestamp, and no event moves its user's landmark more
than VQL_MAX_LANDMARK_LEAD_S past its record's timestamp; the rule is a function of the
record alone, so the state stays order-free and every replay folds the same way."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.decode import EventPolicy, Reason
from vql.schemas.event_time import NO_TIMESTAMP, fold_time_s, judged_against_ms
from vql.streams.processor import BatchProcessor, RawRecord

NOW_MS = 1_795_000_000_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MODEL = VQLModel(ModelConfig(item_buckets=256, category_buckets=16))
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def event(user: str, n: int, time_ms: int) -> bytes:
    return orjson.dumps({"event_id": f"{user}-{n}", "user_id": user, "item_id": n, "action": "click",
                         "event_time_ms": time_ms, "context": {"category": n % 7, "modality": "video"}})


def processor(tmp_path, clock_ms: int, policy: EventPolicy = EventPolicy()) -> BatchProcessor:
    return BatchProcessor(MODEL, "v" * 16, tmp_path, "behaviors", policy, clock_ms=lambda: clock_ms)


# -- the rules themselves ------------------------------------------------------------------


@given(event_ms=st.integers(0, 2**53), record_ms=st.one_of(st.just(NO_TIMESTAMP), st.integers(0, 2**63 - 1)),
       lead_ms=st.integers(0, 10 * 365 * DAY_MS))
def test_an_event_is_folded_at_its_own_time_bounded_by_its_record_timestamp_plus_the_lead(event_ms, record_ms,
                                                                                          lead_ms):
    folded = fold_time_s(np.array([event_ms]), np.array([record_ms]), lead_ms)[0]
    assert folded <= event_ms / 1e3
    if record_ms == NO_TIMESTAMP or event_ms <= record_ms + lead_ms:
        assert folded == np.float64(event_ms) / 1e3  # exactly what the columns hold: nothing else moves
    else:
        assert folded == np.float64(record_ms + lead_ms) / 1e3


@given(clock_ms=st.integers(0, 2**50), record_ms=st.one_of(st.just(NO_TIMESTAMP), st.integers(0, 2**50)))
def test_events_are_judged_against_the_later_of_the_clock_and_the_record(clock_ms, record_ms):
    assert judged_against_ms(clock_ms, np.array([record_ms]))[0] == max(clock_ms, record_ms)


# -- through the worker's processor --------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=HEALTH)
@given(lag_ms=st.integers(2 * HOUR_MS, 60 * DAY_MS),
       offsets_ms=st.lists(st.integers(-30 * DAY_MS, HOUR_MS), min_size=1, max_size=20))
def test_a_slow_worker_clock_does_not_dead_letter_live_traffic(tmp_path_factory, lag_ms, offsets_ms):
    """The worker's clock is hours or days behind; events are stamped by their producers at
    the real now and dated up to the allowed skew after it: none is dead-lettered."""
    proc = processor(tmp_path_factory.mktemp("slow"), NOW_MS - lag_ms)
    try:
        batch = [RawRecord(0, i, b"u", event("u", i, NOW_MS + offset), timestamp=NOW_MS)
                 for i, offset in enumerate(offsets_ms)]
        result = proc.process(batch)
    finally:
        proc.close()
    assert not result.dead_letters and result.applied == len(batch)


def test_an_event_too_far_ahead_of_its_record_is_still_dead_lettered_by_a_slow_worker(tmp_path):
    proc = processor(tmp_path, NOW_MS - 7 * DAY_MS)
    try:
        result = proc.process([RawRecord(0, 0, b"u", event("u", 0, NOW_MS + 2 * HOUR_MS), timestamp=NOW_MS)])
    finally:
        proc.close()
    assert [d.rejection.reason for d in result.dead_letters] == [Reason.FUTURE_EVENT_TIME]


@settings(max_examples=8, deadline=None, suppress_health_check=HEALTH)
@given(ahead_ms=st.integers(2 * HOUR_MS, 300 * DAY_MS), seed=st.integers(0, 2**32 - 1))
def test_one_event_far_ahead_moves_the_landmark_at_most_the_lead_and_order_does_not_matter(
        tmp_path_factory, ahead_ms, seed):
    """Accepted because the operator allows a year of skew (mobile clocks), an event dated far
    ahead is folded at its record's timestamp plus the lead: the landmark stays within the
    lead of what the partition has seen, and any order and split of the batch gives the same
    state."""
    policy = EventPolicy(max_future_skew_ms=365 * DAY_MS, max_landmark_lead_ms=HOUR_MS)
    times = [NOW_MS - 5 * DAY_MS, NOW_MS - DAY_MS, NOW_MS + ahead_ms, NOW_MS - HOUR_MS]
    batch = [RawRecord(0, i, b"u", event("u", i, t), timestamp=NOW_MS + i) for i, t in enumerate(times)]
    states = []
    for attempt, order in enumerate([np.arange(len(batch)), np.random.default_rng(seed).permutation(len(batch))]):
        proc = processor(tmp_path_factory.mktemp(f"order{attempt}"), NOW_MS, policy)
        try:
            # Arrival in this order, at offsets in this order, in two micro-batches.
            arrived = [RawRecord(0, j, batch[i].key, batch[i].value, timestamp=batch[i].timestamp)
                       for j, i in enumerate(order)]
            cut = 1 + seed % (len(arrived) - 1)
            for part in (arrived[:cut], arrived[cut:]):
                result = proc.process(part)
                proc.commit(result)
            states.append(proc.cache(0).load(["u"]))
        finally:
            proc.close()
    first, second = states
    assert first.landmark_t0[0] == (NOW_MS + 2 + HOUR_MS) / 1e3  # the far event's record time + the lead
    assert first.event_count[0] == second.event_count[0] == len(times)
    assert first.landmark_t0[0] == second.landmark_t0[0]
    assert np.allclose(first.log_count, second.log_count, rtol=1e-9, atol=1e-9)
    # The encoder's float32 values can differ by an ulp between batch shapes.
    assert np.allclose(first.mean, second.mean, rtol=1e-6, atol=1e-6)
