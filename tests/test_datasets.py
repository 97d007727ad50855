"""The training data layer (research/datasets.py): layout invariants, leak-free batching, and the
planted signal that the synthetic set exists to carry (full, time-decayed history beats the
last 50 behaviors, time-blind pooling and category filtering)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vql.research.datasets import (
    Dataset,
    DatasetUnavailable,
    Histories,
    Samples,
    SyntheticSpec,
    decayed_match_share,
    default_cache_dir,
    history_lengths,
    load_dataset,
    load_movielens_100k,
    make_synthetic,
    user_batches,
)

# Small enough to build in about a second, large enough for AUCs within ~0.01.
SMALL = SyntheticSpec(users=800, events_per_user=4000, targets_per_user=16, seed=3)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U), ties counted half."""
    score = np.asarray(score, np.float64)
    positive = np.asarray(label) > 0.5
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each value
    ranks = mid_rank[inverse]
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper():
    assert auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5


@pytest.fixture(scope="module")
def small() -> Dataset:
    return make_synthetic(SMALL)


def all_samples(data: Dataset) -> Samples:
    return Samples(**{
        name: np.concatenate([getattr(data.train, name), getattr(data.test, name)])
        for name in ("user", "item", "category", "modality", "time_s", "history_end", "label")
    })


# ---------------------------------------------------------------------------- synthetic layout


def test_synthetic_is_deterministic_for_a_seed(small):
    again = make_synthetic(SMALL)
    for name in ("offsets", "item", "action", "category", "modality", "time_s"):
        np.testing.assert_array_equal(getattr(small.histories, name), getattr(again.histories, name))
    for part in ("train", "test"):
        for name in ("user", "item", "category", "modality", "time_s", "history_end", "label"):
            np.testing.assert_array_equal(getattr(getattr(small, part), name), getattr(getattr(again, part), name))
    assert small.description == again.description
    other = make_synthetic(SyntheticSpec(users=50, events_per_user=500, seed=4))
    same = make_synthetic(SyntheticSpec(users=50, events_per_user=500, seed=4))
    changed = make_synthetic(SyntheticSpec(users=50, events_per_user=500, seed=5))
    np.testing.assert_array_equal(other.histories.item, same.histories.item)
    assert not np.array_equal(other.histories.item, changed.histories.item)


def test_synthetic_layout(small):
    h = small.histories
    h.validate()
    assert h.num_users == SMALL.users and h.num_events == SMALL.users * SMALL.events_per_user
    for name in ("offsets", "item", "action", "category", "modality"):
        assert getattr(h, name).dtype == np.int64
    assert h.time_s.dtype == np.float64
    grid = h.time_s.reshape(SMALL.users, SMALL.events_per_user)
    assert np.all(np.diff(grid, axis=1) >= 0), "histories must be sorted by time per user"
    assert grid[:, -1].max() - grid[:, 0].min() < (SMALL.span_days + 8) * 86400
    assert h.item.min() >= 0 and h.item.max() < SMALL.categories * SMALL.items_per_category
    assert h.category.max() < SMALL.categories
    np.testing.assert_array_equal(h.category, h.item // SMALL.items_per_category)
    assert 0 <= h.action.min() and h.action.max() < 8 and 0 <= h.modality.min() and h.modality.max() < 5


def test_synthetic_samples_see_only_their_past(small):
    h = small.histories
    for part in (small.train, small.test):
        part.validate(h)
        start, stop = h.offsets[part.user], h.offsets[part.user + 1]
        assert np.all((start <= part.history_end) & (part.history_end <= stop))
        seen = part.history_end > start
        assert np.all(h.time_s[part.history_end[seen] - 1] <= part.time_s[seen])
        assert part.label.dtype == np.float32 and set(np.unique(part.label)) <= {0.0, 1.0}
        np.testing.assert_array_equal(part.category, part.item // SMALL.items_per_category)
    # split by user: no user on both sides, test share as specified
    train_users, test_users = set(small.train.user.tolist()), set(small.test.user.tolist())
    assert not train_users & test_users
    assert len(test_users) == round(SMALL.test_fraction * SMALL.users)
    rate = np.concatenate([small.train.label, small.test.label]).mean()
    assert 0.28 < rate < 0.5, rate


def test_default_spec_size_and_speed():
    start = time.perf_counter()
    data = make_synthetic()
    elapsed = time.perf_counter() - start
    assert data.histories.num_events == 1500 * 10_000
    assert len(data.train) + len(data.test) == 1500 * 8
    assert len(data.test) == 450 * 8
    assert elapsed < 30, f"generation took {elapsed:.1f} s"  # a few seconds on one core


# ---------------------------------------------------------------------------- planted signal


def test_oracle_score_matches_its_definition(small):
    h, spec = small.histories, SMALL
    topic = small.truth["item_topic"]
    for part, key in ((small.train, "train_score"), (small.test, "test_score")):
        s = decayed_match_share(h, part, topic[h.item], topic[part.item], spec.half_life_days)
        np.testing.assert_allclose(s, small.truth[key], rtol=1e-9, atol=1e-12)


def test_planted_signal_needs_the_long_decayed_history(small):
    h = small.histories
    data = all_samples(small)
    topic = small.truth["item_topic"]
    ev, tg = topic[h.item], topic[data.item]
    y = data.label
    oracle = auc(decayed_match_share(h, data, ev, tg, SMALL.half_life_days), y)
    last50 = auc(decayed_match_share(h, data, ev, tg, None, last_k=50), y)
    last200 = auc(decayed_match_share(h, data, ev, tg, None, last_k=200), y)
    blind = auc(decayed_match_share(h, data, ev, tg, None), y)  # full history, no time
    category = auc(decayed_match_share(h, data, h.category, data.category, SMALL.half_life_days), y)
    assert 0.8 < oracle < 0.92, oracle
    assert last50 < oracle - 0.1, (last50, oracle)  # truncation loses signal
    assert last200 < oracle - 0.07, (last200, oracle)
    assert blind < oracle - 0.02, (blind, oracle)  # time matters
    assert category < oracle - 0.1, (category, oracle)  # category is a noisy proxy
    assert last50 > 0.55  # not pure noise either


# ---------------------------------------------------------------------------- batching


def random_data(seed: int, users: int = 40, max_len: int = 60) -> tuple[Histories, Samples]:
    """Ragged histories (some empty) and samples at arbitrary prefixes (some users without any)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, users)
    lengths[:3] = 0
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    n = int(offsets[-1])
    time_s = np.concatenate([np.sort(rng.uniform(0, 1e6, k)) for k in lengths]) if n else np.zeros(0)
    h = Histories(
        offsets=offsets,
        item=rng.integers(0, 1000, n),
        action=rng.integers(0, 8, n),
        category=rng.integers(0, 30, n),
        modality=rng.integers(0, 5, n),
        time_s=time_s.astype(np.float64),
    )
    h.validate()
    owners = rng.choice(np.arange(users - 5), size=users * 4)  # the last 5 users have no samples
    owners = np.r_[owners, 0, 1]  # users with an empty history but samples
    start, stop = offsets[owners], offsets[owners + 1]
    end = start + np.floor(rng.random(owners.size) * (stop - start + 1)).astype(np.int64)
    request = np.where(end > start, h.time_s[np.maximum(end - 1, 0)], 0.0) + rng.uniform(0, 10, owners.size)
    s = Samples(
        user=owners.astype(np.int64),
        item=rng.integers(0, 1000, owners.size),
        category=rng.integers(0, 30, owners.size),
        modality=rng.integers(0, 5, owners.size),
        time_s=request,
        history_end=end,
        label=(rng.random(owners.size) < 0.4).astype(np.float32),
    )
    s.validate(h)
    return h, s


@pytest.mark.parametrize("max_events", [None, 1, 7, 25, 1000])
@pytest.mark.parametrize("shuffle", [False, True])
def test_user_batches_cover_every_sample_once_and_respect_prefixes(max_events, shuffle):
    h, s = random_data(seed=11)
    seen = np.zeros(len(s), np.int64)
    for batch in user_batches(h, s, users_per_batch=6, max_events=max_events, shuffle=shuffle, seed=2):
        B, L = batch.item.shape
        assert B <= 6 and L >= 1 and batch.target_item.shape[0] == B
        assert batch.event_mask.dtype == bool and batch.target_mask.dtype == bool
        assert batch.visible.dtype == np.int64 and batch.label.dtype == np.float32
        assert len(set(batch.user.tolist())) == B  # one row per user
        for b in range(B):
            u = int(batch.user[b])
            idx = batch.sample_index[b][batch.target_mask[b]]
            assert np.all(batch.sample_index[b][~batch.target_mask[b]] == -1)
            assert np.all(s.user[idx] == u)
            seen[idx] += 1
            row_end = int(s.history_end[idx].max())
            row_start = int(h.offsets[u]) if max_events is None else max(int(h.offsets[u]), row_end - max_events)
            n = row_end - row_start
            # the row is the user's newest events up to the row's end, left-aligned, padded with 0
            assert batch.event_mask[b].sum() == n and np.all(batch.event_mask[b][:n])
            for name in ("item", "action", "category", "modality", "time_s"):
                row = getattr(batch, name)[b]
                np.testing.assert_array_equal(row[:n], getattr(h, name)[row_start:row_end])
                assert np.all(row[n:] == 0)
            # each target sees exactly its own prefix, clipped to the truncated row
            t_ok = batch.target_mask[b]
            expect = np.clip(s.history_end[idx] - row_start, 0, n)
            np.testing.assert_array_equal(batch.visible[b][t_ok], expect)
            assert np.all(batch.visible[b][~t_ok] == 0)
            for t, i in zip(np.flatnonzero(t_ok), idx):
                v = int(batch.visible[b, t])
                visible_times = batch.time_s[b, :v]
                assert np.all(visible_times <= s.time_s[i])
                # the visible events are the newest of the sample's own history
                np.testing.assert_array_equal(batch.item[b, :v], h.item[s.history_end[i] - v : s.history_end[i]])
                if max_events is None:
                    assert v == history_lengths(h, s)[i]
                else:
                    assert v <= min(max_events, history_lengths(h, s)[i])
            np.testing.assert_array_equal(batch.target_item[b][t_ok], s.item[idx])
            np.testing.assert_array_equal(batch.target_category[b][t_ok], s.category[idx])
            np.testing.assert_array_equal(batch.target_modality[b][t_ok], s.modality[idx])
            np.testing.assert_array_equal(batch.target_time_s[b][t_ok], s.time_s[idx])
            np.testing.assert_array_equal(batch.label[b][t_ok], s.label[idx])
    np.testing.assert_array_equal(seen, np.ones(len(s), np.int64))


def test_user_batches_shuffle_is_seeded():
    h, s = random_data(seed=5)
    order = lambda seed: np.concatenate([b.user for b in user_batches(h, s, 4, None, True, seed)])  # noqa: E731
    np.testing.assert_array_equal(order(1), order(1))
    assert not np.array_equal(order(1), order(2))
    plain = np.concatenate([b.user for b in user_batches(h, s, 4, None, False, 0)])
    np.testing.assert_array_equal(plain, np.unique(s.user))


def test_history_lengths():
    h, s = random_data(seed=7)
    np.testing.assert_array_equal(history_lengths(h, s), s.history_end - h.offsets[s.user])


def test_user_batches_are_fast():
    data = make_synthetic(SyntheticSpec(users=64, events_per_user=10_000, seed=1))
    batches = user_batches(data.histories, data.train, users_per_batch=64, max_events=None, shuffle=True, seed=0)
    start = time.perf_counter()
    batch = next(batches)
    elapsed = time.perf_counter() - start
    assert batch.item.shape[1] == 10_000
    assert elapsed < 0.1, f"one batch of {batch.item.shape[0]} users x 10^4 events took {elapsed * 1e3:.0f} ms"


def test_load_dataset_by_name():
    data = load_dataset("synthetic", None, users=20, events_per_user=400, targets_per_user=3)
    assert data.name == "synthetic" and data.histories.num_users == 20
    assert len(data.train) + len(data.test) == 60
    with pytest.raises(ValueError):
        load_dataset("nope", None)


# ---------------------------------------------------------------------------- MovieLens


@pytest.mark.movielens
def test_movielens_100k():
    try:
        data = load_movielens_100k(default_cache_dir())
    except DatasetUnavailable as exc:
        pytest.skip(f"MovieLens-100K unavailable: {exc}")
    h = data.histories
    h.validate()
    assert h.num_users == 943 and h.num_events == 100_000
    assert np.unique(h.item).size == 1682
    assert h.category.max() < 19 and np.all(h.modality == 0)
    assert set(np.unique(h.action).tolist()) == {2, 6}  # LIKE, WATCH
    everything = all_samples(data)
    assert len(everything) == 100_000
    assert abs(everything.label.mean() - 0.55375) < 1e-9
    np.testing.assert_array_equal(everything.label == 1, h.action[everything.history_end] == 2)
    assert len(data.train) == 80_367 and len(data.test) == 19_633
    for part in (data.train, data.test):
        part.validate(h)
        # a sample's history is every strictly earlier rating of its user, in sorted order
        np.testing.assert_array_equal(part.item, h.item[part.history_end])
        np.testing.assert_array_equal(part.time_s, h.time_s[part.history_end])
    # every user has test samples, and they are that user's latest ratings
    assert np.unique(data.test.user).size == 943
    first_test = np.full(943, np.iinfo(np.int64).max)
    np.minimum.at(first_test, data.test.user, data.test.history_end)
    last_train = np.full(943, -1)
    np.maximum.at(last_train, data.train.user, data.train.history_end)
    assert np.all(last_train < first_test)
    assert np.all(first_test - h.offsets[:-1] >= 0.8 * np.diff(h.offsets) - 1)
    assert "MovieLens-100K" in data.description
