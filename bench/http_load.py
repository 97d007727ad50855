"""The HTTP scoring service under a fixed request rate from a loopback load generator.

Open loop: request i is due at start + i / rate whatever happened to earlier ones, and its
latency runs from when it was due, so a slow service is charged for the queue it causes
(no coordinated omission). The service runs as `vql serve --no-follow` in its own process
on the local store the benchmark wrote.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "vql.streams.cli", "serve", "--no-follow", "--port", str(port)],
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/v1/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the scoring service at {url} did not become ready in {timeout_s} s")


async def offer_load(url: str, body: bytes, rate: float, seconds: float) -> tuple[np.ndarray, int]:
    """Latencies (s) of the successful requests and the count of failed ones."""
    latencies: list[float] = []
    failures = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(due: float) -> None:
            nonlocal failures
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                async with session.post(url + "/v1/score", data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - due)
            else:
                failures += 1

        start = time.perf_counter() + 0.1
        await asyncio.gather(*(one(start + i / rate) for i in range(int(rate * seconds))))
    return np.asarray(latencies), failures
