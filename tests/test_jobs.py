"""Forked jobs (streams/jobs.py): results in task order, progress from every job, a job's
failure, or death, raised in the parent with the other jobs ended, and partitions dealt so
that every job has work."""

from __future__ import annotations

import os
import signal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vql.streams.jobs import JobFailed, deal, run_jobs


def square(task: int, tick) -> tuple[int, int]:
    tick(task)
    return task * task, os.getpid()


def test_results_come_in_task_order_from_one_process_each_and_progress_adds_up():
    seen = []
    results = run_jobs([3, 1, 2], square, seen.append)
    assert [value for value, _pid in results] == [9, 1, 4]
    pids = {pid for _value, pid in results}
    assert len(pids) == 3 and os.getpid() not in pids
    assert sum(seen) == 6


def test_a_single_task_runs_in_this_process():
    [(value, pid)] = run_jobs([5], square)
    assert value == 25 and pid == os.getpid()


def fail_or_wait(task: tuple[str, str], tick) -> None:
    """"wait": write this process's pid, then sleep; "fail" and "die" once that pid is written."""
    kind, pid_file = task
    if kind == "wait":
        with open(pid_file + ".tmp", "w") as out:
            out.write(str(os.getpid()))
        os.rename(pid_file + ".tmp", pid_file)
        time.sleep(600)
    deadline = time.monotonic() + 60
    while not os.path.exists(pid_file) and time.monotonic() < deadline:
        time.sleep(0.01)
    if kind == "fail":
        raise KeyError("bad partition")
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("kind, error", [("fail", KeyError), ("die", JobFailed)])
def test_a_failed_or_killed_job_is_raised_here_and_ends_the_others(kind, error, tmp_path):
    pid_file = tmp_path / "waiting.pid"
    with pytest.raises(error) as raised:
        run_jobs([("wait", str(pid_file)), (kind, str(pid_file))], fail_or_wait)
    if kind == "die":
        assert "exit code -9" in str(raised.value)
    with pytest.raises(ProcessLookupError):  # the waiting job was ended and reaped, not left sleeping
        os.kill(int(pid_file.read_text()), 0)


@given(st.dictionaries(st.integers(0, 63), st.just(0) | st.integers(1, 10_000), max_size=24), st.integers(1, 8))
def test_partitions_are_dealt_once_each_to_jobs_that_all_have_work(sizes, jobs):
    work = deal(sizes, jobs)
    assert sorted(p for share in work for p in share) == sorted(sizes)
    with_work = sum(1 for n in sizes.values() if n)
    assert len(work) == max(1, min(jobs, with_work))
    loads = [sum(sizes[p] for p in share) for share in work]
    if with_work:
        assert min(loads) > 0  # no job is forked for nothing
        # largest first to the lightest job: no job ends more than one partition ahead of another
        assert max(loads) - min(loads) <= max(sizes.values())
