"""Forked jobs (streams/jobs.py): results in task order, progress from every job, and a
job's failure, or death, raised in the parent with the other jobs ended."""

from __future__ import annotations

import os
import signal
import time

import pytest

from vql.streams.jobs import JobFailed, run_jobs


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
