"""Kafka's default partitioner (schemas/placement.py) against Kafka's own Java implementation.

The vectors were computed with ``org.apache.kafka.common.utils.Utils.murmur2`` and
``Utils.toPositive`` of kafka-clients 3.9.1 (a few lines of Java against the jar of the
local broker's distribution); "21" and "foobar" are also in Kafka's UtilsTest.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from vql.schemas.decode import Reason
from vql.schemas.placement import misplaced, murmur2, partition_of, partitions_of

# key -> (Utils.murmur2, partition of 4, of 7, of 12)
JAVA_VECTORS = {
    "": (275646681, 1, 2, 9),
    "a": (-1563381124, 0, 5, 4),
    "ab": (316155434, 2, 0, 2),
    "abc": (479470107, 3, 4, 3),
    "abcd": (-1323649548, 0, 5, 8),
    "abcde": (461995741, 1, 4, 1),
    "user-1": (1404122828, 0, 3, 8),
    "user-42": (1459644460, 0, 1, 4),
    "u0000017": (2052472329, 1, 5, 9),
    "21": (-973932308, 0, 3, 0),
    "foobar": (-790332482, 2, 0, 6),
    "a-little-bit-long-string": (-985981536, 0, 1, 8),
    "a-little-bit-longer-string": (-1486304829, 3, 0, 11),
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": (-58897971, 1, 3, 5),
    "é用户-ß": (-2123091742, 2, 0, 10),
}


@pytest.mark.parametrize("key", list(JAVA_VECTORS))
def test_murmur2_equals_kafkas_java_implementation(key: str) -> None:
    hashed, *parts = JAVA_VECTORS[key]
    assert murmur2(key.encode()) == hashed
    assert [partition_of(key.encode(), n) for n in (4, 7, 12)] == parts


def test_batch_partitioner_equals_the_vectors() -> None:
    keys = [k.encode() for k in JAVA_VECTORS]
    for column, n in enumerate((4, 7, 12), start=1):
        assert partitions_of(keys, n).tolist() == [JAVA_VECTORS[k][column] for k in JAVA_VECTORS]
    assert partitions_of([], 4).size == 0


@given(st.lists(st.binary(max_size=40), max_size=50), st.integers(1, 64))
def test_batch_partitioner_equals_the_reference(keys: list[bytes], partitions: int) -> None:
    got = partitions_of(keys, partitions).tolist()
    assert got == [partition_of(k, partitions) for k in keys]
    assert got == [(kafka_python_murmur2(k) & 0x7FFFFFFF) % partitions for k in keys]


def test_keyless_and_misplaced_records_are_named() -> None:
    keys = [b"user-1", None, b"abc", b"abc"]
    found = np.array([0, 2, 3, 1])  # user-1 -> 0 and abc -> 3 of 4 partitions
    rejected = misplaced(keys, found, 4)
    assert sorted(rejected) == [1, 3]
    assert rejected[1].reason is Reason.MISSING_KEY
    assert rejected[3].reason is Reason.WRONG_PARTITION and "partition 3 of 4" in rejected[3].detail
