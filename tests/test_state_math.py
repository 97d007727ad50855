"""The invariants of design/vql.md section 8 that hold without Kafka (1, 2 and 5), and the
section 6 properties behind them (mergeable, idempotent, exact landmark moves)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vql.model.config import ModelConfig
from vql.model.encoder import VQLModel
from vql.model.features import BehaviorColumns, Candidates
from vql.model.scoring import Scorer
from vql.model.artifact import load_artifact
from vql.model.state import apply_events, empty_state, merge_states, read_log_count
from vql.schemas.user_state import UserState, encode_user_state, full_state_bytes

T_BASE = 1.7e9
SMALL = dict(item_buckets=512, category_buckets=64, item_dim=8, category_dim=4, action_dim=4, modality_dim=4)


def make_model(tmp_path, **overrides) -> tuple[VQLModel, Scorer]:
    model = VQLModel(ModelConfig(**{**SMALL, **overrides}))
    path = tmp_path / f"model-{abs(hash(tuple(sorted(overrides.items()))))}.npz"
    model.save(path)
    return model, Scorer(load_artifact(path))


def random_events(rng: np.random.Generator, n: int, span_s: float = 30 * 86400) -> BehaviorColumns:
    return BehaviorColumns(
        item=rng.integers(0, 10_000, n),
        action=rng.integers(0, 8, n),
        category=rng.integers(0, 100, n),
        modality=rng.integers(0, 5, n),
        time_s=T_BASE + rng.uniform(0, span_s, n),
    )


def random_candidates(rng: np.random.Generator, n: int) -> Candidates:
    return Candidates(item=rng.integers(0, 10_000, n), category=rng.integers(0, 100, n), modality=rng.integers(0, 5, n))


def build_state(model: VQLModel, version: str, events: BehaviorColumns, chunks: list[np.ndarray]) -> UserState:
    cfg = model.config
    state = empty_state("u", version, (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim))
    codes, values = model.encode(events)
    for rows in chunks:
        apply_events([state], np.zeros(rows.size, np.int64), codes[rows], values[rows].astype(np.float64),
                      events.time_s[rows], np.asarray(cfg.decay_rates))
    return state


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    length=st.integers(0, 400),
    groups=st.sampled_from([1, 2, 4]),
    codes=st.integers(2, 24),
    half_lives=st.lists(st.floats(60.0, 400 * 86400.0), min_size=1, max_size=4),
    ahead_s=st.floats(0.0, 90 * 86400.0),
)
def test_cache_path_equals_quantized_full_attention(tmp_path_factory, seed, length, groups, codes, half_lives, ahead_s):
    """Invariant 1: scoring from the per-code state == quantized attention over raw events."""
    model, scorer = make_model(tmp_path_factory.mktemp("m"), groups=groups, codes=codes,
                               half_lives_s=tuple(half_lives), heads=4, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    events = random_events(rng, length)
    state = build_state(model, scorer.version, events, np.array_split(rng.permutation(length), 3))
    candidates = random_candidates(rng, 7)
    now = (events.time_s.max() if length else T_BASE) + ahead_s
    expected = model.attend(events, candidates, now).numpy()
    assert np.abs(scorer.score(state, candidates, now).interest - expected).max() <= 1e-5


def test_cache_path_equals_full_attention_at_long_history(tmp_path):
    """Invariant 1 at L = 10^5 with the default config."""
    model = VQLModel(ModelConfig())
    model.save(tmp_path / "m.npz")
    scorer = Scorer(load_artifact(tmp_path / "m.npz"))
    rng = np.random.default_rng(1)
    events = random_events(rng, 100_000, span_s=365 * 86400)
    state = build_state(model, scorer.version, events, np.array_split(np.arange(100_000), 10))
    candidates = random_candidates(rng, 16)
    now = events.time_s.max() + 3600
    expected = model.attend(events, candidates, now).numpy()
    assert np.abs(scorer.score(state, candidates, now).interest - expected).max() <= 1e-5


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(1, 300), splits=st.integers(1, 6))
def test_any_order_and_batching_gives_the_same_state(tmp_path_factory, seed, length, splits):
    """Invariant 2: incremental updates in any order == building the state in one batch."""
    model, scorer = make_model(tmp_path_factory.mktemp("m"))
    rng = np.random.default_rng(seed)
    events = random_events(rng, length)
    whole = build_state(model, scorer.version, events, [np.arange(length)])
    shuffled = build_state(model, scorer.version, events, np.array_split(rng.permutation(length), splits))
    assert_same_state(whole, shuffled)


def test_merging_disjoint_halves_equals_the_whole(tmp_path):
    model, scorer = make_model(tmp_path)
    rng = np.random.default_rng(3)
    events = random_events(rng, 500)
    rows = rng.permutation(500)
    whole = build_state(model, scorer.version, events, [rows])
    first = build_state(model, scorer.version, events, [rows[:200]])
    second = build_state(model, scorer.version, events, [rows[200:]])
    assert_same_state(whole, merge_states(first, second, np.asarray(model.config.decay_rates)))


def test_redelivered_offsets_are_applied_once(tmp_path):
    """At-least-once delivery: events at or below the applied offset are duplicates."""
    model, scorer = make_model(tmp_path)
    cfg = model.config
    rng = np.random.default_rng(4)
    events = random_events(rng, 100)
    codes, values = model.encode(events)
    state = empty_state("u", scorer.version, (cfg.groups, cfg.codes, cfg.rates, cfg.group_dim))
    owner, offsets, rates = np.zeros(100, np.int64), np.arange(100), np.asarray(cfg.decay_rates)
    apply_events([state], owner[:60], codes[:60], values[:60], events.time_s[:60], rates, offsets[:60])
    # A redelivery of 40..99 after a crash: 40..59 must be skipped.
    applied = apply_events([state], owner[40:], codes[40:], values[40:], events.time_s[40:], rates, offsets[40:])
    assert applied.sum() == 40 and state.event_count == 100 and state.applied_offset == 99
    once = build_state(model, scorer.version, events, [np.arange(100)])
    assert_same_state(once, state, check_offsets=False)


def test_landmark_moves_are_exact(tmp_path):
    """Reading the state at any time gives the directly computed decayed log-counts."""
    model, scorer = make_model(tmp_path, groups=1, codes=2, heads=1)
    rng = np.random.default_rng(5)
    events = random_events(rng, 50)
    state = build_state(model, scorer.version, events, np.array_split(np.arange(50), 5))
    codes, _ = model.encode(events)
    now = events.time_s.max() + 7 * 86400
    rates = np.asarray(model.config.decay_rates)
    for code in range(2):
        members = codes[:, 0] == code
        direct = np.log(np.exp(-rates[None, :] * (now - events.time_s[members, None])).sum(0))
        np.testing.assert_allclose(read_log_count(state, now, rates)[0, code], direct, rtol=1e-9)


@pytest.mark.parametrize("length", [10, 1_000, 100_000])
def test_state_bytes_do_not_grow_with_history(tmp_path, length):
    """Invariant 5: the published state is bounded by G*K*R cells whatever L is."""
    model = VQLModel(ModelConfig())
    cfg = model.config
    rng = np.random.default_rng(length)
    state = build_state(model, "0" * 16, random_events(rng, length), [np.arange(length)])
    full = full_state_bytes(cfg.groups, cfg.codes, cfg.rates, cfg.group_dim, len("u"))
    size = len(encode_user_state(state))
    assert size <= full <= 16 * 1024
    if length >= 1_000:  # every code in use: the state is full, and stays that size
        assert size == full


def assert_same_state(a: UserState, b: UserState, check_offsets: bool = True) -> None:
    assert a.event_count == b.event_count
    assert a.landmark_t0 == pytest.approx(b.landmark_t0, abs=0)
    assert np.array_equal(np.isfinite(a.log_count), np.isfinite(b.log_count))
    finite = np.isfinite(a.log_count)
    np.testing.assert_allclose(a.log_count[finite], b.log_count[finite], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-9, atol=1e-9)
    if check_offsets:
        assert a.applied_offset == b.applied_offset
