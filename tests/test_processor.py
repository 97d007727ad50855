"""The batch processor without Kafka: dead letters, duplicates, stores and model stamps."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.schemas.decode import EventPolicy, Reason
from vql.streams.processor import BatchProcessor, RawRecord
from vql.schemas.user_state import StateBatch
from vql.streams.state_store import ENCODE_ROWS, PartitionStore, StoreError, partition_store_path

NOW_MS = 1_795_000_000_000


def event(user: str, item: int, minutes_ago: int) -> bytes:
    return orjson.dumps({"event_id": f"{user}-{item}-{minutes_ago}", "user_id": user, "item_id": item,
                         "action": "click", "event_time_ms": NOW_MS - minutes_ago * 60_000,
                         "context": {"category": item % 7, "modality": "video"}})


@pytest.fixture
def processor(tmp_path):
    model = VQLModel(ModelConfig(item_buckets=256, category_buckets=16))
    proc = BatchProcessor(model, "v" * 16, tmp_path, "behaviors", EventPolicy(), clock_ms=lambda: NOW_MS)
    yield proc
    proc.close()


def stored(processor: BatchProcessor, partition: int, users: list[str]):
    """The partition store's states of ``users`` (an empty state for a user it never saw)."""
    cfg = processor.model.config
    return processor.store(partition).load(users, (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim))


def records(partition: int, start: int, values: list[tuple[bytes | None, bytes | None]]) -> list[RawRecord]:
    return [RawRecord(partition, start + i, key, value) for i, (key, value) in enumerate(values)]


def test_bad_records_become_dead_letters_and_good_ones_apply(processor):
    batch = records(0, 0, [(b"a", event("a", 1, 5)), (b"a", b"{oops"), (b"b", event("b", 2, 1)),
                           (b"a", event("b", 3, 1)), (b"a", event("a", 4, 60))])
    result = processor.process(batch)
    assert [d.rejection.reason for d in result.dead_letters] == [Reason.NOT_JSON, Reason.KEY_MISMATCH]
    assert [d.record.offset for d in result.dead_letters] == [1, 3]
    assert result.applied == 3 and {s.user_id: s.event_count for s in result.states} == {"a": 2, "b": 1}


def test_nothing_changes_until_commit_and_nothing_is_durable_until_flush(processor):
    processor.process(records(0, 0, [(b"a", event("a", 1, 5))]))
    assert processor.cache(0).load(["a"]).event_count.tolist() == [0]
    assert processor.cache(0).processed_offset() is None
    result = processor.process(records(0, 0, [(b"a", event("a", 1, 5))]))
    processor.commit(result)
    assert processor.cache(0).load(["a"]).event_count.tolist() == [1] and processor.cache(0).processed_offset() == 0
    assert stored(processor, 0, ["a"]).event_count.tolist() == [0] and processor.store(0).processed_offset() is None
    assert processor.flush() == {0: 0}
    [state] = stored(processor, 0, ["a"]).states()
    assert state.event_count == 1 and state.applied_offset == 0
    assert processor.store(0).processed_offset() == 0


def test_a_redelivered_batch_is_skipped(processor):
    batch = records(2, 10, [(b"a", event("a", i, i)) for i in range(20)])
    processor.commit(processor.process(batch))
    again = processor.process(batch[5:] + records(2, 30, [(b"a", event("a", 99, 0))]))
    assert again.duplicates == 15 and again.applied == 1
    assert again.states[0].event_count == 21 and again.states[0].applied_offset == 30


def test_partitions_have_separate_stores(processor):
    processor.commit(processor.process(records(0, 0, [(b"a", event("a", 1, 1))]) +
                                       records(1, 0, [(b"b", event("b", 1, 1))])))
    processor.flush()
    assert stored(processor, 0, ["a", "b"]).event_count.tolist() == [1, 0]
    assert stored(processor, 1, ["b"]).event_count.tolist() == [1]


def test_a_store_of_another_model_is_refused(tmp_path):
    path = partition_store_path(tmp_path, "a" * 16, "behaviors", 0)
    PartitionStore(path, "a" * 16).close()
    with pytest.raises(StoreError, match="built with model"):
        PartitionStore(path, "b" * 16)


def test_a_write_of_chosen_rows_stores_exactly_those_states_across_encode_chunks(tmp_path):
    shape = (2, 4, 3, 5)
    count = 2 * ENCODE_ROWS + 7
    batch = StateBatch.empty([f"user-{i}" for i in range(count)], "a" * 16, shape)
    rng = np.random.default_rng(0)
    batch.log_count[:] = rng.normal(size=batch.log_count.shape)
    batch.mean[:] = rng.normal(size=batch.mean.shape)
    batch.event_count[:] = np.arange(count) + 1
    batch.applied_offset[:] = np.arange(count)
    rows = np.flatnonzero(np.arange(count) % 3 != 1)  # more rows than two chunks, not all
    store = PartitionStore(tmp_path / "db", "a" * 16)
    store.write(batch, 41, rows=rows)
    stored = {state.user_id: state for state in store.states()}
    assert sorted(stored) == sorted(batch.user_ids[i] for i in rows) and store.processed_offset() == 41
    for row in rows.tolist():
        state, want = stored[batch.user_ids[row]], batch.state(row)
        assert (state.event_count, state.applied_offset) == (want.event_count, want.applied_offset)
        np.testing.assert_array_equal(state.log_count, want.log_count)
        np.testing.assert_array_equal(state.mean, want.mean)
    store.close()


def test_a_foreign_rocksdb_is_refused(tmp_path):
    from rocksdict import Options, Rdict

    options = Options(raw_mode=True)
    options.create_if_missing(True)
    foreign = Rdict(str(tmp_path / "db"), options)
    foreign[b"someone"] = b"else"
    foreign.close()
    with pytest.raises(StoreError, match="not a vql-stream store"):
        PartitionStore(tmp_path / "db", "a" * 16)


def test_a_rewound_batch_neither_moves_the_offset_back_nor_dead_letters_again(processor):
    batch = records(0, 0, [(b"a", event("a", 1, 1)), (b"a", b"bad"), (b"a", event("a", 2, 1))])
    processor.commit(processor.process(batch))
    rewound = processor.process(batch[:2])
    processor.commit(rewound)
    assert rewound.duplicates == 2 and not rewound.dead_letters
    assert processor.flush() == {0: 2} and processor.store(0).processed_offset() == 2
    assert processor.process(batch).duplicates == 3


def test_a_repeated_event_id_is_dead_lettered_but_a_redelivery_is_not(processor, tmp_path):
    first = records(0, 0, [(b"a", event("a", 1, 5)), (b"a", event("a", 2, 4)), (b"a", event("a", 1, 5))])
    result = processor.process(first)
    assert [(d.record.offset, d.rejection.reason) for d in result.dead_letters] == [(2, Reason.DUPLICATE_EVENT_ID)]
    assert result.applied == 2
    processor.commit(result)
    processor.flush()
    # the same id again in a later batch, and another user sending the same id string
    later = processor.process(records(0, 3, [(b"a", event("a", 2, 4)), (b"b", event("a", 2, 4).replace(b'"user_id":"a"', b'"user_id":"b"'))]))
    assert [(d.record.offset, d.rejection.reason) for d in later.dead_letters] == [(3, Reason.DUPLICATE_EVENT_ID)]
    assert later.applied == 1
    # a redelivery to a store restored from the changelog (states and ids, no processed
    # offset) is a no-op, not a duplicate id
    elsewhere = BatchProcessor(processor.model, "v" * 16, tmp_path / "elsewhere", "behaviors", EventPolicy(),
                               clock_ms=lambda: NOW_MS)
    elsewhere.store(0).write(stored(processor, 0, ["a"]), None,
                             event_ids={"a": processor.store(0).load_event_ids(["a"])[0]})
    assert elsewhere.store(0).processed_offset() is None
    again = elsewhere.process(first[:2])
    assert again.dead_letters == [] and again.applied == 0 and again.duplicates == 2
    elsewhere.close()


def test_the_id_window_is_bounded(tmp_path):
    model = VQLModel(ModelConfig(item_buckets=256, category_buckets=16))
    proc = BatchProcessor(model, "v" * 16, tmp_path, "behaviors", EventPolicy(), clock_ms=lambda: NOW_MS,
                          event_id_window=4)
    proc.commit(proc.process(records(0, 0, [(b"a", event("a", i, 10 + i)) for i in range(6)])))
    proc.flush()
    assert len(proc.store(0).load_event_ids(["a"])[0]) == 4
    # ids 0 and 1 fell out of the window: accepted again; id 5 is still in it
    result = proc.process(records(0, 6, [(b"a", event("a", 0, 10)), (b"a", event("a", 5, 15))]))
    assert [d.record.offset for d in result.dead_letters] == [7]
    proc.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sends=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 5)), min_size=1, max_size=40),
       cuts=st.sets(st.integers(1, 39)), window=st.integers(1, 4))
def test_repeated_ids_match_a_per_user_window_of_accepted_ids(tmp_path_factory, sends, cuts, window):
    """Whatever the batching, an event is a repeat exactly when its id is among the last
    ``window`` ids its user had accepted before the batch, or accepted earlier in the batch
    (a batch never forgets its own ids): the reference is a plain per-user list."""
    model = VQLModel(ModelConfig(item_buckets=256, category_buckets=16))
    proc = BatchProcessor(model, "v" * 16, tmp_path_factory.mktemp("ids"), "behaviors", EventPolicy(),
                          clock_ms=lambda: NOW_MS, event_id_window=window)
    values = [orjson.dumps({"event_id": f"id-{i}", "user_id": u, "item_id": i, "action": "click",
                            "event_time_ms": NOW_MS - n * 1000, "context": {"category": 1, "modality": "video"}})
              for n, (u, i) in enumerate(sends)]
    stream = records(0, 0, [(u.encode(), v) for (u, _i), v in zip(sends, values)])
    repeats, expected = [], []
    accepted: dict[str, list[int]] = {}
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        result = proc.process(stream[lo:hi])
        proc.commit(result)
        repeats += [d.record.offset for d in result.dead_letters]
        remembered = {user: set(ids[-window:]) for user, ids in accepted.items()}
        for offset in range(lo, hi):
            user, item = sends[offset]
            if item in remembered.setdefault(user, set()):
                expected.append(offset)
            else:
                remembered[user].add(item)
                accepted.setdefault(user, []).append(item)
    proc.close()
    assert sorted(repeats) == expected


def test_a_key_shared_across_users_is_not_a_repeat():
    """_in_windows folds (user, fingerprint) into one 64-bit key; a fingerprint of user 1
    whose key equals one of user 0's stored keys must still be judged against user 1's own
    window."""
    from vql.streams.processor import _USER_MIX, _in_windows

    mine = np.uint64(12345)
    colliding = mine + _USER_MIX  # user 0's key for this id equals user 1's key for ``mine``
    windows = [np.array([colliding, 7], np.uint64), np.array([99], np.uint64)]
    who, fingerprints = np.array([1, 1, 0]), np.array([mine, 99, 7], np.uint64)
    assert _in_windows(windows, who, fingerprints).tolist() == [False, True, True]
    assert _in_windows([np.empty(0, np.uint64)] * 2, who, fingerprints).tolist() == [False] * 3
