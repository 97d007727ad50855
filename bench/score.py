"""`vql bench score`: latency of scoring N candidates for one user, against history length L.

Three methods on one CPU thread, same model weights, same candidates:

- ``vql``: the serving client's call, ``RankingClient.score``: read the published (float32)
  state from the local RocksDB store, decode it, run the numpy scorer including the CTR head.
- ``full``: exact attention over all L events, unquantized keys, decay kernel (bench/baselines.py).
- ``topk``: SIM-hard retrieval of the 200 newest same-category events, then attention.

The baselines get their per-event keys and values precomputed and stop at the interest
vectors, so they are timed generously. Rounds interleave the history lengths, so that a
concurrent load on the machine falls on every L alike. Each cell reports wall-clock
``p50_ms``/``p99_ms`` and the thread's CPU time ``p50_cpu_ms``/``p99_cpu_ms``: on a shared
machine the wall-clock tail carries the other tenants' preemptions, the CPU time does not. ``state_bytes`` is the published
state's size at each L; with ``http_rate`` the HTTP service is measured too (bench/http_load.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from vql.bench.report import emit

# numpy's BLAS sizes its thread pool when it loads: only a fresh process can be pinned.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TOPIC = "bench.user-states"
TOPK = 200
MIN_REPEATS, MAX_REPEATS = 3, 2000


def run(lengths: list[int], candidates: list[int], seconds: float, plot: Path | str | None = None,
        http_rate: float = 0.0, http_seconds: float = 10.0) -> None:
    options = dict(lengths=lengths, candidates=candidates, seconds=seconds, plot=plot and str(plot),
                   http_rate=http_rate, http_seconds=http_seconds)
    if any(os.environ.get(name) != value for name, value in ONE_THREAD.items()):
        code = f"import json; from vql.bench.score import run; run(**json.loads({json.dumps(options)!r}))"
        subprocess.run([sys.executable, "-c", code], env={**os.environ, **ONE_THREAD}, check=True)
        return
    with tempfile.TemporaryDirectory(prefix="vql-bench-score-") as tmp:
        records = _measure(Path(tmp), lengths, candidates, seconds)
        if http_rate > 0:
            _measure_http(Path(tmp), max(lengths), max(candidates), http_rate, http_seconds)
    if plot:
        plot_latency(records, Path(plot))


def _measure(work: Path, lengths: list[int], sizes: list[int], seconds: float) -> list[dict]:
    import torch

    from vql.bench.baselines import RawHistory, full_attention, topk_attention
    from vql.bench.history import synthetic_history
    from vql.model.config import ModelConfig
    from vql.model.encoder import VQLModel
    from vql.model.scoring import Scorer
    from vql.schemas.user_state import encode_user_state
    from vql.serving.client import RankingClient
    from vql.serving.store import StateStore

    torch.set_num_threads(1)
    config = ModelConfig()
    model = VQLModel(config).eval()
    version = model.save(work / "model.npz")
    scorer = Scorer.from_path(work / "model.npz")
    store = StateStore(work / "serving" / TOPIC, TOPIC)
    raw: dict[int, RawHistory] = {}
    records: list[dict] = []
    newest = 0.0
    for length in lengths:
        state, events = synthetic_history(model, version, user_of(length), length)
        blob = encode_user_state(state, np.float32)
        store.apply([(user_of(length).encode(), blob)], {})
        raw[length] = RawHistory.encode(model, events)
        newest = max(newest, float(events.time_s.max()))
        records.append(_emit("state_bytes", len(blob), "B", L=length, cells=state.occupied_cells))
    client = RankingClient(scorer, store)
    rates = np.asarray(config.decay_rates)
    with torch.no_grad():
        log_mixture = torch.log_softmax(model.rate_logits, -1).double().numpy()
    now = newest + 60.0

    def queries(batch):
        return scorer.queries(scorer.target_features(batch))

    methods: dict[str, Callable] = {
        "vql": lambda length, batch: client.score(user_of(length), batch, now),
        "full": lambda length, batch: full_attention(raw[length], queries(batch), now, rates, log_mixture),
        "topk": lambda length, batch: topk_attention(raw[length], queries(batch), batch.category, TOPK),
    }
    p99: dict[tuple[str, str, int, int], float] = {}
    for method, call in methods.items():
        for n in sizes:
            batch = sample_candidates(n, seed=n)
            times = interleaved({length: (lambda length=length: call(length, batch)) for length in lengths},
                                seconds * len(lengths))
            for length, (wall, cpu) in times.items():
                params = dict(method=method, L=length, candidates=n, repeats=len(wall))
                if method == "topk":
                    params["k"] = TOPK
                for metric, samples, q in (("p50_ms", wall, 50), ("p99_ms", wall, 99),
                                           ("p50_cpu_ms", cpu, 50), ("p99_cpu_ms", cpu, 99)):
                    value = float(np.percentile(samples * 1e3, q))
                    records.append(_emit(metric, value, "ms", **params))
                    p99[metric, method, length, n] = value
    client.close()
    n = max(sizes)
    for metric in ("p99_ms", "p99_cpu_ms"):
        for length in lengths:
            records.append(_emit(f"full_over_vql_{metric[:-3]}", p99[metric, "full", length, n] / p99[metric, "vql", length, n],
                                 "x", L=length, candidates=n))
        records.append(_emit(f"vql_{metric[:-3]}_longest_over_shortest",
                             p99[metric, "vql", max(lengths), n] / p99[metric, "vql", min(lengths), n],
                             "x", L=[min(lengths), max(lengths)], candidates=n))
    return records


def _emit(metric: str, value: float, unit: str, **params) -> dict:
    emit("score", metric, value, unit, **params)
    return {"metric": metric, "value": float(value), **params}


def user_of(length: int) -> str:
    """Ids of one width, so that state_bytes compares the states alone."""
    return f"user-L{length:09d}"


def sample_candidates(n: int, seed: int):
    from vql.model.features import Candidates

    rng = np.random.default_rng(seed)
    # Categories drawn like the histories' (bench/encode.py), so top-k retrieval finds events.
    return Candidates(item=rng.integers(0, 2**40, n), category=rng.integers(0, 5000, n),
                      modality=rng.integers(0, 5, n))


def interleaved(calls: dict[int, Callable[[], object]], budget_s: float) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Wall and thread-CPU seconds per call of each, in rounds over all of them (one warm-up
    round first), until the budget is spent and every call has MIN_REPEATS samples, or
    MAX_REPEATS. CPU time leaves out the waits of a preempted thread: on a shared machine it
    is the one-core cost, while wall time carries the other tenants' load."""
    for call in calls.values():
        call()
    samples: dict[int, list[tuple[float, float]]] = {key: [] for key in calls}
    started = time.perf_counter()
    rounds = 0
    while rounds < MIN_REPEATS or (time.perf_counter() - started < budget_s and rounds < MAX_REPEATS):
        for key, call in calls.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            call()
            samples[key].append((time.perf_counter() - wall, time.thread_time() - cpu))
        rounds += 1
    return {key: tuple(np.asarray(values).T) for key, values in samples.items()}


def _measure_http(work: Path, length: int, n: int, rate: float, seconds: float) -> None:
    from vql.bench.http_load import free_port, offer_load, start_service, wait_ready

    port = free_port()
    env = {**ONE_THREAD, "VQL_SERVE_DIR": str(work / "serving"), "VQL_STATES_TOPIC": TOPIC,
           "VQL_MODEL_PATH": str(work / "model.npz")}
    service = start_service(env, port, work / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(url, timeout_s=60.0))
        batch = sample_candidates(n, seed=n)
        body = orjson.dumps({"user_id": user_of(length), "candidates": {
            "item": batch.item.tolist(), "category": batch.category.tolist(), "modality": batch.modality.tolist()}})
        latencies, failures = asyncio.run(offer_load(url, body, rate, seconds))
    finally:
        service.terminate()
        service.wait(30)
    ms = latencies * 1e3
    params = dict(method="http", L=length, candidates=n, rate_per_s=rate, requests=len(ms) + failures,
                  failures=failures)
    _emit("p50_ms", np.percentile(ms, 50), "ms", **params)
    _emit("p99_ms", np.percentile(ms, 99), "ms", **params)


def plot_latency(records: list[dict], path: Path) -> None:
    """p99 against L for each method at the largest N (log-log), and vql's p50/p99 per N."""
    from vql.research.report import pyplot, save_figure

    plt = pyplot()
    timed = [r for r in records if r["metric"] in ("p50_ms", "p99_ms", "p99_cpu_ms")]
    n = max(r["candidates"] for r in timed)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0))
    for method, marker in (("vql", "o"), ("topk", "^"), ("full", "s")):
        points = sorted((r["L"], r["value"]) for r in timed
                        if r["method"] == method and r["metric"] == "p99_ms" and r["candidates"] == n)
        left.plot(*zip(*points), marker=marker, label=f"{method} p99")
    left.set(xscale="log", yscale="log", xlabel="events in the history (L)", ylabel="ms per request",
             title=f"{n} candidates, one CPU thread")
    for color, size in enumerate(sorted({r["candidates"] for r in timed})):
        for metric, style in (("p50_ms", ":"), ("p99_ms", "-"), ("p99_cpu_ms", "--")):
            points = sorted((r["L"], r["value"]) for r in timed
                            if r["method"] == "vql" and r["metric"] == metric and r["candidates"] == size)
            right.plot(*zip(*points), style, color=f"C{color}", marker="o",
                       label=f"N={size} {metric[:-3].replace('_', ' ')}")
    right.set(xscale="log", ylim=(0, None), xlabel="events in the history (L)", ylabel="ms per request",
              title="vql (wall; cpu = thread CPU time)")
    save_figure(fig, [left, right], path)
