"""Fault injection for worker processes started by the fault tests (never installed).

A test puts this directory first on a worker's PYTHONPATH and names a fault in
``VQL_TEST_RESTORE_FAULT``; Python imports this module at start-up, before the worker's
modules, and wraps the changelog restore of an assigned partition so that it fails as a
broker or a store would:

- ``kafka:<path>``: a KafkaConnectionError while the file at <path> exists (the test
  removes it to let the broker "come back");
- ``store``: a StoreError on every try (a store that cannot be written).

Everything else (broker, topics, RocksDB, model) is real.
"""

from __future__ import annotations

import os
from pathlib import Path

_FAULT = os.environ.get("VQL_TEST_RESTORE_FAULT", "")

if _FAULT:
    from aiokafka.errors import KafkaConnectionError

    import vql.streams.changelog as changelog
    from vql.streams.state_store import StoreError

    _restore = changelog.restore_partition

    async def _faulty_restore(store, bootstrap, topic, partition, model_version, purpose="assigned", **options):
        if purpose == "assigned":
            if _FAULT.startswith("kafka:") and Path(_FAULT[len("kafka:"):]).exists():
                raise KafkaConnectionError(f"injected: no connection to the leader of {topic}-{partition}")
            if _FAULT == "store":
                raise StoreError(f"injected: cannot write the store at {store.path}")
        return await _restore(store, bootstrap, topic, partition, model_version, purpose, **options)

    changelog.restore_partition = _faulty_restore
