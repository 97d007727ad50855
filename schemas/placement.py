"""Where a user's records belong: Kafka's default partitioner, the contract of every topic here.

A user's events, their state and every replay of them live on one partition number: the
murmur2 partition of the user id's UTF-8 bytes, as Kafka's Java producer places a keyed
record (``Utils.toPositive(Utils.murmur2(key)) % partitions``). The worker, the replays and
the serving views all assume it; a record elsewhere (a keyless one, or one sent by a client
with another partitioner, such as librdkafka's default crc32) would split its user's state,
so it is dead-lettered instead (:func:`misplaced`).

:func:`murmur2` is the reference, one key at a time; :func:`partitions_of` computes the
same for a batch of keys with numpy (grouped by key length), because the worker judges
every record it consumes. tests/test_placement.py holds both to vectors from Kafka's Java
implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vql.schemas.decode import Reason, Rejection

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: the 32-bit MurmurHash2 of ``data``, as a signed int like Java's."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length % 4
    if tail:
        h ^= int.from_bytes(data[whole:], "little")
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a record with ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def partitions_of(keys: Sequence[bytes], partitions: int) -> np.ndarray:
    """:func:`partition_of` of every key (int64), computed per key length in numpy's uint32
    arithmetic (which wraps as Java's int does): a few microseconds per distinct length
    instead of one Python loop per key."""
    out = np.empty(len(keys), np.int64)
    if not keys:
        return out
    lengths = np.fromiter(map(len, keys), np.int64, len(keys))
    m = np.uint32(_M)
    for length in np.unique(lengths).tolist():
        rows = np.flatnonzero(lengths == length)
        data = np.frombuffer(b"".join([keys[i] for i in rows.tolist()]), np.uint8).reshape(rows.size, length)
        h = np.full(rows.size, (_SEED ^ length) & _MASK, np.uint32)
        whole = length - length % 4
        if whole:
            words = np.ascontiguousarray(data[:, :whole]).view("<u4")
            for w in range(whole // 4):
                k = words[:, w] * m
                k ^= k >> np.uint32(24)
                k *= m
                h = (h * m) ^ k
        if length % 4:
            tail = np.zeros(rows.size, np.uint32)
            for j in range(length % 4):
                tail |= data[:, whole + j].astype(np.uint32) << np.uint32(8 * j)
            h = (h ^ tail) * m
        h ^= h >> np.uint32(13)
        h *= m
        h ^= h >> np.uint32(15)
        out[rows] = (h & np.uint32(0x7FFFFFFF)).astype(np.int64) % partitions
    return out


def misplaced(keys: Sequence[bytes | None], record_partitions: np.ndarray, partitions: int) -> dict[int, Rejection]:
    """Records that are not on their key's partition of a topic of ``partitions``: position ->
    why (a missing key, or a key that belongs elsewhere). ``record_partitions`` is where each
    record was read from."""
    rejected: dict[int, Rejection] = {}
    keyed = [i for i, key in enumerate(keys) if key is not None]
    if len(keyed) < len(keys):
        for i in set(range(len(keys))).difference(keyed):
            rejected[i] = Rejection(Reason.MISSING_KEY, "record has no key: a user's events must be keyed by user_id")
    if not keyed:
        return rejected
    expected = partitions_of([keys[i] for i in keyed], partitions)  # type: ignore[misc]
    found = np.asarray(record_partitions)[keyed]
    for j in np.flatnonzero(expected != found).tolist():
        rejected[keyed[j]] = Rejection(
            Reason.WRONG_PARTITION,
            f"key belongs to partition {int(expected[j])} of {partitions} (Kafka's murmur2 partitioner), "
            f"not {int(found[j])}")
    return rejected
