"""Run independent pieces of a replay in forked processes, one per CPU core.

A replay's partitions share nothing once its events are prepared (each has its own store
and offsets), so the work splits by partition. Processes rather than threads because the
state math holds the GIL for much of its time; ``fork`` because the prepared arrays
(hundreds of MB) are then shared copy-on-write instead of pickled. A child opens its own
stores and producer, never the parent's.

Failure is the parent's: the first job that raises (or dies, e.g. killed for memory) ends
the others and its exception is raised in the parent, so a replay fails as one process
would, and, being resumable, a rerun continues from what every job had written.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from vql.streams.state_store import rocksdb_started

log = logging.getLogger(__name__)

Task = TypeVar("Task")
Result = TypeVar("Result")

PROGRESS_POLL_S = 0.2


class JobFailed(RuntimeError):
    """A job ended without a result: killed, or its exception could not be sent back."""


def default_jobs() -> int:
    """One job per core this process may run on where ``fork`` is safe (Linux); else one."""
    if sys.platform != "linux":
        return 1
    return len(os.sched_getaffinity(0))


def safe_jobs(requested: int) -> int:
    """``requested``, or 1 where forking would be unsafe: off Linux, and in a process that
    has already opened a RocksDB store (``rocksdb_started``), which its children would
    inherit without RocksDB's threads. `vql replay` opens none before its jobs start."""
    if requested > 1 and (sys.platform != "linux" or rocksdb_started()):
        log.warning("replaying in one process, not %d: this process has opened RocksDB stores (or is not on "
                    "Linux), and forked jobs would inherit them without RocksDB's threads", requested)
        return 1
    return requested


def deal(sizes: dict[int, int], jobs: int) -> list[list[int]]:
    """Partitions (their sizes: rows or records to replay) dealt to at most ``jobs`` jobs,
    largest first to the job with the least so far; never a job without work, but one job
    when there is none at all."""
    work: list[list[int]] = [[] for _ in range(max(1, min(jobs, sum(1 for n in sizes.values() if n))))]
    load = [0] * len(work)
    for partition, size in sorted(sizes.items(), key=lambda ps: -ps[1]):
        lightest = load.index(min(load))
        work[lightest].append(partition)
        load[lightest] += size
    return work


def cpu_seconds() -> float:
    """CPU time of this process and of the jobs it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def run_jobs(
    tasks: Sequence[Task],
    job: Callable[[Task, Callable[[int], None]], Result],
    progress: Callable[[int], None] = lambda done: None,
) -> list[Result]:
    """``job(task, tick)`` for every task, each in a process of its own (in this one when
    there is a single task); results in the order of ``tasks``. ``tick(n)`` reports n more
    units done; ``progress`` receives the increments of all jobs, in this process."""
    if len(tasks) == 1:
        return [job(tasks[0], progress)]
    context = multiprocessing.get_context("fork")
    done = context.Value("q", 0)
    children = []
    gc.freeze()  # the collector would otherwise write to (and so copy) every inherited object's page
    try:
        for index, task in enumerate(tasks):
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_child, args=(job, task, send, done), name=f"replay-job-{index}",
                                    daemon=True)
            child.start()
            send.close()
            children.append((child, receive))
        return _collect(children, done, progress)
    finally:
        for child, receive in children:
            if child.is_alive():
                child.terminate()
            child.join()
            receive.close()
        gc.unfreeze()


def _collect(children: list, done, progress: Callable[[int], None]) -> list:
    results: dict[int, object] = {}
    waiting = {receive: index for index, (_child, receive) in enumerate(children)}
    shown = 0
    while waiting:
        ready = multiprocessing.connection.wait(list(waiting), timeout=PROGRESS_POLL_S)
        shown = _show(done, shown, progress)
        for receive in ready:
            index = waiting.pop(receive)
            try:
                ok, value = receive.recv()
            except EOFError:
                child = children[index][0]
                child.join()
                raise JobFailed(f"{child.name} ended without a result (exit code {child.exitcode})") from None
            if not ok:
                raise value
            results[index] = value
    _show(done, shown, progress)
    return [results[index] for index in range(len(children))]


def _show(done, shown: int, progress: Callable[[int], None]) -> int:
    now = done.value
    if now > shown:
        progress(now - shown)
    return now


def _child(job: Callable, task, send: multiprocessing.connection.Connection, done) -> None:
    def tick(units: int) -> None:
        with done.get_lock():
            done.value += units

    try:
        outcome = (True, job(task, tick))
    except BaseException as exc:  # noqa: BLE001 - every failure, Ctrl-C included, is the parent's to raise
        outcome = (False, exc)
    try:
        send.send(outcome)
    except Exception as exc:  # an exception or result that does not pickle
        send.send((False, JobFailed(f"{type(outcome[1]).__name__}: {outcome[1]} ({exc})")))
    finally:
        send.close()
