"""One round of standby catch-up: the local copies of partitions this worker does not own,
brought up to their changelog's end, so that taking one over reads only the last seconds.

A standby copy is an optimisation, never a duty: whatever fails in one partition's catch-up
(the broker, the disk, a store held by its owner or damaged) is logged and retried next
round, and neither ends the round for the other partitions nor the standby task, which
before this ran its rounds unguarded and died for good on the first KafkaError or OSError.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from vql.streams.state_store import CorruptStoreError, PartitionStore, StoreError

log = logging.getLogger("vql.standby")

Restore = Callable[[PartitionStore, int], Awaitable[object]]


async def catch_up_round(
    partitions: list[int],
    ends: dict[int, int],
    owned: Callable[[int], bool],
    open_store: Callable[[int], PartitionStore],
    restore: Restore,
    lock: asyncio.Lock,
    stopping: Callable[[], bool] = lambda: False,
) -> dict[int, BaseException]:
    """Catch up every partition in ``partitions`` not ``owned`` whose store holds less than
    its changelog end (``ends``: the next offset per partition); returns what failed, per
    partition, after logging it. Each partition holds ``lock`` while its store is open (an
    assignment waits for it)."""
    failed: dict[int, BaseException] = {}
    for partition in partitions:
        async with lock:
            if stopping() or owned(partition):
                continue
            try:
                store = open_store(partition)
            except CorruptStoreError as exc:
                log.warning("standby copy of partition %d not kept: %s", partition, exc)
                failed[partition] = exc
                continue
            except StoreError:
                continue  # its owner on this host has it open: nothing to keep warm
            try:
                held = store.changelog_offset()
                if held is None or held < ends[partition] - 1:
                    await restore(store, partition)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - KafkaError, OSError, ...: a standby copy may lag a round
                log.warning("standby catch-up of partition %d failed, retried next round: %r", partition, exc)
                failed[partition] = exc
            finally:
                store.close()
    return failed
