"""Restoring newly assigned partitions before a single record of them is consumed.

aiokafka swallows whatever a rebalance listener raises, so a restore that failed inside
``on_partitions_assigned`` used to go unnoticed: the worker then consumed the partition on
an empty or stale store and published truncated states. Here the listener only pauses the
new partitions and hands them to :class:`PartitionRecovery`, which restores each in a task
of its own and resumes it only once its restore has succeeded:

- a broker error (any ``KafkaError``, a timeout, a lost connection) is transient: the
  partition stays paused and the restore is tried again after a bounded exponential
  backoff (``VQL_RESTORE_RETRY_MAX_S``);
- anything else (the store cannot be opened or written, a state it cannot read, a bug) will
  not heal by waiting: the worker fail-stops (exit code 2) with a message that says what to
  do, rather than consume without the partition's state or restart in a loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from aiokafka.errors import KafkaError

log = logging.getLogger("vql.worker")

T = TypeVar("T")

#: Failures of the broker or the network: a later try may succeed.
TRANSIENT = (KafkaError, TimeoutError, OSError)

FIRST_RETRY_S = 0.5  # the first backoff; each retry doubles it up to the configured bound


class RestoreFailed(RuntimeError):
    """A partition's restore failed in a way waiting does not fix; the message says what to do."""


async def off_loop(function: Callable[..., T], *args) -> T:
    """``function(*args)`` in a thread, so that the event loop keeps heartbeating and
    publishing meanwhile. Cancelled, it still waits for the thread to finish: a store write
    must be over before anyone may close the store."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise


class PartitionRecovery:
    """Restores assigned partitions one task each; resumes each one restored, retries broker
    errors with backoff, hands any other failure to ``fail``."""

    def __init__(
        self,
        restore: Callable[[int], Awaitable[object]],
        resume: Callable[[int], None],
        fail: Callable[[RestoreFailed], Awaitable[None]],
        retry_max_s: float,
        advice: Callable[[int, BaseException], str] = lambda partition, exc: "",
    ) -> None:
        self._restore = restore
        self._resume = resume
        self._fail = fail
        self._advice = advice
        self.retry_max_s = retry_max_s
        self._tasks: dict[int, asyncio.Task] = {}
        self.last_error: dict[int, str] = {}  # partition -> why its last try failed
        self.failure: RestoreFailed | None = None

    @property
    def restoring(self) -> list[int]:
        """The partitions not yet restored (paused meanwhile)."""
        return sorted(self._tasks)

    def start(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            if partition not in self._tasks:
                self._tasks[partition] = asyncio.ensure_future(self._run(partition))

    async def cancel(self, partitions: Iterable[int] | None = None) -> None:
        """Stop the restores of ``partitions`` (default: all), which left this worker; returns
        once none of them touches its store any more."""
        chosen = list(self._tasks) if partitions is None else [p for p in partitions if p in self._tasks]
        tasks = [self._tasks.pop(p) for p in chosen]
        for partition in chosen:
            self.last_error.pop(partition, None)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def reason(self) -> str:
        """Why the worker is not ready, as far as restores are concerned ('' if they are not why)."""
        if self.failure is not None:
            return str(self.failure)
        if not self._tasks:
            return ""
        errors = "; ".join(f"partition {p}: {e}" for p, e in sorted(self.last_error.items()) if p in self._tasks)
        return f"restoring partitions {self.restoring}" + (f" (retrying after: {errors})" if errors else "")

    async def _run(self, partition: int) -> None:
        delay = FIRST_RETRY_S
        while True:
            try:
                await self._restore(partition)
                break
            except TRANSIENT as exc:
                self.last_error[partition] = f"{type(exc).__name__}: {exc}"
                log.warning("restore of partition %d failed (%s: %s); it stays paused, next try in %.1f s",
                            partition, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            except Exception as exc:  # noqa: BLE001 - every other failure fail-stops, readably
                self._tasks.pop(partition, None)
                self.failure = RestoreFailed(
                    f"restoring partition {partition} failed: {type(exc).__name__}: {exc}. The worker stops "
                    f"(exit code 2) instead of consuming the partition without its state. "
                    f"{self._advice(partition, exc)}".strip()
                )
                self.failure.__cause__ = exc
                await self._fail(self.failure)
                return
        self._tasks.pop(partition, None)
        self.last_error.pop(partition, None)
        self._resume(partition)
