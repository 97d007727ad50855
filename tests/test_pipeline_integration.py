"""End to end against a real Kafka broker: behaviors -> worker -> user-states == offline.

Events come out of order (shuffled times per user), and are delivered more than once: the
worker is killed with SIGKILL mid-stream and restarted (its uncommitted records come again),
and at the end the consumer group is rewound to the start and every record is redelivered.
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.error
import urllib.request

import orjson
import pytest
from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.structs import OffsetAndMetadata

from harness import Pipeline, compare, recompute
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.kafka_security import kafka_python_security
from vql.streams.topics import TopicLayoutError, ensure_topics, produce_all, read_topic

pytestmark = pytest.mark.integration

BAD_RECORDS = [
    (b"user-x", b"not json at all"),
    (b"user-x", b'{"event_id": "e", "user_id": "user-x"'),
    (b"user-x", b'{"event_id": "e", "user_id": "user-x", "item_id": "seven"}'),
    (b"user-x", orjson.dumps({"event_id": "e", "user_id": "user-x", "item_id": 1, "action": "click",
                              "event_time_ms": 4_102_444_800_000, "context": {"category": 1, "modality": "video"}})),
    (None, b"\xff\xfe\x00"),
]


def produce(pipeline: Pipeline, records) -> int:
    return produce_all(pipeline.settings.kafka_bootstrap, pipeline.settings.behaviors_topic, records)


def rewind_group(pipeline: Pipeline) -> None:
    """Make the (stopped) worker group re-read every record: a full redelivery."""
    settings = pipeline.settings
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **kafka_python_security())
    try:
        admin.alter_group_offsets(settings.app_id, {
            TopicPartition(settings.behaviors_topic, p): OffsetAndMetadata(0, "", -1)
            for p in range(settings.partitions)
        })
    finally:
        admin.close()


def test_published_states_equal_offline_recomputation(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path)
    print(f"real Kafka broker at {kafka_bootstrap}, topics {pipeline.settings.behaviors_topic} ...")
    spec = DemoSpec(users=400, mean_events=15, heavy_users=2, heavy_events=2500, seed=11)
    records = list(generate(spec, now_ms=int(time.time() * 1000)))
    half = len(records) // 2
    try:
        first = pipeline.start_worker()
        total = produce(pipeline, records[:half] + BAD_RECORDS)
        # Kill -9 while it works through the first half: its uncommitted records come again.
        pipeline.wait_until_committed(1, poll_s=0.1)
        first.send_signal(signal.SIGKILL)
        first.wait()
        pipeline.start_worker()
        total += produce(pipeline, records[half:])
        pipeline.wait_until_committed(total)
        pipeline.stop_all()

        expected = recompute(pipeline.settings)
        published = pipeline.published()
        result = compare(pipeline.settings, published, expected.states)
        print("after kill -9 and restart:", result.summary())
        assert result.ok, result.summary()
        assert result.max_score_diff <= 1e-5

        # Every bad record is in the DLQ with a reason and its original bytes. A crash between
        # publishing a batch and writing it may dead-letter a record twice: readers
        # deduplicate on the source coordinates (docs/events.md).
        dlq = list(read_topic(kafka_bootstrap, pipeline.settings.dlq_topic))
        letters = {(dict(h)["source_partition"], dict(h)["source_offset"]): (dict(h)["reason"], value)
                   for _, _, _, value, h in dlq}
        assert len(expected.rejected) == len(BAD_RECORDS) == len(letters)
        for (partition, offset), rejection in expected.rejected.items():
            assert letters[(str(partition).encode(), str(offset).encode())][0] == rejection.reason.value.encode()
        assert sorted(value for _, value in letters.values()) == sorted(value for _, value in BAD_RECORDS)

        # A full redelivery of every record changes no state. (The worker commits each
        # partition straight to its store's processed offset on the first redelivered batch,
        # so the group may reach the end before every old record has come by: count those
        # that did.)
        rewind_group(pipeline)
        pipeline.start_worker()
        pipeline.wait_until_committed(total)
        pipeline.stop_all()
        result = compare(pipeline.settings, pipeline.published(), expected.states)
        print("after a full redelivery:", result.summary(), pipeline.batch_totals(2))
        totals = pipeline.batch_totals(2)
        assert totals["applied"] == 0 and totals["dead letters"] == 0 and 0 < totals["duplicates"] <= total
        assert result.ok, result.summary()
        assert len(list(read_topic(kafka_bootstrap, pipeline.settings.dlq_topic))) == len(dlq)
    finally:
        pipeline.stop_all()


def test_topics_are_created_with_their_layout_and_mismatches_refused(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    settings = pipeline.settings
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, **kafka_python_security())
    try:
        described = {t["name"]: t for t in admin.describe_topics(
            [settings.behaviors_topic, settings.states_topic, settings.dlq_topic])}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, settings.states_topic)])
        assert configs["topic"][settings.states_topic]["cleanup.policy"]["value"] == "compact"
    finally:
        admin.close()
    assert {name: len(t["partitions"]) for name, t in described.items()} == {
        settings.behaviors_topic: 2, settings.states_topic: 2, settings.dlq_topic: 2}
    with pytest.raises(TopicLayoutError, match="co-partitioned"):
        ensure_topics(settings.model_copy(update={"states_topic": settings.states_topic + ".other",
                                                  "partitions": 3, "behaviors_topic": settings.behaviors_topic}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_and_metrics_endpoints(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    port = free_port()
    pipeline.settings = pipeline.settings.model_copy(update={"web_port": port})
    try:
        pipeline.start_worker()
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                code, body = http_get(port, "/health")
                status = orjson.loads(body)["status"]
                if code == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert status == "ready", pipeline.worker_logs()
        records = list(generate(DemoSpec(users=20, mean_events=5, heavy_users=0, seed=3), int(time.time() * 1000)))
        total = produce(pipeline, records + BAD_RECORDS[:2])
        pipeline.wait_until_committed(total)
        code, body = http_get(port, "/metrics")
        text = body.decode()
        assert code == 200
        assert f'vql_records_total{{outcome="applied"}} {float(len(records))}' in text
        assert 'vql_dead_letters_total{reason="not_json"} 2.0' in text
        assert "vql_code_usage_entropy_bits{group=\"0\"}" in text
        assert "vql_consumer_lag_records" in text and "faust_" in text
        assert [http_get(port, path)[0] for path in ("/router/", "/table/", "/graph/", "/stats/")] == [404] * 4
    finally:
        pipeline.stop_all()
