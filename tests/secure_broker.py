"""A second local broker with a SASL_SSL listener, for the security tests.

deploy/kafka/broker.sh runs it from the same jars as the shared test broker, with its own
state dir and ports (so it never touches the shared one), a CA and broker certificate made
with openssl on start, PLAIN users in the listener's JAAS config and SCRAM-SHA-256/512
credentials written when its storage is formatted. Clients reach it only over SASL_SSL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kafka_broker import BROKER_SH, REPO_ROOT

USER = "vql-test"
START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SecureBroker:
    state: Path
    env: dict[str, str]  # broker.sh's knobs for this broker, never the shared one's
    bootstrap: str  # the SASL_SSL listener
    cafile: Path
    password: str

    @classmethod
    def start(cls, state: Path) -> "SecureBroker":
        """Start it (raises RuntimeError with broker.sh's words if it cannot)."""
        missing = [tool for tool in ("java", "openssl", "bash") if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not installed")
        password = os.urandom(8).hex()
        port, controller, sasl_ssl = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "VQL_KAFKA_STATE": str(state), "VQL_KAFKA_PORT": str(port), "VQL_KAFKA_CONTROLLER_PORT": str(controller),
            "VQL_KAFKA_SASL_SSL_PORT": str(sasl_ssl), "VQL_KAFKA_SASL_USERS": f"{USER}:{password}",
            "VQL_KAFKA_HEAP": "-Xmx256m -Xms256m",
        }
        broker = cls(state, env, f"127.0.0.1:{sasl_ssl}", state / "tls" / "ca.pem", password)
        result = broker._run("start", START_TIMEOUT_S)
        if result.returncode != 0:
            broker.stop()
            raise RuntimeError(f"broker.sh start failed ({result.returncode}): {result.stderr[-2000:]}")
        return broker

    def _run(self, command: str, timeout_s: float) -> subprocess.CompletedProcess:
        # broker.sh detaches the broker from our pipes, so capturing its output is safe.
        return subprocess.run(["bash", str(BROKER_SH), command], cwd=REPO_ROOT, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)

    def stop(self) -> None:
        self._run("stop", 60)

    def client_env(self, mechanism: str, password: str | None = None) -> dict[str, str]:
        """The VQL_KAFKA_* settings of a client of this broker."""
        return {
            "VQL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "VQL_KAFKA_SSL_CAFILE": str(self.cafile),
            "VQL_KAFKA_SASL_MECHANISM": mechanism, "VQL_KAFKA_SASL_USERNAME": USER,
            "VQL_KAFKA_SASL_PASSWORD": self.password if password is None else password,
        }
