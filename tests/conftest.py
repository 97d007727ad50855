"""Shared pytest fixtures. Add new fixtures as their own sections below."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Make the helper modules in tests/ (kafka_broker, ...) importable by plain name, whatever
# import mode or rootdir pytest runs with.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import kafka_broker  # noqa: E402


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------------------- Kafka


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap address of a real Kafka broker (see tests/kafka_broker.py).

    Without one, the test is skipped, except on CI (CI set), where that is a failure:
    CI must not go green by skipping every integration test.
    """
    try:
        return kafka_broker.find_bootstrap()
    except RuntimeError as exc:
        reason = str(exc)
    # Outside the except block, so the report is the reason alone, not a chained traceback.
    if _on_ci():
        pytest.fail(f"no Kafka broker on CI:\n{reason}", pytrace=False)
    pytest.skip(f"no Kafka broker: {reason}")
