"""The worker's Prometheus metrics (design/pipeline.md, "Observability").

One registry holds these and Faust's own sensors (faust.sensors.prometheus), served at
/metrics on the worker's web port. No label carries a user or a code: cardinality stays
bounded by partitions, groups, stages and reasons.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, groups: int, codes: int) -> None:
        self.records = Counter("vql_records_total", "Input records by outcome", ["outcome"], registry=registry)
        self.dead_letters = Counter("vql_dead_letters_total", "Dead-lettered records by reason", ["reason"],
                                    registry=registry)
        self.states_published = Counter("vql_states_published_total", "User states published", registry=registry)
        self.users_deleted = Counter("vql_users_deleted_total",
                                     "Users deleted by delete requests (each a tombstone on the states topic)",
                                     registry=registry)
        self.batch_records = Histogram("vql_batch_records", "Records per micro-batch", registry=registry,
                                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 4000, 8000))
        self.stage_seconds = Histogram("vql_stage_seconds", "Time per micro-batch stage", ["stage"],
                                       registry=registry, buckets=SECONDS_BUCKETS)
        self.freshness = Histogram(
            "vql_freshness_seconds",
            "Age of a batch's oldest record (Kafka timestamp) when its states were published",
            registry=registry, buckets=SECONDS_BUCKETS)
        self.lag = Gauge("vql_consumer_lag_records",
                         "Records of an owned partition after the position this worker reached", ["partition"],
                         registry=registry)
        self.last_batch = Gauge(
            "vql_last_batch_timestamp_seconds",
            "Unix time of the last micro-batch applied from an owned partition (its assignment until the first)",
            ["partition"], registry=registry)
        self.store_keys = Gauge("vql_store_keys", "Approximate keys in a partition's store", ["partition"],
                                registry=registry)
        self.store_bytes = Gauge("vql_store_bytes", "SST and memtable bytes of a partition's store", ["partition"],
                                 registry=registry)
        self.code_entropy = Gauge("vql_code_usage_entropy_bits",
                                  "Entropy of recent code assignments per group (a codebook drift signal)",
                                  ["group"], registry=registry)
        self._code_counts = np.zeros((groups, codes))

    @property
    def partition_gauges(self) -> tuple[Gauge, ...]:
        """The series labelled by partition: only the partitions this worker owns may have them."""
        return self.lag, self.last_batch, self.store_keys, self.store_bytes

    def forget_partition(self, partition: int) -> None:
        """Remove every series of a partition this worker no longer owns, so that no stale
        value of it (its lag above all) outlives the ownership."""
        for gauge in self.partition_gauges:
            try:
                gauge.remove(str(partition))
            except KeyError:
                pass  # never set for this partition

    def observe_codes(self, counts: np.ndarray, decay: float = 0.99) -> None:
        """Fold a batch's code counts (G, K) into an EMA and publish the entropy per group."""
        self._code_counts = decay * self._code_counts + counts
        total = self._code_counts.sum(-1, keepdims=True)
        p = np.divide(self._code_counts, total, out=np.zeros_like(self._code_counts), where=total > 0)
        entropy = -(p * np.log2(np.where(p > 0, p, 1.0))).sum(-1)
        for group, value in enumerate(entropy):
            self.code_entropy.labels(group=str(group)).set(float(value))
