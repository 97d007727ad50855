"""Deleting users without Kafka: control messages, the processor's order of work, deletion
markers, the cache, restore's tombstones and the offline rule the verifier applies."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.control import (
    CONTROL_HEADER,
    DeleteUser,
    decode_control,
    delete_request,
    deleted_offset,
    tombstone_headers,
)
from vql.schemas.decode import EventPolicy, Reason, Rejection
from vql.schemas.user_state import full_state_bytes
from vql.streams.deletion import bare_tombstones
from vql.streams.processor import BatchProcessor, RawRecord

NOW_MS = 1_795_000_000_000
VERSION = "v" * 16


def event(user: str, item: int, seconds_ago: int = 60) -> RawRecord:
    """An event of ``user`` (partition and offset filled in by :func:`stream`)."""
    value = orjson.dumps({"event_id": f"{user}-{item}", "user_id": user, "item_id": item, "action": "click",
                          "event_time_ms": NOW_MS - seconds_ago * 1000,
                          "context": {"category": item % 7, "modality": "video"}})
    return RawRecord(0, 0, user.encode(), value)


def delete(user: str) -> RawRecord:
    key, value, headers = delete_request(user)
    return RawRecord(0, 0, key, value, tuple(headers))


def stream(*items: RawRecord, partition: int = 0, start: int = 0) -> list[RawRecord]:
    return [RawRecord(partition, start + i, r.key, r.value, r.headers) for i, r in enumerate(items)]


def make(path, **options) -> BatchProcessor:
    model = VQLModel(ModelConfig(item_buckets=256, category_buckets=16))
    return BatchProcessor(model, VERSION, path, "behaviors", EventPolicy(), clock_ms=lambda: NOW_MS, **options)


@pytest.fixture
def processor(tmp_path):
    proc = make(tmp_path)
    yield proc
    proc.close()


def stored(proc: BatchProcessor, users: list[str], partition: int = 0) -> dict[str, tuple[int, int]]:
    """(event_count, applied_offset) of the users the partition's store holds a state of."""
    return {s.user_id: (s.event_count, s.applied_offset) for s in proc.store(partition).states()
            if s.user_id in users}


def run(proc: BatchProcessor, records: list[RawRecord]):
    result = proc.process(records)
    proc.commit(result)
    return result


# -- control messages ------------------------------------------------------------------------

def test_a_delete_request_round_trips_and_malformed_ones_are_rejected_with_a_reason():
    key, value, headers = delete_request("ü-1")
    assert decode_control(key, value, headers) == DeleteUser("ü-1")
    control = [(CONTROL_HEADER, b"delete-user")]
    bad = [
        (b"a", b'{"user_id": "a"}', [(CONTROL_HEADER, b"truncate-topic")]),  # unknown kind
        (b"a", None, control),
        (b"a", b"{oops", control),
        (b"a", b'["a"]', control),
        (b"a", b'{"user_id": ""}', control),
        (b"a", b'{"user_id": "b"}', control),  # names another user than its key
        (None, b'{"user_id": "a"}', control),  # keyless: it would land on any partition
    ]
    for key, value, headers in bad:
        rejection = decode_control(key, value, headers)
        assert isinstance(rejection, Rejection) and rejection.reason is Reason.INVALID_CONTROL, (key, value)
    assert deleted_offset(tombstone_headers(42, VERSION)) == 42 and deleted_offset([]) is None


def test_a_malformed_control_message_is_dead_lettered_and_deletes_nothing(processor):
    run(processor, stream(event("a", 1)))
    bad = RawRecord(0, 1, b"a", b'{"user_id": "b"}', ((CONTROL_HEADER, b"delete-user"),))
    result = run(processor, [bad])
    assert [d.rejection.reason for d in result.dead_letters] == [Reason.INVALID_CONTROL]
    assert result.deletions == {} and processor.cache(0).load(["a"]).event_count.tolist() == [1]


# -- the processor ---------------------------------------------------------------------------

def test_a_delete_applies_in_input_order_within_a_batch(processor):
    records = stream(event("a", 1), event("b", 1), event("a", 2), delete("a"), event("a", 3), delete("c"))
    result = run(processor, records)
    assert result.deletions == {0: {"a": 3, "c": 5}} and result.deleted_count == 2
    # a's state is re-created from the event after the request only; c never had one
    assert {s.user_id: (s.event_count, s.applied_offset) for s in result.states} == {"a": (1, 4), "b": (1, 1)}
    processor.flush()
    assert stored(processor, ["a", "b", "c"]) == {"a": (1, 4), "b": (1, 1)}
    assert processor.store(0).deletion_marker("a") == 3 and processor.store(0).deletion_marker("c") == 5


def test_a_deleted_user_leaves_the_store_the_cache_and_its_event_ids(processor):
    run(processor, stream(event("a", 1), event("a", 2)))
    processor.flush()
    assert stored(processor, ["a"]) == {"a": (2, 1)}
    result = run(processor, stream(delete("a"), start=2))
    assert result.states == [] and result.deletions == {0: {"a": 2}}
    assert processor.cache(0).load(["a"]).event_count.tolist() == [0]
    processor.flush()
    assert stored(processor, ["a"]) == {} and processor.store(0).load_event_ids(["a"])[0].size == 0
    # the same event id after the delete is a new event, not a repeat of a forgotten one
    again = run(processor, stream(event("a", 1), start=3))
    assert again.dead_letters == [] and again.applied == 1


def test_a_redelivery_of_events_before_a_delete_does_not_resurrect_the_user(processor, tmp_path):
    records = stream(event("a", 1), event("a", 2), delete("a"), event("b", 1))
    run(processor, records)
    processor.flush()
    # a rewind (offsets reset, or a commit lost before a crash): skipped whole
    assert run(processor, records[:2]).applied == 0
    processor.flush()
    assert stored(processor, ["a"]) == {}
    # a new owner restored from the changelog (the tombstone's marker, no processed offset)
    elsewhere = make(tmp_path / "elsewhere")
    elsewhere.store(0).write(None, None, deletions={"a": 2})
    result = run(elsewhere, records + stream(event("a", 9), start=4))
    assert {s.user_id: (s.event_count, s.applied_offset) for s in result.states} == {"a": (1, 4), "b": (1, 3)}
    assert result.duplicates == 2 and not result.dead_letters
    elsewhere.close()


def test_a_deleted_user_evicted_before_the_flush_is_not_read_back(tmp_path):
    proc = make(tmp_path, cache_bytes=0)  # nothing stays cached after a flush
    run(proc, stream(event("a", 1), event("a", 2)))
    proc.flush()
    run(proc, stream(delete("a"), start=2))
    # many other users: the cache makes room, but not by dropping the pending delete
    run(proc, stream(*(event(f"u{i}", i) for i in range(50)), start=3))
    result = run(proc, stream(event("a", 3), start=53))
    assert [(s.event_count, s.applied_offset) for s in result.states] == [(1, 53)]
    proc.flush()
    assert stored(proc, ["a"]) == {"a": (1, 53)} and proc.store(0).deletion_marker("a") == 2
    proc.close()


def test_a_replay_flush_yields_the_tombstones_before_the_states(processor):
    run(processor, stream(event("a", 1), delete("a"), event("b", 1), event("a", 2)))
    pending = list(processor.unpublished(100))
    assert pending[0].deletions == {0: {"a": 1}} and pending[0].model_version == VERSION
    assert sorted(s.user_id for r in pending[1:] for s in r.states) == ["a", "b"]


# -- the rule, whatever the batching ---------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["event", "event", "event", "delete"]), st.sampled_from("abc"),
                         st.integers(0, 4)), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, cuts=st.sets(st.integers(1, 29)), flushes=st.sets(st.integers(1, 29)),
       rewind=st.integers(0, 29))
def test_any_interleaving_of_events_and_deletes_equals_the_offline_rule(tmp_path_factory, ops, cuts, flushes,
                                                                      rewind):
    """However the stream is cut into batches, flushed, and partly redelivered after the
    end (a rewind), each user's state is the fold of exactly its events after its last
    delete request (ids repeated since that request dead-lettered), and a user whose last
    word was a delete has no state and a marker: the verifier's rule (tests/harness.py)."""
    records = stream(*(event(u, i, seconds_ago=100 - n) if kind == "event" else delete(u)
                       for n, (kind, u, i) in enumerate(ops)))
    proc = make(tmp_path_factory.mktemp("live"))
    bounds = [0, *sorted(c for c in cuts if c < len(records)), len(records)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        run(proc, records[lo:hi])
        if hi in flushes:
            proc.flush()
    run(proc, records[min(rewind, len(records) - 1):])  # a redelivery of the tail
    proc.flush()

    from tests.harness import surviving_events

    kept = surviving_events([(0, r.offset, r.key, r.value, r.headers) for r in records])
    offline = make(tmp_path_factory.mktemp("offline"))
    run(offline, [r for r in records if (0, r.offset) in kept])
    offline.flush()
    users = ["a", "b", "c"]
    live, want = stored(proc, users), stored(offline, users)
    assert live == want
    deleted_last = {u: n for n, (kind, u, _i) in enumerate(ops) if kind == "delete"}
    for user in users:
        last_delete = deleted_last.get(user)
        assert proc.store(0).deletion_marker(user) == last_delete
    proc.close()
    offline.close()


# -- tombstones in the changelog -------------------------------------------------------------

def test_only_bare_tombstones_not_yet_answered_become_requests():
    worker = tombstone_headers(7, VERSION)
    records = [(b"a", None, []), (b"b", None, []), (b"b", None, worker), (b"c", b"state", []),
               (None, None, []), (b"d", None, worker), (b"d", None, [])]
    assert bare_tombstones(records) == ["a", "d"]


def test_store_markers_give_deleted_users_the_request_offset(tmp_path):
    proc = make(tmp_path)
    store = proc.store(0)
    store.write(None, None, deletions={"a": 11, "b": None})
    cfg = proc.model.config
    batch = store.load(["a", "b"], (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim))
    assert batch.applied_offset.tolist() == [11, -1] and batch.event_count.tolist() == [0, 0]
    assert full_state_bytes(cfg.groups, cfg.codes, cfg.rates, cfg.group_dim, 0, np.float64) > 0
    proc.close()


def test_the_watch_reads_only_ranges_someone_else_wrote():
    from vql.streams.deletion import TombstoneWatch

    watch = TombstoneWatch("unused", "states", "behaviors")
    watch.assigned(0, 10)
    watch.wrote(0, 10, 5)
    watch.wrote(0, 15, 1)
    assert not watch._foreign(0, 10, 16)  # all the worker's own
    assert watch._foreign(0, 10, 17)  # one record more: an operator's, a zombie's
    assert watch._foreign(0, 8, 16)  # the two before the worker's
    watch.assigned(1, None)
    assert not watch._foreign(1, None, 0) and watch._foreign(1, None, 3)
