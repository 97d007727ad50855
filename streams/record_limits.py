"""How large a record a topic accepts, and how large a record batch is: shared by the dead
letters (cut to fit their topic) and the states (a model whose states cannot fit is refused).

Kafka checks a topic's ``max.message.bytes`` against each record batch as the producer sent
it; a refused batch fails the publication, and a failed publication stops the worker.
"""

from __future__ import annotations

import logging

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError

from vql.streams.settings import Settings
from vql.streams.topics import BrokerUnavailable, admin

log = logging.getLogger("vql.record_limits")

Headers = list[tuple[str, bytes]]

# Room left for what the size estimate cannot know in advance (varint widths of the offset
# and timestamp deltas, the batch's producer fields): a few bytes, kept generous.
FRAMING_MARGIN = 64


def record_bytes(key: bytes | None, value: bytes | None, headers: Headers = ()) -> int:
    """The size of a record batch holding only this record, as the broker checks it
    against ``max.message.bytes`` (uncompressed), with a margin."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)) + FRAMING_MARGIN


def topic_limit(settings: Settings, topic: str, wanted: int, setting: str) -> int:
    """``topic``'s ``max.message.bytes`` as the broker reports it, capped by ``wanted`` (the
    value of ``setting``, which the worker sets at the topic's creation); ``wanted`` alone
    when the broker cannot say."""
    try:
        client = admin(settings.kafka_bootstrap)
    except BrokerUnavailable:
        return wanted
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic)
        config = client.describe_configs([resource], config_filter="all")["topic"][topic]
        actual = int(config["max.message.bytes"]["value"])
    except (KafkaError, KeyError, TypeError, ValueError) as exc:
        log.warning("cannot read max.message.bytes of %s (%s): taking %s=%d", topic, exc, setting, wanted)
        return wanted
    finally:
        client.close()
    if actual < wanted:
        log.warning("%s accepts record batches of at most %d bytes (max.message.bytes), less than %s=%d: "
                    "the topic's limit holds", topic, actual, setting, wanted)
    return min(actual, wanted)
