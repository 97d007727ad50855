"""The replication choice (streams/durability.py): the settings where the cluster allows them,
capped at its size otherwise, never a min.insync.replicas above the replication factor."""

from __future__ import annotations

import pytest

from vql.streams.durability import choose_durability
from vql.streams.settings import Settings


@pytest.mark.parametrize("replication, min_insync, brokers, expected", [
    (3, 2, 5, (3, 2, False)),  # a cluster: as asked
    (3, 2, 3, (3, 2, False)),
    (3, 2, 2, (2, 1, True)),  # one broker down must not stop writes
    (3, 2, 1, (1, 1, True)),  # the single local broker
    (1, 1, 1, (1, 1, False)),  # asked for: no warning
    (3, 3, 3, (3, 3, False)),  # the operator's choice stands
    (2, 5, 3, (2, 2, True)),  # min.insync.replicas never above the replication factor
])
def test_the_choice_is_capped_by_the_cluster(replication, min_insync, brokers, expected):
    chosen = choose_durability(replication, min_insync, brokers)
    assert (chosen.replication, chosen.min_insync, chosen.capped) == expected
    assert chosen.topic_configs() == {"min.insync.replicas": str(expected[1])}


def test_the_defaults_are_a_clusters():
    settings = Settings()
    assert (settings.replication, settings.min_insync_replicas) == (3, 2)


def test_the_warning_names_the_settings():
    text = choose_durability(3, 2, 1).warning(3, 2)
    assert "VQL_REPLICATION=3" in text and "VQL_MIN_INSYNC_REPLICAS=2" in text and "replication factor 1" in text
