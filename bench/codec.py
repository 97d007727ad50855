"""`vql bench codec`: the worker's per-record and per-state codecs, without Kafka.

- events: microseconds a record of demo events through ``decode_event`` one by one, and
  through ``decode_batch`` a micro-batch at a time (the worker's path);
- states: microseconds a state to encode a batch of states (float32 for the topic, float64
  for the store), to decode a batch into empty rows (a store load), and to decode one state
  alone (what a ranker does per request).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from vql.bench.report import emit
from vql.model.config import ModelConfig
from vql.schemas.batch_decode import decode_batch
from vql.schemas.decode import EventPolicy, decode_event
from vql.schemas.user_state import StateBatch, decode_states, decode_user_state, encode_states
from vql.streams.demo_events import DemoSpec, generate


def _seconds_per_call(call: Callable[[], object], seconds: float) -> float:
    call()  # warm-up
    done, started = 0, time.perf_counter()
    while True:
        call()
        done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 3:
            return elapsed / done


def events(batch: int, seconds: float) -> None:
    records = list(generate(DemoSpec(users=1000, mean_events=max(batch // 1000 + 1, 5), heavy_users=0),
                            int(time.time() * 1000)))[:batch]
    values, keys = [v for _k, v in records], [k for k, _v in records]
    now_ms, policy = int(time.time() * 1000), EventPolicy()
    one = _seconds_per_call(lambda: [decode_event(v, k, now_ms, policy) for v, k in zip(values, keys)], seconds)
    whole = _seconds_per_call(lambda: decode_batch(values, keys, now_ms, policy), seconds)
    for path, per_batch in (("decode_event", one), ("decode_batch", whole)):
        emit("codec", "us_per_record", per_batch / len(values) * 1e6, "us", path=path, batch=len(values))


def states(count: int, occupancy: float, seconds: float) -> None:
    cfg = ModelConfig()
    shape = (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim)
    rng = np.random.default_rng(0)
    batch = StateBatch.empty([f"user-{i:06d}" for i in range(count)], "0" * 16, shape)
    occupied = rng.random(batch.log_count.shape) < occupancy
    batch.log_count[occupied] = -rng.random(int(occupied.sum()))
    batch.mean[occupied] = rng.standard_normal((int(occupied.sum()), shape[3]))
    stored = encode_states(batch, np.float64)
    cells = int(occupied.sum()) // count
    timed = {
        "encode_float32": lambda: encode_states(batch, np.float32),
        "encode_float64": lambda: encode_states(batch, np.float64),
        "decode_batch": lambda: decode_states(stored, into=StateBatch.empty(batch.user_ids, batch.model_version, shape),
                                              rows=np.arange(count), rows_empty=True),
    }
    for step, call in timed.items():
        emit("codec", "us_per_state", _seconds_per_call(call, seconds) / count * 1e6, "us", step=step,
             states=count, cells_per_state=cells)
    emit("codec", "us_per_state", _seconds_per_call(lambda: decode_user_state(stored[0]), seconds) * 1e6, "us",
         step="decode_one", states=1, cells_per_state=cells)


def run(batch: int, count: int, occupancy: float, seconds: float) -> None:
    events(batch, seconds)
    states(count, occupancy, seconds)
