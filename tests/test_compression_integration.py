"""Compressed batches on both topics, against the real broker.

Kafka producers compress whole record batches (gzip, snappy, lz4, zstd), and the consumer
must decode each codec: aiokafka through cramjam, kafka-python through python-snappy, lz4
and zstandard. A codec it lacks raises in the fetcher for the whole partition, which then
never moves again. Both topics are read compressed here: `behaviors` by the worker's
consumer, the states topic by the worker's restore (aiokafka) and by the group-less readers
(kafka-python) that followers and the verifier use.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer
from kafka import KafkaProducer

from harness import Pipeline, compare, recompute
from vql.schemas.user_state import decode_user_state
from vql.streams.demo_events import DemoSpec, generate
from vql.streams.kafka_security import aiokafka_security, kafka_python_security
from vql.streams.topics import ensure_topics, latest_by_key, read_topic

pytestmark = pytest.mark.integration

CODECS = ("gzip", "snappy", "lz4", "zstd")
CLIENTS = ("kafka-python", "aiokafka")

Record = tuple[bytes, bytes, int | None]  # key, value, partition (None: the key's partition)


def produce_kafka_python(bootstrap: str, topic: str, codec: str, records: list[Record]) -> None:
    client = KafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=50,
                           max_request_size=16 * 1024 * 1024, **kafka_python_security())
    try:
        for key, value, partition in records:
            client.send(topic, key=key, value=value, partition=partition)
        client.flush()
    finally:
        client.close()


async def _produce_aiokafka(bootstrap: str, topic: str, codec: str, records: list[Record]) -> None:
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=50,
                              max_request_size=16 * 1024 * 1024, **aiokafka_security())
    await client.start()
    try:
        sent = [await client.send(topic, key=key, value=value, partition=partition)
                for key, value, partition in records]
        await asyncio.gather(*sent)
    finally:
        await client.stop()


def produce_every_way(bootstrap: str, topic: str, records: list[Record]) -> None:
    """The records dealt round-robin to every (client, codec), each share in its own batches."""
    ways = [(client, codec) for client in CLIENTS for codec in CODECS]
    for i, (client, codec) in enumerate(ways):
        share = records[i::len(ways)]
        if client == "kafka-python":
            produce_kafka_python(bootstrap, topic, codec, share)
        else:
            asyncio.run(_produce_aiokafka(bootstrap, topic, codec, share))


def test_compressed_batches_on_both_topics_are_read(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=2)
    s = pipeline.settings
    now_ms = int(time.time() * 1000)
    first = [(k, v, None) for k, v in generate(DemoSpec(users=40, mean_events=10, heavy_users=0, seed=3), now_ms)]
    # Ids of their own: event-id windows stay on the host that saw them, and are not restored.
    later = [(k, v.replace(b'"event_id":"', b'"event_id":"later-'), None)
             for k, v in generate(DemoSpec(users=40, mean_events=4, heavy_users=0, seed=4), now_ms)]
    try:
        # behaviors, compressed every way, through the worker's consumer.
        produce_every_way(kafka_bootstrap, s.behaviors_topic, first)
        pipeline.start_worker(host="a")
        pipeline.wait_until_committed(len(first))
        pipeline.stop_all()

        # The states it published, copied into a new states topic compressed every way (each
        # to its partition), which a worker on a new host restores from before it folds more
        # compressed events on top.
        compressed_states = f"{s.states_topic}.compressed"
        ensure_topics(s.model_copy(update={"states_topic": compressed_states}))
        published = [(key, value, partition)
                     for partition, _o, key, value, _h in read_topic(kafka_bootstrap, s.states_topic)]
        assert published
        produce_every_way(kafka_bootstrap, compressed_states, published)
        produce_every_way(kafka_bootstrap, s.behaviors_topic, later)
        pipeline.start_worker(host="b", states_topic=compressed_states)
        pipeline.wait_until_committed(len(first) + len(later))
        pipeline.stop_all()
    finally:
        pipeline.stop_all()

    log = (s.data_dir / "worker-1.log").read_text()
    restored = sum(int(line.split("restored ")[1].split()[0]) for line in log.splitlines()
                   if "restored " in line and compressed_states in line)
    assert restored == len({key for key, _v, _p in published}), log[-5000:]

    # Read back with kafka-python (the followers' reader): compressed records from both clients.
    states = {key.decode(): value for key, value in
              latest_by_key(read_topic(kafka_bootstrap, compressed_states)).items()}
    result = compare(s, {user: decode_user_state(value) for user, value in states.items()},
                     recompute(s).states)
    print(f"{len(first) + len(later)} compressed events, {len(published)} compressed states restored:",
          result.summary())
    assert result.ok and result.events_expected == len(first) + len(later), result.summary()
