"""Deleting users against the real broker: `vql delete-user` while events flow, then a full
redelivery into a store restored elsewhere, and a bare tombstone written by an operator.

What must hold (docs/operations.md, 'Deleting a user'): the user's state is gone from the
worker's store, the states topic (a tombstone), a restored store and a serving view; older
events redelivered after the delete never bring it back; events after the delete start a
new history; and the offline verifier, which applies the same rule, agrees on every user.
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from harness import Pipeline, compare, recompute
from test_pipeline_integration import free_port, http_get, produce, rewind_group
from vql.model.artifact import load_artifact
from vql.schemas.control import deleted_offset, is_control
from vql.serving.follower import StateFollower
from vql.serving.store import StateStore
from vql.streams.cli import main
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.export import export_events, export_states
from vql.streams.state_store import PartitionStore, partition_store_path
from vql.streams.topics import producer, read_topic

pytestmark = pytest.mark.integration


def records_of(records, user: str) -> list[int]:
    return [i for i, (key, _value) in enumerate(records) if key == user.encode()]


def stores(pipeline: Pipeline, data_dir=None) -> list[PartitionStore]:
    settings = pipeline.settings
    version = load_artifact(settings.model_path).version
    return [PartitionStore(partition_store_path(data_dir or settings.data_dir, version, settings.behaviors_topic, p),
                           version) for p in range(settings.partitions)]


def stored_users(pipeline: Pipeline, data_dir=None) -> tuple[set[str], dict[str, int]]:
    """The users with a state in the stores, and the deletion markers of ``users``."""
    users, markers = set(), {}
    for store in stores(pipeline, data_dir):
        users |= {state.user_id for state in store.states()}
        markers.update(store.deletion_markers())
        store.close()
    return users, markers


def verify(pipeline: Pipeline, gone: set[str], reborn: dict[str, int], label: str) -> None:
    """Published states equal the offline rule's; ``gone`` users have none, ``reborn`` ones
    (user -> events sent in all) only the events after their delete request."""
    settings = pipeline.settings
    expected = recompute(settings)
    published = pipeline.published()
    result = compare(settings, published, expected.states)
    print(f"{label}:", result.summary())
    assert result.ok, result.summary()
    assert not gone & set(published) and set(reborn) <= set(published)
    for user, sent in reborn.items():
        assert 0 < published[user].event_count < sent


def test_delete_user_while_events_flow_survives_redelivery_and_restore(kafka_bootstrap, tmp_path, monkeypatch):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    settings = pipeline.settings
    records = list(generate(DemoSpec(users=200, mean_events=20, heavy_users=1, heavy_events=1500, seed=5),
                            int(time.time() * 1000)))
    first, second = records[: len(records) // 2], records[len(records) // 2:]
    users = sorted({key.decode() for key, _value in records})
    # gone: every event before the request; reborn: events on both sides of it
    gone = {u for u in users if not records_of(second, u) and records_of(first, u)}
    reborn = {u for u in users if records_of(first, u) and len(records_of(second, u)) >= 2}
    gone = set(sorted(gone)[:3])
    reborn = {u: len(records_of(records, u)) for u in sorted(reborn)[:2]}
    assert len(gone) == 3 and len(reborn) == 2
    port = free_port()
    try:
        pipeline.start_worker(web_port=port)
        total = produce(pipeline, first[: len(first) // 2])
        pipeline.wait_until_committed(1)  # the worker consumes while the rest arrives
        total += produce(pipeline, first[len(first) // 2:])
        monkeypatch.setenv("VQL_KAFKA_BOOTSTRAP", kafka_bootstrap)
        monkeypatch.setenv("VQL_BEHAVIORS_TOPIC", settings.behaviors_topic)
        assert main(["delete-user", *sorted(gone | set(reborn))]) == 0
        total += len(gone) + len(reborn)
        total += produce(pipeline, second)
        pipeline.wait_until_committed(total)
        verify(pipeline, gone, reborn, "live")
        status, metrics = http_get(port, "/metrics")
        assert status == 200 and b"vql_users_deleted_total 5.0" in metrics

        # The states topic says so with the worker's tombstones.
        tombstones = {key.decode(): headers for _p, _o, key, value, headers in
                      read_topic(kafka_bootstrap, settings.states_topic) if value is None}
        assert set(tombstones) == gone | set(reborn)
        assert all(deleted_offset(headers) is not None for headers in tombstones.values())

        # Exports honour the deletions: no state, and no event before the request.
        events_file, states_file = tmp_path / "events.parquet", tmp_path / "states.parquet"
        export_events(kafka_bootstrap, settings.behaviors_topic, events_file, settings.event_policy(), progress=False)
        export_states(kafka_bootstrap, settings.states_topic, states_file)
        exported = pq.read_table(events_file).to_pylist()
        requests = {key.decode(): offset for _p, offset, key, _v, headers in
                    read_topic(kafka_bootstrap, settings.behaviors_topic) if is_control(headers)}
        assert not any(row["user_id"] in gone for row in exported)
        for user in reborn:
            offsets = [row["offset"] for row in exported if row["user_id"] == user]
            assert offsets and min(offsets) > requests[user]
        assert not gone & set(pq.read_table(states_file).column("user_id").to_pylist())

        # A serving view drops them.
        view = StateStore(tmp_path / "view", settings.states_topic)
        follower = StateFollower(kafka_bootstrap, view)
        assert follower.catch_up(60)
        assert all(view.get(u) is None for u in gone) and all(view.get(u) is not None for u in reborn)
        follower.stop()
        view.close()
        pipeline.stop_all()
        in_store, markers = stored_users(pipeline)
        assert not gone & in_store and set(reborn) <= in_store and set(markers) == gone | set(reborn)

        # Every record again, to a worker on another host: its store is restored from the
        # changelog (tombstones leave markers), then the old events come again, and none of
        # them may bring a deleted user back.
        rewind_group(pipeline)
        pipeline.start_worker(host="second")
        pipeline.wait_until_committed(total)
        verify(pipeline, gone, reborn, "after a full redelivery to a restored store")
        pipeline.stop_all()
        in_store, markers = stored_users(pipeline, settings.data_dir / "hosts" / "second")
        assert not gone & in_store and set(reborn) <= in_store and set(markers) == gone | set(reborn)
    finally:
        pipeline.stop_all()


def test_a_bare_tombstone_deletes_the_user_in_the_owners_store(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    settings = pipeline.settings
    records = list(generate(DemoSpec(users=60, mean_events=10, heavy_users=0, seed=8), int(time.time() * 1000)))
    try:
        pipeline.start_worker(tombstone_check_interval_s=1.0)
        total = produce(pipeline, records)
        pipeline.wait_until_committed(total)
        time.sleep(3)  # checks while only the worker writes the states topic read nothing back
        log = settings.data_dir / "worker-0.log"
        assert "tombstone check: read" not in log.read_text()
        partition_of = {key.decode(): p for p, _o, key, value, _h in read_topic(kafka_bootstrap, settings.states_topic)
                        if value is not None}
        victim = sorted(partition_of)[0]
        operator = producer(kafka_bootstrap)  # what an operator does by hand: a null value, no headers
        operator.send(settings.states_topic, key=victim.encode(), value=None, partition=partition_of[victim])
        operator.flush()
        operator.close()
        # The owner answers with a delete request on the user's partition, and applies it.
        pipeline.wait_until_committed(total + 1, timeout_s=120)
        requests = [(p, key) for p, _o, key, _v, headers in read_topic(kafka_bootstrap, settings.behaviors_topic)
                    if is_control(headers)]
        assert requests == [(partition_of[victim], victim.encode())]
        # Its next event starts a new history, not the old one.
        later = [(k, v) for k, v in generate(DemoSpec(users=60, mean_events=10, heavy_users=0, seed=9),
                                             int(time.time() * 1000)) if k == victim.encode()][:1]
        assert later
        assert "tombstone check: read 1 partition ranges" in log.read_text()
        total += 1 + produce(pipeline, later)
        pipeline.wait_until_committed(total)
        verify(pipeline, set(), {victim: len(records_of(records, victim)) + 1}, "bare tombstone")
        assert pipeline.published()[victim].event_count == 1
        pipeline.stop_all()
        in_store, markers = stored_users(pipeline)
        assert victim in markers
    finally:
        pipeline.stop_all()
