"""Scoring off the event loop, with bounded concurrency and a bounded queue.

A score is CPU work (numpy over the user's state and the candidates: milliseconds for large
batches). Run on aiohttp's event loop it would stall every other request, health checks
included, and an unbounded backlog would let a burst hold memory and answer long after the
callers gave up. So the service scores in a pool of ``workers`` threads and admits at most
``queue`` more requests waiting for one; a request beyond that is refused at once
(:class:`Overloaded`, HTTP 503 with Retry-After), which tells a load balancer to go elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from vql.serving.errors import ServingError

T = TypeVar("T")


class Overloaded(ServingError):
    """Every scoring thread is busy and the queue in front of them is full."""

    code = "overloaded"


class ScoringPool:
    """A thread pool that admits at most ``workers + queue`` calls at a time."""

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"a pool needs at least one worker and a queue >= 0, got {workers} and {queue}")
        self.workers = workers
        self.capacity = workers + queue
        self.admitted = 0  # running or waiting; touched on the event loop only
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vql-score")

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` in a scoring thread; :class:`Overloaded` at once when full."""
        if self.admitted >= self.capacity:
            raise Overloaded(f"{self.workers} scoring threads busy and {self.capacity - self.workers} requests "
                             "queued: retry, or send this request to another replica")
        self.admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.admitted -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
