"""How many copies Kafka keeps of the topics the pipeline creates, and how many must ack a write.

The states topic is the stores' only off-host copy: a worker that loses its disk, or a
partition that moves, is restored from it. So the defaults are those of a production cluster,
``VQL_REPLICATION`` 3 and ``VQL_MIN_INSYNC_REPLICAS`` 2: with the producers' ``acks=all``, an
acknowledged state is on two brokers, and one broker may be down without stopping writes.

A cluster with fewer brokers cannot hold that many replicas (Kafka refuses to create the
topic), so the choice is capped at the broker count (:func:`choose_durability`), and the
worker says so with a WARNING at start that names the settings: the single local broker of
deploy/kafka/broker.sh gets replication 1 and min.insync.replicas 1, which is right for
development and wrong for anything else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka import KafkaAdminClient

log = logging.getLogger("vql.durability")


@dataclass(frozen=True)
class Durability:
    """The replication factor and min.insync.replicas topics are created with."""

    replication: int
    min_insync: int
    brokers: int
    capped: bool  # below what the settings ask for, because the cluster is smaller

    def topic_configs(self) -> dict[str, str]:
        return {"min.insync.replicas": str(self.min_insync)}

    def warning(self, wanted_replication: int, wanted_min_insync: int) -> str:
        return (f"the cluster has {self.brokers} broker(s): topics are created with replication factor "
                f"{self.replication} (VQL_REPLICATION={wanted_replication}) and min.insync.replicas "
                f"{self.min_insync} (VQL_MIN_INSYNC_REPLICAS={wanted_min_insync}); the states topic is the "
                f"stores' only off-host copy, so a lost broker disk loses states: fine for development, "
                f"not for production (docs/operations.md)")


def choose_durability(replication: int, min_insync: int, brokers: int) -> Durability:
    """``replication`` and ``min_insync`` as asked, within what ``brokers`` allow.

    The replication factor is at most the broker count, and min.insync.replicas at most the
    replication factor. When the cluster caps the replication factor, min.insync.replicas is
    also kept one below it (where it can be), so that one broker down does not stop every
    write: 2 brokers give 2 and 1, not 2 and 2.
    """
    if replication < 1 or min_insync < 1 or brokers < 1:
        raise ValueError("replication, min.insync.replicas and brokers must be at least 1")
    chosen = min(replication, brokers)
    insync = min(min_insync, chosen)
    if chosen < replication:
        insync = min(insync, max(1, chosen - 1))
    return Durability(chosen, insync, brokers, capped=(chosen, insync) != (replication, min_insync))


def cluster_durability(client: KafkaAdminClient, replication: int, min_insync: int) -> Durability:
    """:func:`choose_durability` for the cluster ``client`` talks to; logs a WARNING when capped."""
    brokers = len(client.describe_cluster().get("brokers") or ()) or 1
    chosen = choose_durability(replication, min_insync, brokers)
    if chosen.capped:
        log.warning(chosen.warning(replication, min_insync))
    return chosen


def warn_under_replicated(client: KafkaAdminClient, topics: list[str], chosen: Durability) -> list[str]:
    """Log a WARNING for each existing topic with fewer replicas than ``chosen`` (created
    before, or by hand): Kafka does not raise a topic's replication factor by itself.
    Returns those topics."""
    under = []
    for topic in client.describe_topics(topics):
        replicas = min((len(p.get("replica_nodes") or p.get("replicas") or ()) for p in topic.get("partitions") or ()),
                       default=None)
        if replicas is not None and replicas < chosen.replication:
            under.append(topic["name"])
            log.warning("topic %s has replication factor %d, fewer than the %d chosen (VQL_REPLICATION): raise it "
                        "with kafka-reassign-partitions (docs/operations.md)", topic["name"], replicas,
                        chosen.replication)
    return under
