"""A corrupt RocksDB store (real rocksdict, its files really damaged) is reported as a
CorruptStoreError naming the directory and the recovery, wherever RocksDB notices: at open,
on a read, or at the end of an iteration, which RocksDB would otherwise end early and
silently. The integration test follows the documented recovery: delete the directory, start
the worker, and the partition is restored from the states topic."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from harness import Pipeline, compare, recompute
from vql.model.state import empty_state
from vql.schemas.user_state import StateBatch
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.state_store import CorruptStoreError, PartitionStore, StoreError
from vql.streams.topics import produce_all

VERSION = "v" * 16
SHAPE = (2, 4, 3, 4)
USERS = [f"u{i}" for i in range(2000)]


def written_store(path: Path) -> Path:
    store = PartitionStore(path, VERSION)
    states = [empty_state(user, VERSION, SHAPE) for user in USERS]
    for state in states:
        state.log_count[0, 0, 0] = 1.0
        state.event_count = 1
    store.write(StateBatch.of(states), 5, 7)
    store.close()  # flushes the memtable: the states are in an SST file
    return path


def flip(path: Path, start: int, stop: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, min(stop, len(data))):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))


def sst(path: Path) -> Path:
    return next(path.glob("*.sst"))


def manifest(path: Path) -> Path:
    return next(path.glob("MANIFEST-*"))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "current": lambda p: (p / "CURRENT").write_bytes(b"garbage\n"),
    "manifest": lambda p: flip(manifest(p), 0, 200),
    "sst_footer": lambda p: flip(sst(p), sst(p).stat().st_size - 200, sst(p).stat().st_size - 100),
}


def assert_names_the_recovery(exc: CorruptStoreError, path: Path) -> None:
    message = str(exc)
    assert isinstance(exc, StoreError) and exc.path == path
    assert str(path) in message and "delete the directory" in message and "states topic" in message


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_store_is_refused_at_open_naming_the_directory_and_the_recovery(tmp_path, how):
    path = written_store(tmp_path / "behaviors-0")
    DAMAGE[how](path)
    with pytest.raises(CorruptStoreError) as refused:
        PartitionStore(path, VERSION)
    assert_names_the_recovery(refused.value, path)


def test_a_damaged_data_block_is_reported_on_read_and_at_the_end_of_iteration(tmp_path):
    path = written_store(tmp_path / "behaviors-0")
    flip(sst(path), 1000, 3000)  # data blocks: RocksDB opens the store and fails on reading them
    store = PartitionStore(path, VERSION)
    try:
        with pytest.raises(CorruptStoreError) as on_read:
            store.load(USERS, SHAPE)
        assert_names_the_recovery(on_read.value, path)
        with pytest.raises(CorruptStoreError):
            sum(1 for _ in store.states())  # not a partial count
    finally:
        store.close()


def test_a_state_that_does_not_decode_is_corruption(tmp_path):
    path = written_store(tmp_path / "behaviors-0")
    store = PartitionStore(path, VERSION)
    try:
        store._db[b"u/u1"] = b"VQLS" + b"\x00" * 10
        with pytest.raises(CorruptStoreError):
            store.load(["u1"], SHAPE)
    finally:
        store.close()


@pytest.mark.integration
def test_the_documented_recovery_restores_a_deleted_store_from_the_states_topic(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    s = pipeline.settings
    now_ms = int(time.time() * 1000)
    first = produce_all(kafka_bootstrap, s.behaviors_topic, generate(DemoSpec(users=30, mean_events=6, heavy_users=0,
                                                                              seed=21), now_ms))
    try:
        pipeline.start_worker()
        pipeline.wait_until_committed(first)
        pipeline.stop_all()
        stores = sorted((s.data_dir / "stores").glob(f"*/{s.behaviors_topic}-*"))
        assert len(stores) == 2
        DAMAGE["current"](stores[0])
        with pytest.raises(CorruptStoreError):
            PartitionStore(stores[0], stores[0].parent.name)
        shutil.rmtree(stores[0])  # the recovery, as docs/operations.md gives it
        later = [(k, v.replace(b'"event_id":"', b'"event_id":"later-'))
                 for k, v in generate(DemoSpec(users=30, mean_events=3, heavy_users=0, seed=22), now_ms)]
        produce_all(kafka_bootstrap, s.behaviors_topic, later)
        pipeline.start_worker()
        pipeline.wait_until_committed(first + len(later))
        pipeline.stop_all()
    finally:
        pipeline.stop_all()
    result = compare(s, pipeline.published(), recompute(s).states)
    print("after deleting a corrupt store and restarting:", result.summary())
    assert result.ok and result.events_expected == first + len(later), result.summary()
    assert np.isfinite(result.max_score_diff)
