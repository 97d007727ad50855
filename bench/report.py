"""The benchmarks' one output format: one JSON object per line, per figure."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(bench: str, metric: str, value: float, unit: str, **params: Any) -> None:
    """Print ``{"bench", "metric", "value", "unit", **params}`` as one line, flushed."""
    record = {"bench": bench, "metric": metric, "value": round(float(value), 3), "unit": unit, **params}
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
