"""Training and evaluation data for the CTR experiments: per-user behavior histories, labelled
(user, target, time) samples, and batches grouped by user.

Two datasets share one layout (:class:`Dataset`):

- ``movielens``: MovieLens-100K as shipped in the RecBole 1.2.1 wheel, read straight from the
  wheel in a local cache (the licence forbids redistribution: nothing is written elsewhere).
- ``synthetic``: a seeded generator with planted long-range, time-decayed, category-crossing
  structure (:class:`SyntheticSpec`), built so that truncating to the last k behaviors, ignoring
  time, or filtering by the target's category each lose signal that full attention keeps.

Histories are CSR (one ``offsets`` array, events sorted by time within a user); a sample sees
the user's events ``[offsets[user], history_end)``. :func:`user_batches` groups samples by user
so that all targets of a user attend over one copy of that user's events, each target masked to
its own prefix by ``visible``.

numpy only; torch is never imported here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vql.model.batch import UserBatch
from vql.schemas.events import Action, Modality

ACTION_INDEX = {action: i for i, action in enumerate(Action)}
MODALITY_INDEX = {modality: i for i, modality in enumerate(Modality)}
DAY_S = 86_400.0


class DatasetUnavailable(RuntimeError):
    """The dataset's source could not be fetched (no network, registry down, ...)."""


def default_cache_dir() -> Path:
    """Where downloaded sources are kept: ``$VQL_DATA_CACHE`` or ~/.cache/vql-stream/datasets."""
    env = os.environ.get("VQL_DATA_CACHE", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "vql-stream" / "datasets"


# ---------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class Histories:
    """Every user's behaviors in CSR form, sorted by time within each user."""

    offsets: np.ndarray  # (U+1,) int64; user u's events are [offsets[u], offsets[u+1])
    item: np.ndarray  # (E,) int64 ids (non-negative)
    action: np.ndarray  # (E,) int64 index into schemas.events.Action
    category: np.ndarray  # (E,) int64
    modality: np.ndarray  # (E,) int64 index into Modality
    time_s: np.ndarray  # (E,) float64 epoch seconds, non-decreasing within a user

    @property
    def num_users(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def num_events(self) -> int:
        return int(self.item.shape[0])

    def lengths(self) -> np.ndarray:
        """(U,) events per user."""
        return np.diff(self.offsets)

    def event_user(self) -> np.ndarray:
        """(E,) the user of every event."""
        return np.repeat(np.arange(self.num_users, dtype=np.int64), self.lengths())

    def validate(self) -> None:
        """Raise ValueError when the layout is broken (shapes, dtypes, offsets, time order)."""
        off = self.offsets
        if off.ndim != 1 or off.shape[0] < 1 or off[0] != 0 or np.any(np.diff(off) < 0):
            raise ValueError("offsets must start at 0 and be non-decreasing")
        n = int(off[-1])
        for name in ("item", "action", "category", "modality", "time_s"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({n},)")
        for name in ("offsets", "item", "action", "category", "modality"):
            if getattr(self, name).dtype != np.int64:
                raise ValueError(f"{name} must be int64")
        if self.time_s.dtype != np.float64:
            raise ValueError("time_s must be float64")
        if n and (self.item.min() < 0 or self.category.min() < 0):
            raise ValueError("ids must be non-negative")
        if n and not (0 <= self.action.min() and self.action.max() < len(Action)):
            raise ValueError("action out of range")
        if n and not (0 <= self.modality.min() and self.modality.max() < len(Modality)):
            raise ValueError("modality out of range")
        if n > 1:
            step = np.diff(self.time_s)
            same_user = np.ones(n - 1, bool)
            same_user[off[1:-1][(off[1:-1] > 0) & (off[1:-1] < n)] - 1] = False
            if np.any(step[same_user] < 0):
                raise ValueError("events are not sorted by time within a user")


@dataclass(frozen=True)
class Samples:
    """Labelled (user, target, time) examples; the history a sample may see is the user's
    events [offsets[user], history_end)."""

    user: np.ndarray  # (S,) int64
    item: np.ndarray  # (S,) int64
    category: np.ndarray  # (S,) int64
    modality: np.ndarray  # (S,) int64
    time_s: np.ndarray  # (S,) float64 request time (>= time of every visible event)
    history_end: np.ndarray  # (S,) int64 exclusive end index into the event arrays
    label: np.ndarray  # (S,) float32 0/1

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, index: np.ndarray) -> "Samples":
        """The samples at ``index`` (an int array or a boolean mask), in that order."""
        return Samples(**{name: getattr(self, name)[index] for name in _SAMPLE_FIELDS})

    def validate(self, histories: Histories) -> None:
        """Raise ValueError when a sample could see outside its user or after its request time."""
        n = len(self)
        for name in _SAMPLE_FIELDS:
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},)")
        if not n:
            return
        if self.user.min() < 0 or self.user.max() >= histories.num_users:
            raise ValueError("user out of range")
        start = histories.offsets[self.user]
        stop = histories.offsets[self.user + 1]
        if np.any(self.history_end < start) or np.any(self.history_end > stop):
            raise ValueError("history_end outside the user's events")
        has = self.history_end > start
        last = histories.time_s[np.maximum(self.history_end - 1, 0)]
        if np.any(last[has] > self.time_s[has]):
            raise ValueError("a sample sees an event after its request time")
        if not np.all((self.label == 0) | (self.label == 1)):
            raise ValueError("labels must be 0/1")


_SAMPLE_FIELDS = ("user", "item", "category", "modality", "time_s", "history_end", "label")


@dataclass(frozen=True)
class Dataset:
    name: str
    histories: Histories
    train: Samples
    test: Samples
    description: str  # one paragraph: how it was built (goes into docs/results.md)
    # Generator-side ground truth, for reference lines and tests (empty for real data). The
    # synthetic set has: item_topic (indexed by item id), category_topic (categories x topics,
    # the mix items of a category draw their topic from), {train,test}_score (the oracle s of
    # every sample) and {train,test}_prob (the Bernoulli probability its label was drawn with).
    truth: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------------------- batching


def history_lengths(histories: Histories, samples: Samples) -> np.ndarray:
    """(S,) int64: how many events each sample may see."""
    return samples.history_end - histories.offsets[samples.user]


def user_batches(
    histories: Histories,
    samples: Samples,
    users_per_batch: int,
    max_events: int | None,
    shuffle: bool,
    seed: int,
) -> Iterator[UserBatch]:
    """One pass over ``samples``, ``users_per_batch`` users (rows) at a time.

    Every sample appears exactly once per pass. Users come in ascending order, or in a
    ``seed``-determined random order when ``shuffle``; a user's targets are in sample order.
    L is at least 1 (a batch whose rows are all empty has one padding column), so models need
    not special-case zero-width tensors; they must handle targets with visible == 0 anyway.
    """
    if users_per_batch < 1:
        raise ValueError("users_per_batch must be >= 1")
    if max_events is not None and max_events < 1:
        raise ValueError("max_events must be >= 1 or None")
    n = len(samples)
    if n == 0:
        return
    order = np.argsort(samples.user, kind="stable")
    sorted_user = samples.user[order]
    starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
    counts = np.diff(np.r_[starts, n])
    users = sorted_user[starts]
    row_end_all = np.maximum.reduceat(samples.history_end[order], starts)
    rows = np.arange(users.shape[0])
    if shuffle:
        np.random.default_rng(seed).shuffle(rows)
    offsets = histories.offsets

    for first in range(0, rows.shape[0], users_per_batch):
        pick = rows[first : first + users_per_batch]
        user = users[pick]
        row_end = row_end_all[pick]
        row_start = offsets[user]
        if max_events is not None:
            row_start = np.maximum(row_start, row_end - max_events)
        n_events = row_end - row_start
        width = max(int(n_events.max()), 1)
        pos = np.arange(width, dtype=np.int64)
        event_mask = pos[None, :] < n_events[:, None]
        gather = np.where(event_mask, row_start[:, None] + pos[None, :], 0)

        def events(column: np.ndarray, _gather=gather, _mask=event_mask) -> np.ndarray:
            return np.where(_mask, column[_gather], column.dtype.type(0))

        n_targets = counts[pick]
        depth = int(n_targets.max())
        tpos = np.arange(depth, dtype=np.int64)
        target_mask = tpos[None, :] < n_targets[:, None]
        sample_index = np.where(target_mask, order[np.where(target_mask, starts[pick][:, None] + tpos, 0)], -1)
        take = np.where(target_mask, sample_index, 0)

        def targets(column: np.ndarray, _take=take, _mask=target_mask) -> np.ndarray:
            return np.where(_mask, column[_take], column.dtype.type(0))

        visible = np.clip(samples.history_end[take] - row_start[:, None], 0, n_events[:, None])
        yield UserBatch(
            item=events(histories.item),
            action=events(histories.action),
            category=events(histories.category),
            modality=events(histories.modality),
            time_s=events(histories.time_s),
            event_mask=event_mask,
            target_item=targets(samples.item),
            target_category=targets(samples.category),
            target_modality=targets(samples.modality),
            target_time_s=targets(samples.time_s),
            visible=np.where(target_mask, visible, 0).astype(np.int64),
            label=targets(samples.label).astype(np.float32),
            target_mask=target_mask,
            sample_index=sample_index.astype(np.int64),
            user=user.astype(np.int64),
        )


# ---------------------------------------------------------------------------- analysis


def decayed_match_share(
    histories: Histories,
    samples: Samples,
    event_key: np.ndarray,
    target_key: np.ndarray,
    half_life_days: float | None = None,
    last_k: int | None = None,
    normalize: bool = True,
    chunk_pairs: int = 1 << 24,
) -> np.ndarray:
    """(S,) float64: for each sample, the share of its visible events whose key equals the
    target's key, each event weighted 2^(-(request time - event time) / half-life) (uniform
    weights when ``half_life_days`` is None), over only the newest ``last_k`` visible events
    when given. Zero for an empty window. ``normalize=False`` returns the weighted count.

    A reference-line tool (oracle and proxy scores), vectorised over (sample, event) pairs in
    chunks of about ``chunk_pairs``.
    """
    end = samples.history_end
    start = histories.offsets[samples.user]
    if last_k is not None:
        start = np.maximum(start, end - last_k)
    width = end - start
    out = np.zeros(len(samples), np.float64)
    cum = np.cumsum(width)
    lo = 0
    while lo < len(samples):
        base = cum[lo - 1] if lo else 0
        hi = int(np.searchsorted(cum, base + chunk_pairs, side="right"))
        hi = max(hi, lo + 1)
        w = width[lo:hi]
        total = int(w.sum())
        if total:
            owner = np.repeat(np.arange(hi - lo), w)
            first = np.cumsum(w) - w
            idx = start[lo:hi][owner] + (np.arange(total) - first[owner])
            if half_life_days is None:
                weight = np.ones(total)
            else:
                age = samples.time_s[lo:hi][owner] - histories.time_s[idx]
                weight = np.exp2(-np.maximum(age, 0.0) / (half_life_days * DAY_S))
            hit = event_key[idx] == target_key[lo:hi][owner]
            num = np.bincount(owner, weight * hit, minlength=hi - lo)
            if normalize:
                den = np.bincount(owner, weight, minlength=hi - lo)
                out[lo:hi] = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
            else:
                out[lo:hi] = num
        lo = hi
    return out


# ---------------------------------------------------------------------------- MovieLens-100K

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
_ML_DIR = "recbole/dataset_example/ml-100k/"


def _recbole_wheel(cache_dir: Path) -> Path:
    wheels = Path(cache_dir) / "wheels"
    wheel = wheels / RECBOLE_WHEEL
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "recbole==1.2.1", "--no-deps", "-d", str(wheels)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatasetUnavailable(f"pip download recbole==1.2.1 failed: {exc}") from exc
    if done.returncode != 0 or not wheel.is_file():
        raise DatasetUnavailable(
            f"pip download recbole==1.2.1 failed (rc {done.returncode}):\n{done.stderr[-2000:]}"
        )
    return wheel


def _atomic_file(archive: zipfile.ZipFile, name: str) -> tuple[list[str], list[list[str]]]:
    """A RecBole atomic file: tab-separated, with a typed header (``field:type``)."""
    lines = archive.read(_ML_DIR + name).decode("utf-8").splitlines()
    header = [column.split(":", 1)[0] for column in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return header, rows


def load_movielens_100k(cache_dir: Path, *, test_fraction: float = 0.2) -> Dataset:
    """MovieLens-100K from the RecBole 1.2.1 wheel (downloaded once into ``cache_dir/wheels``).

    Raises :class:`DatasetUnavailable` when the wheel is missing and cannot be downloaded.
    """
    wheel = _recbole_wheel(Path(cache_dir))
    with zipfile.ZipFile(wheel) as archive:
        inter_header, inter_rows = _atomic_file(archive, "ml-100k.inter")
        item_header, item_rows = _atomic_file(archive, "ml-100k.item")

    columns = {name: i for i, name in enumerate(inter_header)}
    wanted = [columns[name] for name in ("user_id", "item_id", "rating", "timestamp")]
    table = np.array([[r[i] for i in wanted] for r in inter_rows], dtype=np.float64)
    raw_user, item = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    rating, stamp = table[:, 2], table[:, 3]

    item_col = {name: i for i, name in enumerate(item_header)}
    genres_of = {int(r[item_col["item_id"]]): r[item_col["class"]].split() for r in item_rows}
    vocabulary = sorted({g for genres in genres_of.values() for g in genres})
    genre_index = {g: i for i, g in enumerate(vocabulary)}
    unknown = genre_index.get("unknown", len(vocabulary))
    first_genre = np.full(max(max(genres_of), int(item.max())) + 1, unknown, np.int64)
    for movie, genres in genres_of.items():
        if genres:
            first_genre[movie] = genre_index[genres[0]]

    users, user = np.unique(raw_user, return_inverse=True)
    file_order = np.arange(user.shape[0])
    order = np.lexsort((file_order, stamp, user))  # by user, then time, ties in file order
    user, item, rating, stamp = user[order], item[order], rating[order], stamp[order]
    counts = np.bincount(user, minlength=users.shape[0])
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    positive = rating >= 4
    histories = Histories(
        offsets=offsets,
        item=item.astype(np.int64),
        action=np.where(positive, ACTION_INDEX[Action.LIKE], ACTION_INDEX[Action.WATCH]).astype(np.int64),
        category=first_genre[item],
        modality=np.full(item.shape[0], MODALITY_INDEX[Modality.VIDEO], np.int64),
        time_s=stamp.astype(np.float64),
    )
    position = np.arange(item.shape[0], dtype=np.int64)
    every = Samples(
        user=user.astype(np.int64),
        item=histories.item.copy(),
        category=histories.category.copy(),
        modality=histories.modality.copy(),
        time_s=histories.time_s.copy(),
        history_end=position,  # strictly earlier events of the user (sorted order)
        label=positive.astype(np.float32),
    )
    rank = position - offsets[user]  # 0-based position within the user
    n_test = np.maximum(1, np.floor(counts * test_fraction + 1e-9).astype(np.int64))
    is_test = rank >= (counts - n_test)[user]
    description = (
        f"MovieLens-100K (GroupLens; read from the RecBole 1.2.1 wheel's atomic files, not "
        f"redistributed): {users.shape[0]} users, {len(genres_of)} movies, {item.shape[0]} ratings. "
        f"Every rating is a behavior of its user, sorted by timestamp (ties in file order): "
        f"action LIKE if rating >= 4 else WATCH, category = the movie's first genre "
        f"({len(vocabulary)} genres indexed in sorted name order), modality VIDEO, item = movie id. "
        f"Every rating is also a sample: target = that movie at its timestamp, label = rating >= 4 "
        f"({positive.mean():.1%} positive), history = the user's strictly earlier ratings. Split by "
        f"time within each user: the last {test_fraction:.0%} of each user's ratings (at least one) "
        f"are test samples ({int(is_test.sum())}), the rest train ({int((~is_test).sum())})."
    )
    return Dataset(
        name="movielens",
        histories=histories,
        train=every.take(~is_test),
        test=every.take(is_test),
        description=description,
    )


# ---------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 1500
    events_per_user: int = 10_000  # up to 10^5 (memory: ~40 B per event, users x events)
    targets_per_user: int = 8
    categories: int = 50
    items_per_category: int = 200
    topics: int = 16
    recent_noise: int = 300  # the newest events of each user are mostly exploration noise
    span_days: float = 365.0
    test_fraction: float = 0.3  # of users
    seed: int = 0
    # interests: topic 0 of a user is lifelong, the others live in windows spread over the span
    interests_per_user: int = 4
    lifelong_weight: float = 1.0  # relative rate of the lifelong interest
    window_weight: float = 3.0  # relative rate of an active windowed interest
    window_days: tuple[float, float] = (45.0, 150.0)  # duration of a windowed interest
    interest_share: float = 0.8  # events from interests (else uniform exploration)
    recent_interest_share: float = 0.1  # same, within the newest `recent_noise` events
    # items: a category's items draw their topic from a Dirichlet(concentration) topic mix
    category_topic_concentration: float = 0.3
    # targets and labels
    interest_target_share: float = 0.5  # targets from the user's interest topics (else random)
    request_delay_hours: tuple[float, float] = (1.0, 6.0)  # after the user's newest event
    half_life_days: float = 60.0  # of the oracle score s
    label_scale: float = 14.0  # label ~ Bernoulli(sigmoid(label_scale * s + label_bias))
    label_bias: float = -2.4
    start_time_s: float = 1.7e9  # the newest events sit near start_time_s + span_days

    def __post_init__(self) -> None:
        if self.interests_per_user > self.topics:
            raise ValueError("interests_per_user must be <= topics")
        if min(self.users, self.events_per_user, self.targets_per_user, self.topics) < 1:
            raise ValueError("users, events_per_user, targets_per_user and topics must be >= 1")


_INTEREST_ACTION_P = np.array([0.25, 0.30, 0.15, 0.03, 0.04, 0.02, 0.18, 0.03])
_NOISE_ACTION_P = np.array([0.70, 0.20, 0.03, 0.01, 0.01, 0.00, 0.05, 0.00])
_MODALITY_P = np.array([0.5, 0.25, 0.1, 0.1, 0.05])
_CHUNK_USERS = 64  # part of the generator's definition: changing it changes the data


def _categorical(rng: np.random.Generator, cum: np.ndarray, size: int) -> np.ndarray:
    """Draws from the distribution with cumulative probabilities ``cum`` (ends at 1)."""
    return np.minimum(np.searchsorted(cum, rng.random(size), side="right"), cum.shape[0] - 1)


def make_synthetic(spec: SyntheticSpec = SyntheticSpec()) -> Dataset:
    """A seeded dataset with planted long-range structure; the rule is in ``description``."""
    rng = np.random.default_rng(spec.seed)
    n_items = spec.categories * spec.items_per_category
    span_s = spec.span_days * DAY_S

    # Items: id = category * items_per_category + j; the topic comes from the category's mix.
    category_topic = rng.dirichlet(np.full(spec.topics, spec.category_topic_concentration), spec.categories)
    item_category = np.repeat(np.arange(spec.categories, dtype=np.int64), spec.items_per_category)
    cum_mix = np.cumsum(category_topic, axis=1)
    cum_mix[:, -1] = 1.0
    item_topic = (rng.random(n_items)[:, None] > cum_mix[item_category]).sum(axis=1).astype(np.int64)
    item_modality = _categorical(rng, np.cumsum(_MODALITY_P / _MODALITY_P.sum()), n_items).astype(np.int64)
    by_topic = np.argsort(item_topic, kind="stable")
    topic_count = np.bincount(item_topic, minlength=spec.topics)
    topic_first = np.r_[0, np.cumsum(topic_count)[:-1]]
    # a topic no category uses gets borrowed items (uniform) so that sampling stays defined
    empty = topic_count == 0

    def item_of_topic(topic: np.ndarray, u01: np.ndarray) -> np.ndarray:
        cnt = np.where(empty[topic], n_items, topic_count[topic])
        k = np.minimum((u01 * cnt).astype(np.int64), cnt - 1)
        return np.where(empty[topic], k, by_topic[np.minimum(topic_first[topic] + k, n_items - 1)])

    def any_item(u01: np.ndarray) -> np.ndarray:
        return np.minimum((u01 * n_items).astype(np.int64), n_items - 1)

    # Users: interest topics (distinct) and windows; interest 0 is lifelong.
    U, E, K = spec.users, spec.events_per_user, spec.interests_per_user
    interest = np.argsort(rng.random((U, spec.topics)), axis=1)[:, :K].astype(np.int64)
    end_time = spec.start_time_s + span_s - rng.uniform(0.0, 7 * DAY_S, U)  # newest event, per user
    begin_time = end_time - span_s
    duration = rng.uniform(*spec.window_days, (U, K)) * DAY_S
    onset = begin_time[:, None] + rng.uniform(-0.1, 1.0, (U, K)) * span_s - 0.5 * duration
    finish = onset + duration
    onset[:, 0], finish[:, 0] = -np.inf, np.inf
    rate = np.full(K, spec.window_weight)
    rate[0] = spec.lifelong_weight

    offsets = np.arange(U + 1, dtype=np.int64) * E
    item = np.empty(U * E, np.int64)
    action = np.empty(U * E, np.int64)
    time_s = np.empty(U * E, np.float64)
    topic_of_event = np.empty(U * E, np.int64)
    cum_interest_action = np.cumsum(_INTEREST_ACTION_P / _INTEREST_ACTION_P.sum())
    cum_noise_action = np.cumsum(_NOISE_ACTION_P / _NOISE_ACTION_P.sum())
    recent = np.arange(E) >= E - spec.recent_noise
    share = np.where(recent, spec.recent_interest_share, spec.interest_share)
    for lo in range(0, U, _CHUNK_USERS):
        hi = min(lo + _CHUNK_USERS, U)
        n = hi - lo
        crng = np.random.default_rng([spec.seed, 1, lo])
        gaps = crng.exponential(1.0, (n, E + 1))
        clock = np.cumsum(gaps, axis=1)
        t = begin_time[lo:hi, None] + span_s * (clock[:, :E] / clock[:, E:])  # increasing
        active = (t[:, :, None] >= onset[lo:hi, None, :]) & (t[:, :, None] < finish[lo:hi, None, :])
        weight = np.cumsum(active * rate.astype(np.float32), axis=2)
        pick = (crng.random((n, E, 1), np.float32) * weight[:, :, -1:] >= weight).sum(axis=2)
        topic = np.take_along_axis(interest[lo:hi], np.minimum(pick, K - 1), axis=1)
        from_interest = crng.random((n, E)) < share[None, :]
        u01 = crng.random((n, E))
        chosen = np.where(from_interest, item_of_topic(topic, u01), any_item(u01))
        flat = slice(lo * E, hi * E)
        item[flat] = chosen.ravel()
        time_s[flat] = t.ravel()
        topic_of_event[flat] = item_topic[item[flat]]
        r = crng.random(n * E)
        action[flat] = np.where(
            from_interest.ravel(),
            np.searchsorted(cum_interest_action, r, side="right"),
            np.searchsorted(cum_noise_action, r, side="right"),
        )
    np.minimum(action, len(Action) - 1, out=action)
    histories = Histories(
        offsets=offsets,
        item=item,
        action=action,
        category=item_category[item],
        modality=item_modality[item],
        time_s=time_s,
    )

    # Targets: half from the user's interest topics (lifelong, active or long gone), half random.
    trng = np.random.default_rng([spec.seed, 2])
    T = spec.targets_per_user
    t_user = np.repeat(np.arange(U, dtype=np.int64), T)
    from_interest = trng.random(U * T) < spec.interest_target_share
    t_topic = interest[t_user, trng.integers(0, K, U * T)]
    u01 = trng.random(U * T)
    t_item = np.where(from_interest, item_of_topic(t_topic, u01), any_item(u01))
    request = time_s[offsets[1:] - 1][t_user] + trng.uniform(*spec.request_delay_hours, U * T) * 3600.0
    samples = Samples(
        user=t_user,
        item=t_item,
        category=item_category[t_item],
        modality=item_modality[t_item],
        time_s=request,
        history_end=offsets[1:][t_user],
        label=np.zeros(U * T, np.float32),
    )
    # s = decayed topic share at request time; all targets of a user see the whole history, so
    # the share is the same at any request time (the decay factors' common part cancels): weigh
    # each behavior by its age at the user's newest behavior.
    grid = time_s.reshape(U, E)
    weight = np.exp2((grid - grid[:, -1:]) / (spec.half_life_days * DAY_S))
    key = np.arange(U, dtype=np.int64)[:, None] * spec.topics + topic_of_event.reshape(U, E)
    decayed = np.bincount(key.ravel(), weights=weight.ravel(), minlength=U * spec.topics).reshape(U, spec.topics)
    decayed /= decayed.sum(axis=1, keepdims=True)
    score = decayed[t_user, item_topic[t_item]]
    prob = 1.0 / (1.0 + np.exp(-(spec.label_scale * score + spec.label_bias)))
    label = (trng.random(U * T) < prob).astype(np.float32)
    samples = replace(samples, label=label)

    test_users = trng.permutation(U)[: int(round(spec.test_fraction * U))]
    is_test = np.zeros(U, bool)
    is_test[test_users] = True
    in_test = is_test[t_user]
    description = (
        f"Synthetic (seed {spec.seed}): {U} users x {E} behaviors over {spec.span_days:g} days, "
        f"{spec.categories} categories x {spec.items_per_category} items, {spec.topics} latent topics. "
        f"Each category's items draw a hidden topic from a Dirichlet({spec.category_topic_concentration:g}) "
        f"mix, so a category mixes topics and a topic spans categories. Each user has "
        f"{K} distinct interest topics: one lifelong (rate {spec.lifelong_weight:g}) and {K - 1} living in "
        f"windows of {spec.window_days[0]:g}-{spec.window_days[1]:g} days placed anywhere in the span "
        f"(rate {spec.window_weight:g} while active), so some interests ended long ago and some are recent. "
        f"A behavior is an item of an active interest's topic (chosen in proportion to the rates) with "
        f"probability {spec.interest_share:g}, else a uniform random item; in the newest "
        f"{spec.recent_noise} behaviors that probability drops to {spec.recent_interest_share:g} "
        f"(exploration noise), so the last 50-200 behaviors say little. Actions lean to "
        f"click/like/watch for interest behaviors and to impressions for noise; modality is a fixed "
        f"per-item attribute. Each user gets {T} targets {spec.request_delay_hours[0]:g}-"
        f"{spec.request_delay_hours[1]:g} h after their newest behavior, seeing the whole history: "
        f"{spec.interest_target_share:.0%} are items of one of the user's interest topics (current or "
        f"expired), the rest uniform random items. The oracle score s is the share of the user's "
        f"behaviors in the target's topic, each weighted by 2^(-age/{spec.half_life_days:g} d); the "
        f"label is Bernoulli(sigmoid({spec.label_scale:g} s {spec.label_bias:+g})) "
        f"({label.mean():.1%} positive). Train and test are split by user "
        f"({int((~is_test).sum())} train users, {int(is_test.sum())} test users)."
    )
    truth = {
        "item_topic": item_topic,
        "category_topic": category_topic,
        "train_score": score[~in_test],
        "test_score": score[in_test],
        "train_prob": prob[~in_test],
        "test_prob": prob[in_test],
    }
    return Dataset(
        name="synthetic",
        histories=histories,
        train=samples.take(~in_test),
        test=samples.take(in_test),
        description=description,
        truth=truth,
    )


# ---------------------------------------------------------------------------- by name


def load_dataset(name: str, cache_dir: Path | None = None, **overrides) -> Dataset:
    """``movielens`` (overrides: test_fraction) or ``synthetic`` (overrides: SyntheticSpec fields)."""
    if name == "movielens":
        return load_movielens_100k(Path(cache_dir) if cache_dir is not None else default_cache_dir(), **overrides)
    if name == "synthetic":
        return make_synthetic(SyntheticSpec(**overrides))
    raise ValueError(f"unknown dataset {name!r} (known: movielens, synthetic)")
