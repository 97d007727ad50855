"""The CPU time of a broker running on this machine, found by the port it listens on.

Why a bench needs it: the worker, its load and the broker share the same cores, and a
broker's cost grows with the bytes published to it. Reporting its CPU beside a figure shows
where the machine's time went, and whether the broker, not the worker, is what ran out.
Linux only (/proc); elsewhere, or for a broker on another host, there is nothing to report.
"""

from __future__ import annotations

import os
from pathlib import Path

_LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


class BrokerCpu:
    """CPU seconds (user + system) of the local process listening on a bootstrap's port."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    @classmethod
    def find(cls, bootstrap: str) -> "BrokerCpu | None":
        """The broker's process if it runs here (the first bootstrap address's port), else None."""
        port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
        inodes = _listening_inodes(port)
        if not inodes:
            return None
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                for fd in (proc / "fd").iterdir():
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return cls(int(proc.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes
