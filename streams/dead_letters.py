"""Dead letters that the DLQ topic always accepts.

A dead letter carries the original record, and the original can be as large as whatever a
producer managed to send. The DLQ topic refuses a record batch larger than its
``max.message.bytes``; a refused dead letter fails the publication, and a failed publication
stops the worker (streams/consumer.py). So every letter is cut to fit the topic's limit as a
batch of its own, headers, key and record framing counted, and letters travel on a producer
whose batches never exceed that limit either.

The limit is the smaller of ``VQL_MAX_DEAD_LETTER_BYTES`` (set as the topic's
``max.message.bytes`` when the worker creates it) and what the existing topic says.
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from vql.streams import record_limits
from vql.streams.kafka_security import aiokafka_security
from vql.streams.record_limits import FRAMING_MARGIN, Headers, record_bytes
from vql.streams.settings import Settings

# A record key longer than this share of the limit is cut as well (a key cannot be mended
# from the headers, but a hostile key must not leave no room for the value).
MAX_KEY_SHARE = 4
# The producer's batches are never larger than this, whatever the topic allows: letters are
# rare, and large batches only delay them.
MAX_BATCH_BYTES = 1024 * 1024


def fit(key: bytes | None, value: bytes | None, headers: Headers, limit: int
        ) -> tuple[bytes | None, bytes | None, Headers]:
    """The letter cut to at most ``limit`` bytes as a record batch: the value first (headers
    ``truncated`` and ``original_bytes``), then, if the key alone leaves no room, the key
    (``key_truncated``, ``original_key_bytes``). A letter that fits is returned as it is."""
    if record_bytes(key, value, headers) <= limit:
        return key, value, headers
    headers = list(headers)
    if key is not None and len(key) > limit // MAX_KEY_SHARE:
        headers += [("key_truncated", b"1"), ("original_key_bytes", str(len(key)).encode())]
        key = key[:limit // MAX_KEY_SHARE]
    if value is not None:
        headers += [("truncated", b"1"), ("original_bytes", str(len(value)).encode())]
        # Less the bytes the value's and the record's length varints grow by (4 each at most).
        room = limit - record_bytes(key, b"", headers) - 8
        value = value[:max(0, room)]
    if record_bytes(key, value, headers) > limit:
        raise ValueError(f"a dead letter's headers alone exceed the DLQ limit of {limit} bytes")
    return key, value, headers


def topic_limit(settings: Settings) -> int:
    """The DLQ topic's ``max.message.bytes``, capped by ``max_dead_letter_bytes``."""
    return record_limits.topic_limit(settings, settings.dlq_topic, settings.max_dead_letter_bytes,
                                     "VQL_MAX_DEAD_LETTER_BYTES")


def letter_batch_bytes(limit: int) -> int:
    """A batch size whose batches, of one letter or many, fit a DLQ limit of ``limit``."""
    return min(limit, MAX_BATCH_BYTES) - FRAMING_MARGIN


def letter_producer(settings: Settings, limit: int) -> AIOKafkaProducer:
    """A producer for dead letters: its batches, of one letter or many, fit ``limit``."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
        max_batch_size=letter_batch_bytes(limit),
        max_request_size=limit, **aiokafka_security(),
    )
