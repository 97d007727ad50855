"""The bad-input suite against the real broker: every kind of unusable record from the
contract tests (tests/test_schemas_events.py, ~90 kinds), plus clock-relative and oversized
ones, mixed among good events. Every bad record must reach the DLQ with its reason and
original bytes, every good event must be applied, and the worker must stay up."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest

from harness import Pipeline, compare, recompute
from test_schemas_events import BAD_INPUTS, event_fields, to_raw
from vql.schemas.decode import Reason
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.topics import producer, read_topic

pytestmark = pytest.mark.integration

# Their expected reasons depend on the contract tests' fixed clock, not the worker's.
CLOCK_RELATIVE = {Reason.FUTURE_EVENT_TIME, Reason.EVENT_TIME_BEFORE_HORIZON}


def clock_cases(now_ms: int) -> list[tuple[bytes | None, bytes | None, Reason, str]]:
    key = b"user-1"
    return [
        (to_raw(event_fields(event_time_ms=now_ms + 10 * 86_400_000)), key, Reason.FUTURE_EVENT_TIME, "ten_days_ahead"),
        (to_raw(event_fields(event_time_ms=631_152_000_000)), key, Reason.EVENT_TIME_BEFORE_HORIZON, "year_1990"),
        (to_raw(event_fields(event_time_ms=0)), key, Reason.EVENT_TIME_BEFORE_HORIZON, "epoch_zero"),
        (b'{"pad": "' + b"x" * (10 * 1024 * 1024) + b'"}', key, Reason.OVERSIZED, "ten_megabytes"),
    ]


def test_every_bad_record_is_dead_lettered_and_every_good_one_applied(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    now_ms = int(time.time() * 1000)
    # A keyless record is dead-lettered for that before its value is read (schemas/placement.py).
    bad = [(p.values[0], p.values[1], Reason.MISSING_KEY if p.values[1] is None else p.values[2], p.id)
           for p in BAD_INPUTS if p.values[2] not in CLOCK_RELATIVE]
    bad += clock_cases(now_ms)
    good = list(generate(DemoSpec(users=50, mean_events=20, heavy_users=0, seed=5), now_ms))
    # Shuffled together, so that bad and good records share micro-batches.
    records = good + [(key, raw) for raw, key, _reason, _name in bad]
    records = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    # Duplicate event ids, after their originals: a producer's retry (the same bytes) and an
    # id reused for another behavior.
    for key, value in good[:3]:
        records.append((key, value))
        bad.append((value, key, Reason.DUPLICATE_EVENT_ID, "producer_retry"))
    key, value = good[3]
    reused = orjson.loads(value) | {"item_id": 123_456}
    records.append((key, orjson.dumps(reused)))
    bad.append((orjson.dumps(reused), key, Reason.DUPLICATE_EVENT_ID, "reused_event_id"))
    try:
        pipeline.start_worker()
        client = producer(kafka_bootstrap)
        for key, value in records:
            client.send(pipeline.settings.behaviors_topic, key=key, value=value)
        client.flush()
        client.close()
        pipeline.wait_until_committed(len(records))
        alive = all(w.poll() is None for w in pipeline.workers)
        pipeline.stop_all()
    finally:
        pipeline.stop_all()
    assert alive, pipeline.worker_logs()

    letters = {}
    for _p, _o, _k, value, headers in read_topic(kafka_bootstrap, pipeline.settings.dlq_topic):
        h = dict(headers)
        letters[(h["source_partition"], h["source_offset"])] = (value, h["reason"].decode(), h.get("original_bytes"))
    expected_reasons = sorted(reason.value for _raw, _key, reason, _name in bad)
    assert sorted(reason for _value, reason, _size in letters.values()) == expected_reasons

    def original(value: bytes | None, size: bytes | None) -> bytes:
        """A letter's bytes; a cut one (larger than the DLQ topic accepts) stands for the bad
        record whose prefix and size it gives."""
        if size is None:
            return value or b""
        return next(raw for raw, *_ in bad if raw and len(raw) == int(size) and raw.startswith(value))

    assert sum(size is not None for _v, _r, size in letters.values()) == 1  # the ten megabytes
    assert sorted(original(v, size) for v, _r, size in letters.values()) == sorted(raw or b"" for raw, *_ in bad)

    expected = recompute(pipeline.settings)
    result = compare(pipeline.settings, pipeline.published(), expected.states)
    print(f"{len(bad)} kinds of bad records, {len(good)} good events:", result.summary())
    assert result.ok and result.events_expected == len(good), result.summary()
