"""The fencing publisher's pure parts: transactional ids, and what a fenced partition drops."""

from __future__ import annotations

import numpy as np

from vql.schemas.decode import Reason, Rejection
from vql.streams.fencing import transactional_id, without_partitions
from vql.streams.processor import BatchResult, DeadLetter, RawRecord
from vql.streams.settings import Settings


def test_one_transactional_id_per_partition_of_the_app_and_states_topic():
    settings = Settings().scoped("t")
    ids = {transactional_id(settings, p) for p in range(4)}
    assert len(ids) == 4
    assert transactional_id(settings, 2) == f"{settings.app_id}.{settings.states_topic}.2"


def test_a_fenced_partition_keeps_nothing_of_a_batch():
    letter = lambda partition: DeadLetter(RawRecord(partition, 1, b"k", b"x"), Rejection(Reason.NOT_JSON, "x"))
    result = BatchResult(
        dead_letters=[letter(0), letter(1), letter(1)],
        writes=[(0, None, 10), (1, None, 20), (2, None, 30)],
        event_ids={1: {"u": np.zeros(1, np.uint64)}, 2: {}},
        applied=5, wire=[[b"a"], [b"b"], [b"c"]],
    )
    kept = without_partitions(result, {1})
    assert [w[0] for w in kept.writes] == [0, 2] and kept.wire == [[b"a"], [b"c"]]
    assert [d.record.partition for d in kept.dead_letters] == [0]
    assert list(kept.event_ids) == [2]
    assert without_partitions(result, set()) is result
