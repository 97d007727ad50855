"""The write-behind cache: whatever the batching, flushes, evictions and crashes, the states
are those of one batch over the whole stream (streams/state_cache.py)."""

from __future__ import annotations

import shutil

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.decode import EventPolicy
from vql.schemas.user_state import full_state_bytes
from vql.streams.processor import BatchProcessor, RawRecord

NOW_MS = 1_795_000_000_000
MODEL = VQLModel(ModelConfig(item_buckets=256, category_buckets=16))
SHAPE = (MODEL.config.groups, MODEL.config.codes, MODEL.config.rates, MODEL.config.group_dim)
STATE_BYTES = full_state_bytes(*SHAPE, 0, np.float64)


def stream(sends: list[tuple[str, int]]) -> list[RawRecord]:
    """One partition of events; an id repeats when a user sends the same item twice."""
    return [RawRecord(0, offset, user.encode(), orjson.dumps({
        "event_id": f"{user}-{item}", "user_id": user, "item_id": item, "action": "click",
        "event_time_ms": NOW_MS - (offset % 7) * 60_000, "context": {"category": item % 5, "modality": "video"}}))
        for offset, (user, item) in enumerate(sends)]


def processor(path, cached_states: int) -> BatchProcessor:
    return BatchProcessor(MODEL, "v" * 16, path, "behaviors", EventPolicy(), clock_ms=lambda: NOW_MS,
                          cache_bytes=cached_states * STATE_BYTES)


def stored_states(proc: BatchProcessor) -> dict:
    """What the partition's store holds on disk."""
    return {s.user_id: s for s in proc.store(0).states()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sends=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 3)), min_size=1, max_size=40),
       steps=st.lists(st.tuples(st.integers(1, 8), st.sampled_from(["none", "flush", "crash"])), min_size=1,
                      max_size=12),
       cached_states=st.integers(0, 3))
def test_batches_flushes_evictions_and_crashes_give_the_states_of_one_batch(tmp_path_factory, sends, steps,
                                                                            cached_states):
    """A crash loses what was cached since the last flush (the store is copied as it is on
    disk, without closing it, as kill -9 leaves it) and the records come again from the
    last durable offset, as Kafka redelivers them after its last commit. Users send items
    more than once, so repeated event ids cross flushes, evictions and crashes."""
    records = stream(sends)
    reference = processor(tmp_path_factory.mktemp("reference"), 0)
    expected = reference.process(records)  # the fold's own result: no cache, no store

    base = tmp_path_factory.mktemp("cached")
    proc, generation, position, letters = processor(base / "0", cached_states), 0, 0, set()
    for size, then in steps * (len(records) // len(steps) + 1):
        if position >= len(records):
            break
        result = proc.process(records[position:position + size])
        proc.commit(result)
        letters.update(d.record.offset for d in result.dead_letters)
        position += size
        if then == "flush":
            proc.flush()
        elif then == "crash":
            generation += 1
            shutil.copytree(base / str(generation - 1), base / str(generation))
            proc.close()
            proc = processor(base / str(generation), cached_states)
            durable = proc.store(0).processed_offset()
            position = 0 if durable is None else durable + 1
    while position < len(records):
        result = proc.process(records[position:position + 5])
        proc.commit(result)
        letters.update(d.record.offset for d in result.dead_letters)
        position += 5
    assert proc.flush() == {0: len(records) - 1}
    got, want = stored_states(proc), {s.user_id: s for s in expected.states}
    proc.close()
    reference.close()

    assert letters == {d.record.offset for d in expected.dead_letters}
    assert sorted(got) == sorted(want)
    for user, state in want.items():  # float32 encoder: batch shapes round differently
        assert got[user].event_count == state.event_count and got[user].applied_offset == state.applied_offset
        np.testing.assert_allclose(got[user].log_count, state.log_count, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[user].mean, state.mean, rtol=1e-5, atol=1e-6)


def test_the_cache_keeps_its_budget_after_a_flush_and_reads_evicted_states_back(tmp_path):
    proc = processor(tmp_path, 2)
    users = "abcdef"
    proc.commit(proc.process(stream([(u, 1) for u in users])))
    assert len(proc.cache(0)) == 6 and proc.needs_flush()
    proc.flush()
    assert len(proc.cache(0)) <= 2 and not proc.needs_flush()
    later = proc.process(stream([(u, 1) for u in users] + [(u, 2) for u in users])[6:])
    assert {s.user_id: s.event_count for s in later.states} == {u: 2 for u in users}
    proc.close()
