"""A model whose states the states topic would refuse is refused at start, by name of the
setting to change (streams/state_limits.py)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from harness import Pipeline
from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.model.state import empty_state
from vql.schemas.user_state import encode_user_state
from vql.streams.record_limits import record_bytes
from vql.streams.state_limits import (
    MAX_USER_ID_BYTES,
    StateLimitError,
    check_states_fit,
    largest_state_record,
)

LARGE = ModelConfig(codes=4096)  # 2 x 4096 x 3 cells of 16 floats: about 1.7 MB a state


def full_state(config: ModelConfig, user_id: str):
    state = empty_state(user_id, "v" * 16, (config.groups, config.codes, config.rates, config.group_dim))
    state.log_count[:] = 1.0  # every cell occupied: the most a user can cost
    state.mean[:] = 0.5
    state.event_count = 10**9
    return state


@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(codes=256), LARGE])
def test_the_bound_holds_for_a_full_state_under_the_longest_user_id(config):
    user_id = "\U0001F600" * (MAX_USER_ID_BYTES // 4)  # 128 characters of 4 bytes
    blob = encode_user_state(full_state(config, user_id), np.float32)
    real = record_bytes(user_id.encode(), blob)
    assert real <= largest_state_record(config) < real + 64


def test_the_default_model_fits_and_a_large_one_is_refused_naming_the_setting():
    assert check_states_fit(ModelConfig(), 1024 * 1024, "user-states") < 16 * 1024
    with pytest.raises(StateLimitError, match="VQL_MAX_STATE_BYTES") as refused:
        check_states_fit(LARGE, 1024 * 1024, "user-states")
    assert "max.message.bytes" in str(refused.value) and "user-states" in str(refused.value)
    assert check_states_fit(LARGE, 2 * 1024 * 1024, "user-states") > 1024 * 1024


@pytest.mark.integration
def test_a_worker_with_states_too_large_for_the_topic_refuses_to_start(kafka_bootstrap, tmp_path):
    pipeline = Pipeline.create(kafka_bootstrap, tmp_path, partitions=1)
    VQLModel(LARGE).save(pipeline.settings.model_path)
    worker = pipeline.start_worker()
    try:
        code = worker.wait(timeout=120)
    except subprocess.TimeoutExpired:
        code = None  # still running: it would publish states the topic refuses
    finally:
        pipeline.stop_all()
    assert code == 2, pipeline.worker_logs()
    log = pipeline.worker_logs()
    assert "VQL_MAX_STATE_BYTES" in log and pipeline.settings.states_topic in log, log


@pytest.mark.integration
def test_a_replay_that_would_publish_states_too_large_is_refused_before_any_work(kafka_bootstrap, tmp_path):
    import os
    import sys

    VQLModel(LARGE).save(tmp_path / "large.npz")
    out = subprocess.run(
        [sys.executable, "-m", "vql.streams.cli", "replay", "--files", str(tmp_path / "none.parquet"), "--model",
         str(tmp_path / "large.npz"), "--data-dir", str(tmp_path), "--publish", "never-created.states",
         "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VQL_KAFKA_BOOTSTRAP": kafka_bootstrap})
    assert out.returncode == 1 and "VQL_MAX_STATE_BYTES" in out.stderr, out.stderr
