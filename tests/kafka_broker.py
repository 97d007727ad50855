"""Finds a real Kafka broker for the integration tests.

`find_bootstrap()` tries, in order:

1. ``KAFKA_BOOTSTRAP`` from the environment: a broker someone already runs (CI service,
   ``docker compose up kafka`` -> ``127.0.0.1:9092``). It must answer within a few
   seconds, or this is an error: a set but dead address is a mistake to report, not
   something to paper over with another broker.
2. The local jar broker, ``deploy/kafka/broker.sh start`` (needs Java; Maven on first
   use to fetch the jars). It is left running after the tests, so the next run starts
   in well under a second; ``deploy/kafka/broker.sh stop`` ends it.
3. A Kafka container from testcontainers, if a Docker engine answers. It is stopped
   when the Python process exits.

Otherwise RuntimeError, saying what was tried and why each failed.

Needs only the standard library, unless it gets to step 3.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BROKER_SH = REPO_ROOT / "deploy" / "kafka" / "broker.sh"

#: Seconds an address from KAFKA_BOOTSTRAP gets to answer.
PROBE_TIMEOUT_S = 5.0
#: Upper bound for `broker.sh start`: a first run fetches jars with Maven, then the broker
#: itself gets VQL_KAFKA_WAIT_TIMEOUT (default 90 s) to become ready.
LOCAL_START_TIMEOUT_S = 600.0
#: Seconds testcontainers gives the container to log "Kafka Server started".
CONTAINER_START_TIMEOUT_S = 180

_found: str | None = None


def find_bootstrap() -> str:
    """Returns a bootstrap address ("host:port[,host:port...]") of a broker that answers.

    The result is cached for the process: a pytest session starts at most one broker.
    """
    global _found
    if _found is None:
        _found = _find()
    return _found


def _find() -> str:
    env = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    if env:
        try:
            check_broker(env, PROBE_TIMEOUT_S)
        except OSError as exc:
            raise RuntimeError(
                f"KAFKA_BOOTSTRAP={env!r} is set, but no Kafka broker answered there within "
                f"{PROBE_TIMEOUT_S:.0f} s: {exc}. Start that broker, or unset KAFKA_BOOTSTRAP "
                f"to let the tests start one themselves ({BROKER_SH.relative_to(REPO_ROOT)})."
            ) from exc
        return env

    tried: list[str] = []

    try:
        return _start_local_broker()
    except RuntimeError as exc:
        tried.append(f"local jar broker ({BROKER_SH.relative_to(REPO_ROOT)} start): {exc}")

    try:
        return _start_container()
    except RuntimeError as exc:
        tried.append(f"testcontainers Kafka: {exc}")

    raise RuntimeError(
        "no Kafka broker could be found or started. Tried:\n  - KAFKA_BOOTSTRAP: not set\n"
        + "".join(f"  - {line}\n" for line in tried)
        + "Install Java 17+ and Maven (for the local broker), or start Docker, or point "
        "KAFKA_BOOTSTRAP at a running broker."
    )


# ------------------------------------------------------------------------ local broker


def _start_local_broker() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if not (shutil.which("java") or (java_home and Path(java_home, "bin", "java").exists())):
        raise RuntimeError("java is not installed")
    if not shutil.which("bash"):
        raise RuntimeError("bash is not installed")
    try:
        # capture_output is safe here: broker.sh detaches the broker from our pipes.
        proc = subprocess.run(
            ["bash", str(BROKER_SH), "start"],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=LOCAL_START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no result within {LOCAL_START_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n      ".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"exit status {proc.returncode}:\n      {tail}")
    bootstrap = f"127.0.0.1:{os.environ.get('VQL_KAFKA_PORT', '9092')}"
    try:
        check_broker(bootstrap, PROBE_TIMEOUT_S)
    except OSError as exc:
        raise RuntimeError(f"it started, but {bootstrap} does not answer: {exc}") from exc
    return bootstrap


# ------------------------------------------------------------------------ container


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=20,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_container() -> str:
    if not _docker_answers():
        raise RuntimeError("no Docker engine answers (`docker info` failed)")
    try:
        from testcontainers.community.kafka import KafkaContainer  # testcontainers >= 4.9
    except ImportError:
        try:
            from testcontainers.kafka import KafkaContainer  # older 4.x
        except ImportError as exc:
            raise RuntimeError(f"testcontainers is not installed ({exc})") from None
    # KRaft: one container, no ZooKeeper. The default image (confluentinc/cp-kafka) is the
    # one KafkaContainer's start script is written for.
    container = KafkaContainer().with_kraft()
    try:
        container.start(timeout=CONTAINER_START_TIMEOUT_S)
    except Exception as exc:  # docker errors come in many types
        try:
            container.stop()
        except Exception:
            pass
        raise RuntimeError(f"the container did not start: {exc}") from exc
    atexit.register(container.stop)
    return container.get_bootstrap_server()


# ------------------------------------------------------------------------ probe


def check_broker(bootstrap: str, timeout: float = PROBE_TIMEOUT_S) -> list[tuple[int, str, int]]:
    """Asks the first address of `bootstrap` that answers for cluster metadata.

    Returns the brokers the cluster advertises as (node_id, host, port), after checking
    that at least one of those advertised addresses accepts a connection too: a broker
    that answers the bootstrap address but advertises a name clients cannot reach (the
    usual Docker listener mix-up) would otherwise pass here and hang the tests later.
    Raises OSError (ConnectionError, TimeoutError, ...) when nothing answers.
    """
    errors = []
    for address in (a.strip() for a in bootstrap.split(",") if a.strip()):
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            brokers = _metadata(host, int(port), timeout)
        except (OSError, ValueError) as exc:
            errors.append(f"{address}: {exc}")
            continue
        unreachable = []
        for _node, b_host, b_port in brokers:
            try:
                socket.create_connection((b_host, b_port), timeout=timeout).close()
                return brokers
            except OSError as exc:
                unreachable.append(f"{b_host}:{b_port} ({exc})")
        errors.append(f"{address} answers but advertises unreachable brokers: {', '.join(unreachable)}")
    raise ConnectionError("; ".join(errors) or f"no address in {bootstrap!r}")


def _metadata(host: str, port: int, timeout: float) -> list[tuple[int, str, int]]:
    """One Metadata v0 request (all topics); returns the brokers in the reply."""
    correlation_id = 0x5651
    client_id = b"vql-tests"
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
        reply = _recv_exactly(sock, size)
    (got_id, count) = struct.unpack_from(">ii", reply, 0)
    if got_id != correlation_id:
        raise ConnectionError(f"not a Kafka reply (correlation id {got_id})")
    brokers, offset = [], 8
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", reply, offset)
        offset += 6
        b_host = reply[offset : offset + host_len].decode()
        offset += host_len
        (b_port,) = struct.unpack_from(">i", reply, offset)
        offset += 4
        brokers.append((node_id, b_host, b_port))
    if not brokers:
        raise ConnectionError("the reply names no broker")
    return brokers


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        data += chunk
    return bytes(data)
