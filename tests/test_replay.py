"""Replay without a broker: the bulk state builder equals the worker's state math, and the
columnar file replay is order-free, resumable, and reports bad input and bad files clearly."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import compare
from vql.bench.replay import demo_records, demo_table
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns
from vql.model.state import apply_events, empty_state, merge_states
from vql.schemas.arrow import FileSchemaError
from vql.streams.cli import main
from vql.streams.processor import BatchProcessor, RawRecord
from vql.streams.replay import arrow_system_pool
from vql.streams.replay_files import encode_distinct, run_replay_files
from vql.streams.settings import Settings
from vql.streams.state_store import PartitionStore, partition_store_path

SHAPE_CONFIG = ModelConfig()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.npz"
    version = VQLModel(SHAPE_CONFIG).save(path)
    model, _ = VQLModel.load(path)
    return path, model, version


@pytest.fixture(scope="module")
def records():
    return demo_records(4000, seed=3)


@pytest.fixture(scope="module")
def events_table(records):
    return demo_table(records)


def stored(settings: Settings, version: str) -> dict:
    states = {}
    for p in range(settings.partitions):
        store = PartitionStore(partition_store_path(settings.data_dir, version, settings.behaviors_topic, p), version)
        states.update({s.user_id: s for s in store.states()})
        store.close()
    return states


def replay(table: pa.Table, tmp_path, name: str, model_file, **options):
    path, model, version = model_file
    file = tmp_path / f"{name}.parquet"
    pq.write_table(table, file)
    settings = Settings(data_dir=tmp_path / name, model_path=path, partitions=3)
    report = run_replay_files([file], settings, model, version, progress=False, **options)
    return settings, report, stored(settings, version)


def test_folding_in_chunks_or_merging_halves_equals_folding_at_once():
    """Replay folds a few thousand users at a time and resumes onto stored states: chunked
    application, and merging the states of two halves, must equal one application, also
    over ~10 years of events (old events meet the 1-day decay)."""
    rng = np.random.default_rng(0)
    cfg = SHAPE_CONFIG
    shape, decay = (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim), np.asarray(cfg.decay_rates)
    n, users = 3000, [f"u{i}" for i in range(40)]
    owner = rng.integers(0, len(users), n)
    codes = rng.integers(0, cfg.codes, (n, cfg.groups))
    values = rng.standard_normal((n, cfg.groups, cfg.group_dim))
    times = 1.7e9 + rng.uniform(0, 3e8, n)
    offsets = np.arange(n)
    half = n // 2

    def fold(states, rows):
        apply_events(states, owner[rows], codes[rows], values[rows], times[rows], decay, offsets[rows])
        return states

    reference = fold([empty_state(u, "v", shape) for u in users], slice(None))
    chunked = fold(fold([empty_state(u, "v", shape) for u in users], slice(None, half)), slice(half, None))
    first = fold([empty_state(u, "v", shape) for u in users], slice(None, half))
    rest = fold([empty_state(u, "v", shape) for u in users], slice(half, None))
    for want, got, a, b in zip(reference, chunked, first, rest):
        merged = merge_states(a, b, decay)
        for state in (got, merged):
            assert state.event_count == want.event_count and state.applied_offset == want.applied_offset
            assert state.landmark_t0 == want.landmark_t0
            assert np.array_equal(np.isfinite(state.log_count), np.isfinite(want.log_count))
            filled = np.isfinite(want.log_count)
            np.testing.assert_allclose(state.log_count[filled], want.log_count[filled], atol=1e-9)
            np.testing.assert_allclose(state.mean, want.mean, atol=1e-9)


def test_encoding_distinct_rows_equals_encoding_every_row(model_file, events_table):
    _path, model, _version = model_file
    columns = BehaviorColumns.from_table(events_table)
    codes, values, encoded_as = encode_distinct(model, columns)
    want_codes, want_values = model.encode(columns)
    assert len(codes) < columns.item.size  # the fixture repeats items
    assert np.array_equal(codes[encoded_as], want_codes)
    np.testing.assert_allclose(values[encoded_as], want_values, atol=1e-6)


def test_shuffled_files_give_the_same_states(model_file, events_table, tmp_path):
    _s, report, states = replay(events_table, tmp_path, "ordered", model_file)
    shuffled = events_table.take(np.random.default_rng(1).permutation(events_table.num_rows))
    _s, _r, again = replay(shuffled, tmp_path, "shuffled", model_file)
    assert report.events_read == events_table.num_rows and report.applied == events_table.num_rows
    settings = Settings(model_path=model_file[0])
    result = compare(settings, again, states)
    assert result.ok and result.users_compared == len(states) > 50, result.summary()


def test_file_replay_equals_the_worker_processor(model_file, records, events_table, tmp_path):
    """The columnar path against the worker's BatchProcessor over the same records."""
    path, model, version = model_file
    _s, _r, states = replay(events_table.append_column("partition", pa.array(np.zeros(events_table.num_rows, np.int32)))
                            .append_column("offset", pa.array(np.arange(events_table.num_rows))),
                            tmp_path, "files", model_file)
    processor = BatchProcessor(model, version, tmp_path / "worker", "behaviors", Settings().event_policy())
    raw = [RawRecord(0, i, key, value) for i, (key, value) in enumerate(records)]
    for lo in range(0, len(raw), 1000):
        processor.commit(processor.process(raw[lo:lo + 1000]))
    processor.flush()
    worker = {s.user_id: s for s in processor.store(0).states()}
    processor.close()
    result = compare(Settings(model_path=path), states, worker)
    assert result.ok and result.users_compared == len(worker), result.summary()
    assert all(states[u].applied_offset == s.applied_offset for u, s in worker.items())


def test_jobs_in_forked_processes_give_the_states_of_one_process(model_file, events_table, tmp_path):
    """`vql replay --files --jobs 2` in a fresh process (this one has opened RocksDB stores,
    so it would not fork) against one process."""
    path, _model, version = model_file
    _s, _r, single = replay(events_table, tmp_path, "single", model_file, jobs=1)
    file = tmp_path / "single.parquet"
    out = subprocess.run([sys.executable, "-m", "vql.streams.cli", "replay", "--files", str(file), "--model", str(path),
                          "--data-dir", str(tmp_path / "jobs"), "--partitions", "3", "--jobs", "2", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ", 2 jobs)" in out.stdout and f"applied {events_table.num_rows:,}" in out.stdout
    forked = stored(Settings(data_dir=tmp_path / "jobs", partitions=3), version)
    result = compare(Settings(model_path=path), forked, single)
    assert result.ok and result.users_compared == len(single) > 50, result.summary()


def test_a_process_with_rocksdb_open_replays_in_one_job_and_says_so(model_file, events_table, tmp_path, caplog):
    PartitionStore(tmp_path / "opened", model_file[2]).close()  # RocksDB's threads now run here
    with caplog.at_level(logging.WARNING, logger="vql.streams.jobs"):
        _s, report, states = replay(events_table, tmp_path, "fallback", model_file, jobs=2)
    assert report.jobs == 1 and report.applied == events_table.num_rows
    assert "replaying in one process, not 2" in caplog.text


def test_an_interrupted_file_replay_resumes_to_the_same_states(model_file, events_table, tmp_path, monkeypatch):
    _s, _r, whole = replay(events_table, tmp_path, "whole", model_file)
    commit, calls = BatchProcessor.commit, []

    def crash_on_second(self, result, changelog_offsets=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        commit(self, result, changelog_offsets)

    monkeypatch.setattr(BatchProcessor, "commit", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replay(events_table, tmp_path, "resumed", model_file)
    monkeypatch.setattr(BatchProcessor, "commit", commit)
    _s, report, resumed = replay(events_table, tmp_path, "resumed", model_file)
    assert report.skipped > 0  # the first partition's events were not applied twice
    result = compare(Settings(model_path=model_file[0]), resumed, whole)
    assert result.ok and result.users_compared == len(whole), result.summary()


def test_bad_events_are_counted_by_reason_not_dropped_silently(model_file, events_table, tmp_path):
    now_ms = int(time.time() * 1000)
    user, event_id = events_table.column("user_id")[5].as_py(), events_table.column("event_id")[5].as_py()
    rows = [  # item id < 0; unknown action (and far ahead); empty user id; a repeated event id
        ("x1", "user-bad", -4, "click", now_ms), ("x2", "user-bad", 1, "teleport", now_ms + 86_400_000),
        ("x3", "", 1, "click", now_ms), (event_id, user, 1, "click", now_ms - 1000)]
    bad = pa.Table.from_pylist([
        {"event_id": e, "user_id": u, "item_id": i, "action": a, "event_time_ms": t,
         "context": {"category": 1, "modality": "video", "extra": None}} for e, u, i, a, t in rows],
        schema=events_table.schema)
    table = pa.concat_tables([events_table, bad])
    _s, report, states = replay(table, tmp_path, "bad", model_file)
    assert report.dead_letters == {"schema_violation": 3, "duplicate_event_id": 1}
    assert report.applied == events_table.num_rows
    assert "user-bad" not in states


def test_a_file_without_the_contract_is_one_readable_line(model_file, tmp_path, capsys):
    path, _model, _version = model_file
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"user_id": ["u"], "event_id": ["e"], "item_id": ["seven"], "action": ["click"],
                             "event_time_ms": [1], "context": [{"category": 1, "modality": "video"}]}), wrong)
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"user_id": ["u"]}), missing)
    for file, message in ((wrong, "column item_id is string"), (missing, "missing column(s) event_id")):
        assert main(["replay", "--files", str(file), "--model", str(path), "--data-dir", str(tmp_path),
                     "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("vql replay: ") and message in err and err.count("\n") == 1
    with pytest.raises(FileSchemaError):
        run_replay_files([missing], Settings(data_dir=tmp_path), *model_file[1:], progress=False)


def test_a_wrong_model_file_is_one_readable_line(tmp_path, capsys):
    bogus = tmp_path / "model.npz"
    bogus.write_bytes(b"not a model")
    assert main(["replay", "--files", str(bogus), "--model", str(bogus), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vql replay: ") and err.count("\n") == 1


def test_a_replay_allocates_arrow_memory_with_malloc_unless_the_environment_chooses(monkeypatch):
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    before = pa.default_memory_pool().backend_name
    with arrow_system_pool():
        assert pa.default_memory_pool().backend_name == "system"
        assert pa.array(np.arange(1000)).sum().as_py() == 499500
    assert pa.default_memory_pool().backend_name == before
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", before)
    with arrow_system_pool():
        assert pa.default_memory_pool().backend_name == before
