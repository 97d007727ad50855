"""The main job: a worker, a stream of demo events, and what an operator wants to see."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vql.streams.demo_events import ITEMS_PER_CATEGORY, DemoSpec, generate, history_lengths, user_id
from vql.streams.settings import Settings
from vql.streams.topics import CompactedView, ensure_topics, latest_by_key, produce_all, read_topic


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a child process (a worker)."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[f"VQL_{name.upper()}"] = str(value)
    return env


def start_worker(settings: Settings, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "vql.streams.cli", "worker"],
            env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT,
        )


def stop_worker(worker: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM (the worker flushes and commits), then SIGKILL if it hangs."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout_s)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return worker.returncode


def produce_demo_events(settings: Settings, spec: DemoSpec, progress: bool = True) -> tuple[int, dict[str, int]]:
    """Produce the spec's events; return the count and raw JSON bytes per user."""
    raw_bytes: dict[str, int] = {}

    def counted():
        for key, value in generate(spec, now_ms=int(time.time() * 1000)):
            raw_bytes[key.decode()] = raw_bytes.get(key.decode(), 0) + len(value)
            yield key, value

    count = produce_all(settings.kafka_bootstrap, settings.behaviors_topic, counted(),
                        int(history_lengths(spec).sum()), "producing events" if progress else None)
    return count, raw_bytes


def read_states(settings: Settings) -> dict[bytes, bytes]:
    return latest_by_key(read_topic(settings.kafka_bootstrap, settings.states_topic, idle_s=1.0))


def print_top_candidates(settings: Settings, blob: bytes, n_candidates: int, top: int) -> None:
    from vql.model.features import Candidates
    from vql.model.scoring import Scorer
    from vql.schemas.user_state import decode_user_state

    state = decode_user_state(blob)
    scorer = Scorer.from_path(settings.model_path)
    # Distinct candidates: the 50 most popular items of each of the demo's 200 categories.
    pool = np.random.default_rng(0).choice(200 * 50, size=min(n_candidates, 200 * 50), replace=False)
    category = pool // 50
    candidates = Candidates(item=category * ITEMS_PER_CATEGORY + pool % 50, category=category, modality=category % 5)
    started = time.perf_counter()
    scores = scorer.score(state, candidates, now_s=time.time())
    elapsed_ms = (time.perf_counter() - started) * 1e3
    print(f"top {top} of {n_candidates} candidates for {state.user_id} "
          f"({state.event_count} events, scored in {elapsed_ms:.2f} ms):")
    for rank, i in enumerate(np.argsort(-scores.ctr)[:top], 1):
        print(f"  {rank:2d}. item {candidates.item[i]:>9d}  category {candidates.category[i]:>3d}  "
              f"score {scores.ctr[i]:.4f}")


def serve_one_request(settings: Settings, user: str, timeout_s: float = 90.0) -> bool:
    """Start `vql serve` over the demo's states topic, score three candidates for ``user``
    over HTTP as a ranking backend would, print the exchange, stop the service."""
    import json
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as probe:  # a free port for this run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = settings_env(settings) | {"VQL_SERVE_PORT": str(port), "VQL_SERVE_DIR": str(settings.data_dir / "serving")}
    log_path = settings.data_dir / "serve.log"
    with open(log_path, "ab") as log:
        service = subprocess.Popen([sys.executable, "-m", "vql.streams.cli", "serve"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    body = {"user_id": user, "candidates": {"item": [380042, 120007, 5], "category": [38, 12, 0],
                                            "modality": [3, 2, 0]}}
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v1/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if service.poll() is not None or time.monotonic() > deadline:
                print(f"vql serve did not become ready; see {log_path}", file=sys.stderr)
                return False
            time.sleep(0.5)
        request = urllib.request.Request(f"{base}/v1/score", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer = json.loads(reply.read())
        elapsed_ms = (time.perf_counter() - started) * 1e3
        print(f"curl -s -X POST {base}/v1/score -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
        print(f"  -> HTTP 200 in {elapsed_ms:.1f} ms: model {answer['model_version']}, "
              f"{answer['event_count']:,} events, ctr {[round(x, 4) for x in answer['ctr']]}")
        return True
    finally:
        stop_worker(service)


def run_demo(settings: Settings, spec: DemoSpec, timeout_s: float) -> int:
    from vql.model.config import ModelConfig
    from vql.model.encoder import VQLModel
    from vql.schemas.user_state import decode_user_state

    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = settings.scoped(run)
    if not settings.model_path.exists():
        version = VQLModel(ModelConfig()).save(settings.model_path)
        print(f"created model {version} at {settings.model_path} (random init: `vql train` comes later)")
    ensure_topics(settings)
    log_path = settings.data_dir / "worker.log"
    worker = start_worker(settings, log_path)
    print(f"worker started (pid {worker.pid}, log {log_path}), topics {run}.*")
    try:
        started = time.monotonic()
        produced, raw_bytes = produce_demo_events(settings, spec)
        view = CompactedView(settings.kafka_bootstrap, settings.states_topic)
        counts: dict[bytes, int] = {}
        with tqdm(total=produced, desc="events in published states", unit="ev") as bar:
            while time.monotonic() - started < timeout_s and sum(counts.values()) < produced:
                if worker.poll() is not None:
                    print(f"the worker exited with code {worker.returncode}; see {log_path}", file=sys.stderr)
                    return 1
                for key in view.refresh():
                    counts[key] = decode_user_state(view.values[key]).event_count
                bar.update(sum(counts.values()) - bar.n)
        elapsed = time.monotonic() - started
        view.close()
        states = view.values
        done = sum(counts.values())
        decoded = {k.decode(): decode_user_state(v) for k, v in states.items()}
        sizes = np.array([len(v) for v in states.values()])
        heavy = user_id(0)
        print()
        print(f"events produced          {produced:,}")
        print(f"events in user states    {done:,}  ({done / elapsed:,.0f} events/s end to end, {elapsed:.1f} s)")
        print(f"users with states        {len(states):,} of {spec.users:,}")
        print(f"state bytes per user     mean {sizes.mean():,.0f}, max {sizes.max():,} (float32, G*K*R cells at most)")
        if heavy in decoded:
            print(f"heaviest user {heavy}: {decoded[heavy].event_count:,} events, raw history "
                  f"{raw_bytes[heavy]:,} bytes of JSON -> state {len(states[heavy.encode()]):,} bytes")
            print()
            print_top_candidates(settings, states[heavy.encode()], 1000, 10)
            print()
            print("the same user through the HTTP scoring service (vql serve):")
            if not serve_one_request(settings, heavy):
                return 1
        return 0 if done >= produced else 1
    finally:
        code = stop_worker(worker)
        print(f"worker stopped (exit code {code})")
