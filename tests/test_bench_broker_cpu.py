"""The benches find a broker on this machine by the port it listens on, and read its CPU time."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from vql.bench.broker_cpu import BrokerCpu

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def test_the_process_listening_on_the_port_is_found_and_its_cpu_time_grows():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        found = BrokerCpu.find(f"127.0.0.1:{port},127.0.0.2:9092")
        assert found is not None and found.pid == os.getpid()
        before = found.cpu_seconds()
        deadline = time.process_time() + 0.1
        while time.process_time() < deadline:
            pass
        assert found.cpu_seconds() - before >= 0.05


def test_a_port_nobody_listens_on_is_no_local_broker():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening
        assert BrokerCpu.find(f"127.0.0.1:{port}") is None
