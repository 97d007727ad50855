"""The lag arithmetic and which partitions have series (streams/lag.py), without a broker:
every owned partition's series appear at assignment, only owned partitions get a lag, and
a revoked partition's series all disappear."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from vql.streams.lag import PartitionSeries, lag_records
from vql.streams.metrics import WorkerMetrics


def partitions_exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """For each worker metric with a partition label, the partitions it has series of."""
    found: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if "partition" in sample.labels:
                found.setdefault(sample.name, set()).add(sample.labels["partition"])
    return found


def series(clock: list[float]) -> tuple[CollectorRegistry, PartitionSeries]:
    registry = CollectorRegistry()
    return registry, PartitionSeries(WorkerMetrics(registry, groups=2, codes=4), clock=lambda: clock[0])


def test_lag_counts_the_records_from_the_position_to_the_end():
    assert lag_records(end_offset=30, next_offset=0) == 30
    assert lag_records(end_offset=30, next_offset=30) == 0
    assert lag_records(end_offset=30, next_offset=31) == 0  # a position read after the end offset


def test_owned_partitions_have_a_lag_and_a_last_batch_time_without_any_batch():
    clock = [1000.0]
    registry, owned = series(clock)
    owned.assigned([0, 1])
    owned.set_lags({0: 30, 1: 0})
    assert registry.get_sample_value("vql_consumer_lag_records", {"partition": "0"}) == 30
    assert registry.get_sample_value("vql_consumer_lag_records", {"partition": "1"}) == 0
    assert registry.get_sample_value("vql_last_batch_timestamp_seconds", {"partition": "0"}) == 1000.0
    clock[0] = 1005.0
    owned.batch_applied([1])
    assert registry.get_sample_value("vql_last_batch_timestamp_seconds", {"partition": "1"}) == 1005.0
    assert registry.get_sample_value("vql_last_batch_timestamp_seconds", {"partition": "0"}) == 1000.0


def test_a_revoked_partition_loses_every_series_and_gets_none_back():
    clock = [1000.0]
    registry, owned = series(clock)
    owned.assigned([0, 1])
    owned.set_lags({0: 30, 1: 7})
    owned.metrics.store_keys.labels(partition="1").set(5)
    owned.metrics.store_bytes.labels(partition="1").set(500)
    owned.revoked([1])
    assert partitions_exported(registry) == {"vql_consumer_lag_records": {"0"},
                                             "vql_last_batch_timestamp_seconds": {"0"}}
    owned.set_lags({0: 31, 1: 8})  # offsets read before the revoke, exported after it
    owned.batch_applied([1])  # a batch of it whose publication ended after the revoke
    assert partitions_exported(registry) == {"vql_consumer_lag_records": {"0"},
                                             "vql_last_batch_timestamp_seconds": {"0"}}
    owned.revoked([0, 1])  # a partition revoked twice, or never set: nothing to remove
    assert partitions_exported(registry) == {}


def test_a_rebalance_keeps_the_stall_clock_of_a_partition_the_worker_keeps():
    """The group revokes everything at each rebalance: a partition assigned straight back
    keeps its last-batch time (a stuck one stays stuck), one new to the worker starts now."""
    clock = [1000.0]
    registry, owned = series(clock)
    owned.assigned([0, 1])
    clock[0] = 1100.0
    owned.revoked([0, 1])
    owned.assigned([0, 2])
    assert registry.get_sample_value("vql_last_batch_timestamp_seconds", {"partition": "0"}) == 1000.0
    assert registry.get_sample_value("vql_last_batch_timestamp_seconds", {"partition": "2"}) == 1100.0
    clock[0] = 1200.0
    owned.revoked([0, 2])
    owned.assigned([])  # another worker took them all
    owned.assigned([1])  # and one came back later: new to this worker again
    assert partitions_exported(registry) == {"vql_last_batch_timestamp_seconds": {"1"}}
    assert registry.get_sample_value("vql_last_batch_timestamp_seconds", {"partition": "1"}) == 1200.0
