"""When an event is judged, and when it is folded: the time rules in one place.

An event carries its own time (``event_time_ms``), which the state's decay is computed from
and whose latest value is the user's landmark (design/vql.md section 6). Two clocks can
disagree with it:

- The worker's clock. Judging "too far in the future" against it alone dead-letters all live
  traffic when that clock is slow. An event is judged against the later of the worker's
  clock and its record's Kafka timestamp (the time the producer or broker stamped it), so
  the partition's own sense of now counts as much as the worker's.
- A producer's bug or hostility. An event dated a year ahead would move its user's landmark
  a year ahead for ever, and its decay weight would dominate the user's attention for that
  year. So no event is folded at more than ``max_lead_ms`` past its record's timestamp: the
  landmark can move at most that far beyond what the partition has actually seen.

Both rules depend on the record alone (its event time and its Kafka timestamp), never on
arrival order, so the state stays order-free, and every replay of the same records (the
topic replay, a replay of exported files, the verifier in tests/harness.py) folds each event
at exactly the same time as the worker did. Everyone calls these functions; none copies them.
"""

from __future__ import annotations

import numpy as np

NO_TIMESTAMP = -1  # a record without a Kafka timestamp (hand-made records, plain files)


def judged_against_ms(clock_ms: int, record_ms: np.ndarray) -> np.ndarray:
    """Per record, the time its event is judged against: the later of the worker's clock
    and the record's Kafka timestamp (the clock alone where the record has none)."""
    return np.maximum(np.asarray(record_ms, np.int64), np.int64(clock_ms))


def fold_time_s(event_time_ms: np.ndarray, record_ms: np.ndarray, max_lead_ms: int) -> np.ndarray:
    """Per event, the time (epoch seconds, float64) it is folded at: its own time, but never
    more than ``max_lead_ms`` past its record's Kafka timestamp (its own time where the
    record has none)."""
    event_ms = np.asarray(event_time_ms, np.int64)
    record = np.asarray(record_ms, np.int64)
    never = np.iinfo(np.int64).max
    lead = np.int64(max_lead_ms)
    # Saturating: a hostile record timestamp near the int64 limit must not wrap around.
    bound = np.where(record <= NO_TIMESTAMP, never, np.where(record > never - lead, never, record + lead))
    return np.minimum(event_ms, bound).astype(np.float64) / 1e3
