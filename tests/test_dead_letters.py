"""Dead letters always fit the DLQ topic: cut to its max.message.bytes as a record batch,
headers and key counted, and sent in batches the topic accepts (streams/dead_letters.py).
The integration test holds the worker to that against the real broker."""

from __future__ import annotations

import time

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import given, settings as hsettings, strategies as st
from kafka.admin import ConfigResource, ConfigResourceType

from harness import Pipeline
from vql.schemas.decode import Reason, Rejection
from vql.streams.consumer import dead_letter
from vql.streams.dead_letters import fit, topic_limit
from vql.streams.processor import DeadLetter, RawRecord
from vql.streams.topics import admin, producer, read_topic


def batch_bytes(key, value, headers) -> int:
    """The record batch of one record as the producer builds it."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 30)
    builder.append(0, timestamp=int(time.time() * 1000), key=key, value=value, headers=headers)
    return len(builder.build())


def test_a_dead_letter_larger_than_the_limit_is_cut_and_says_so():
    letter = DeadLetter(RawRecord(3, 77, b"k", b"x" * 50_000), Rejection(Reason.OVERSIZED, "too big"))
    key, value, headers = dead_letter(letter, "behaviors", max_bytes=8192)
    h = dict(headers)
    assert key == b"k" and h["truncated"] == b"1" and h["original_bytes"] == b"50000"
    assert value == b"x" * len(value) and 8192 - 400 < len(value) < 8192
    assert batch_bytes(key, value, headers) <= 8192
    assert (h["reason"], h["source_partition"], h["source_offset"]) == (b"oversized", b"3", b"77")
    key, value, headers = dead_letter(letter, "behaviors", max_bytes=100_000)
    assert value == b"x" * 50_000 and "truncated" not in dict(headers)


@hsettings(max_examples=200, deadline=None)
@given(key=st.one_of(st.none(), st.binary(max_size=20_000)), value=st.one_of(st.none(), st.binary(max_size=60_000)),
       detail=st.text(max_size=300), limit=st.integers(4096, 70_000))
def test_every_letter_fits_its_limit_and_is_a_prefix_of_the_original(key, value, detail, limit):
    headers = [("reason", b"not_json"), ("detail", detail.encode())]
    got_key, got_value, got_headers = fit(key, value, headers, limit)
    assert batch_bytes(got_key, got_value, got_headers) <= limit
    h = dict(got_headers)
    assert got_value == (value[:len(got_value)] if value is not None else None)
    assert got_key == (key[:len(got_key)] if key is not None else None)
    assert ("truncated" in h) == (value is not None and got_value != value)
    if "truncated" in h:
        assert int(h["original_bytes"]) == len(value)




@pytest.mark.integration
def test_huge_dead_letters_fit_the_dlq_topic_and_the_worker_stays_up(kafka_bootstrap, tmp_path):
    """The DLQ topic accepts 300,000 bytes a record batch (as a cluster's topic may, whatever
    the worker would have set): a 3 MB malformed event, and forty 100 KB ones that would
    share producer batches, must all be dead-lettered, cut to fit."""
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=1)
    s = pipeline.settings
    limit = 300_000
    client = admin(kafka_bootstrap)
    try:
        created = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.dlq_topic)],
                                          config_filter="all")["topic"][s.dlq_topic]
        client.alter_configs([ConfigResource(ConfigResourceType.TOPIC, s.dlq_topic,
                                             configs={"max.message.bytes": str(limit)})])
    finally:
        client.close()
    # Set at creation from VQL_MAX_DEAD_LETTER_BYTES.
    assert created["max.message.bytes"]["value"] == str(s.max_dead_letter_bytes)
    deadline = time.monotonic() + 30
    while topic_limit(s) != limit and time.monotonic() < deadline:
        time.sleep(0.5)

    huge = b"{" + b"x" * 3_000_000
    bad = [huge] + [b"[" + bytes([65 + i % 26]) * 100_000 for i in range(40)]
    out = producer(kafka_bootstrap)
    for value in bad:
        out.send(s.behaviors_topic, key=b"user-1", value=value)
    out.flush()
    out.close()
    try:
        pipeline.start_worker()
        pipeline.wait_until_committed(len(bad))
        alive = all(w.poll() is None for w in pipeline.workers)
    finally:
        pipeline.stop_all()
    assert alive, pipeline.worker_logs()

    letters = sorted(read_topic(kafka_bootstrap, s.dlq_topic), key=lambda r: int(dict(r[4])["source_offset"]))
    assert len(letters) == len(bad)
    for (_p, _o, key, value, headers), original in zip(letters, bad):
        h = dict(headers)
        assert key == b"user-1" and original.startswith(value)
        assert batch_bytes(key, value, list(headers)) <= limit
        assert ("truncated" in h) == (len(original) > limit)
    assert int(dict(letters[0][4])["original_bytes"]) == len(huge)
