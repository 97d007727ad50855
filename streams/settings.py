"""Typed settings of the worker and the tools, read from the environment (prefix VQL_).

Every default runs against the local broker of deploy/kafka/broker.sh. docs/configuration.md
lists them; `vql worker --help` names the most used.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from vql.schemas.decode import EventPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VQL_", extra="ignore")

    kafka_bootstrap: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("VQL_KAFKA_BOOTSTRAP", "KAFKA_BOOTSTRAP"),
        description="host:port[,host:port] of the Kafka brokers",
    )
    data_dir: Path = Field(Path(".vql"), description="RocksDB stores and the worker's Faust data")
    model_path: Path = Field(Path(".vql/model.npz"), description="the model artifact to encode with")
    app_id: str = Field("vql-stream", description="the Kafka consumer group (and the Faust app id)")

    behaviors_topic: str = "behaviors"
    states_topic: str = "user-states"
    dlq_topic: str = "behaviors.dlq"
    partitions: int = Field(4, ge=1, description="partitions of the topics the app creates")
    replication: int = Field(
        3, ge=1, description="replication factor of the topics it creates; capped at the broker count, with a "
                             "WARNING at start (streams/durability.py)")
    min_insync_replicas: int = Field(
        2, ge=1, description="min.insync.replicas of the topics it creates: with acks=all, how many copies a "
                             "published state is on; capped below the replication factor on a smaller cluster")

    session_timeout_s: float = Field(
        10.0, gt=0, description="consumer group session timeout: how soon a dead worker's partitions move"
    )

    transaction_timeout_s: float = Field(
        30.0, gt=0, le=900,
        description="transaction.timeout.ms of the per-partition publishing transactions: how long an "
                    "open transaction of a worker that hangs holds up read_committed readers of its partition "
                    "before the broker aborts it (a new owner aborts it at once)",
    )
    restore_retry_max_s: float = Field(
        30.0, gt=0,
        description="longest wait between two tries of a partition's restore that failed on a broker error "
                    "(the wait doubles from 0.5 s; the partition stays paused until a try succeeds)",
    )

    standby_interval_s: float = Field(
        10.0, ge=0,
        description="how often the local copies of partitions other workers own are caught up "
                    "from the changelog (standby replicas; 0: none)",
    )
    tombstone_check_interval_s: float = Field(
        10.0, ge=0,
        description="how often a worker looks for bare tombstones (null states not written by a worker) on "
                    "the partitions it owns and sends a delete request for each (0: never; "
                    "docs/operations.md, 'Deleting a user')",
    )
    lag_interval_s: float = Field(
        5.0, gt=0,
        description="how often the consumer lag of every owned partition is read from the broker and "
                    "exported, whether or not its records arrive",
    )
    batch_size: int = Field(
        16384, ge=1,
        description="events per micro-batch, at most: a worker that keeps up takes what arrived since its "
                    "last batch, one that is behind takes this many at a time",
    )
    batch_window_s: float = Field(0.2, gt=0, description="longest wait to fill a micro-batch")
    commit_interval_s: float = Field(
        5.0, ge=0,
        description="how often each partition's cached states are written to RocksDB and its input offset "
                    "committed, one partition at a time: at most this much work is redone after a crash "
                    "(0: every partition after every micro-batch)",
    )
    state_cache_mb: int = Field(
        512, ge=0,
        description="decoded states a worker keeps in memory between micro-batches, shared by its partitions "
                    "(~26 KB a state; 0: only one batch's)",
    )
    device: str = Field("auto", description="torch device for encoding: auto, cpu or cuda")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads for encoding on the CPU")
    replay_jobs: int = Field(
        0, ge=0,
        description="processes a replay deals its partitions to (0: one per CPU core on Linux, else 1)",
    )

    web_port: int = Field(6066, ge=0, le=65535, description="the worker's HTTP port (/metrics, /health)")
    web_host: str = "127.0.0.1"

    max_event_bytes: int = Field(64 * 1024, ge=256, description="larger events are dead-lettered as oversized")
    max_dead_letter_bytes: int = Field(
        1024 * 1024, ge=4096,
        description="the DLQ topic's max.message.bytes, set when the worker creates it: a dead letter is cut "
                    "to fit this or the existing topic's limit, whichever is smaller (headers say so)",
    )
    dlq_retention_s: float = Field(
        14 * 24 * 3600, gt=0,
        description="retention.ms of the DLQ topic, set when the worker creates it: dead letters hold raw "
                    "input (users' data) and have no consumer that trims them",
    )
    max_state_bytes: int = Field(
        1024 * 1024, ge=4096,
        description="the states topic's max.message.bytes, set when the worker creates it: a model whose "
                    "largest state record exceeds this or the existing topic's limit is refused at start",
    )
    event_id_window: int = Field(
        256, ge=0,
        description="recent event ids remembered per user: a repeated one is dead-lettered (0: no check)",
    )
    max_future_skew_s: float = Field(
        3600.0, ge=0,
        description="reject events further ahead than this of the later of the worker's clock and their "
                    "record's Kafka timestamp",
    )
    max_landmark_lead_s: float = Field(
        3600.0, ge=0,
        description="no event is folded at a time further ahead than this of its record's Kafka timestamp: "
                    "how far one event can move its user's landmark past what the partition has seen",
    )
    min_event_time_ms: int = Field(946_684_800_000, ge=0, description="reject events before this")

    def scoped(self, name: str) -> "Settings":
        """A copy with its own topics, consumer group and data dir (``name.behaviors``, ...):
        a demo, test or benchmark run that shares a broker with others without mixing."""
        return self.model_copy(update={
            "behaviors_topic": f"{name}.behaviors",
            "states_topic": f"{name}.user-states",
            "dlq_topic": f"{name}.behaviors.dlq",
            "app_id": f"vql-{name}",
            "data_dir": self.data_dir / name,
        })

    def event_policy(self) -> EventPolicy:
        return EventPolicy(
            max_event_bytes=self.max_event_bytes,
            max_future_skew_ms=int(self.max_future_skew_s * 1000),
            min_event_time_ms=self.min_event_time_ms,
            max_landmark_lead_ms=int(self.max_landmark_lead_s * 1000),
        )
