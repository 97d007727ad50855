"""The per-user state math of design/vql.md section 6, vectorised over users and events.

A state holds, per (group g, code c, rate r), the log of the forward-decayed count
``ell = log sum_i exp(lambda_r (t_i - T0))`` and the decayed mean of the values. The landmark
T0 is always the latest event time seen, so ``ell <= log(count)`` never overflows, and T0 is a
function of the event set rather than of arrival order: any permutation of the same events
gives the same state, which is what makes late events, duplicate-free replays and shuffled
backfills exact.

This module is the only place these formulas live; the worker, replay and the tests call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vql.schemas.user_state import StateBatch, UserState

NO_OFFSET = -1  # applied_offset of a state that has applied nothing from a partition


def empty_state(user_id: str, model_version: str, shape: tuple[int, int, int, int]) -> UserState:
    """The state of a user with no history: every cell empty (log-count -inf)."""
    groups, codes, rates, dim = shape
    return UserState(
        user_id=user_id,
        model_version=model_version,
        landmark_t0=0.0,
        last_event_time=0.0,
        event_count=0,
        applied_offset=NO_OFFSET,
        log_count=np.full((groups, codes, rates), -np.inf),
        mean=np.zeros((groups, codes, rates, dim)),
    )


def apply_events(
    states: Sequence[UserState],
    owner: np.ndarray,
    codes: np.ndarray,
    values: np.ndarray,
    times_s: np.ndarray,
    decay_rates: np.ndarray,
    offsets: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`fold_events` for a list of states, updated in place; returns the applied mask."""
    if not states or owner.shape[0] == 0:
        return np.ones(owner.shape[0], dtype=bool)
    batch = StateBatch.of(states)
    applied = fold_events(batch, owner, codes, values, times_s, decay_rates, offsets)
    for row in np.unique(owner[applied]):
        folded, state = batch.state(row), states[row]
        state.log_count, state.mean = folded.log_count, folded.mean
        state.landmark_t0, state.last_event_time = folded.landmark_t0, folded.last_event_time
        state.event_count, state.applied_offset = folded.event_count, folded.applied_offset
    return applied


def fold_events(
    batch: StateBatch,
    owner: np.ndarray,
    codes: np.ndarray,
    values: np.ndarray,
    times_s: np.ndarray,
    decay_rates: np.ndarray,
    offsets: np.ndarray | None = None,
) -> np.ndarray:
    """Fold a micro-batch of encoded events into ``batch``'s states in place; return the
    applied mask.

    owner[i] is the row of ``batch`` event i belongs to; codes (n, G), values (n, G, D),
    times (n,). With ``offsets``, an event at or below its user's ``applied_offset`` is a
    duplicate delivery and is skipped (that is what makes at-least-once delivery idempotent),
    and each user's ``applied_offset`` advances to the largest applied offset.
    """
    n = owner.shape[0]
    applied = np.ones(n, dtype=bool)
    if n == 0:
        return applied
    groups, n_codes, n_rates, dim = batch.shape
    if offsets is not None:
        applied = offsets > batch.applied_offset[owner]
        owner, codes, values, times_s, offsets = (
            owner[applied], codes[applied], values[applied], times_s[applied], offsets[applied]
        )
        if owner.shape[0] == 0:
            return applied
    touched = np.unique(owner)
    local = np.searchsorted(touched, owner)  # event -> row among touched users
    users = touched.shape[0]

    ell = batch.log_count[touched]  # (U, G, K, R), a copy
    had_events = batch.event_count[touched] > 0
    old_t0 = batch.landmark_t0[touched]
    batch_latest = _scatter_max(np.full(users, -np.inf), local, times_s)
    new_t0 = np.where(had_events, np.maximum(old_t0, batch_latest), batch_latest)

    # Move each landmark forward to the newest event: exact, ell shifts by -lambda (T1 - T0).
    shift = np.where(had_events, new_t0 - old_t0, 0.0)
    ell -= (shift[:, None] * decay_rates[None, :])[:, None, None, :]

    # One row per (event, group, rate): its cell and its forward-decay exponent a <= 0.
    n = times_s.shape[0]
    slot = (local[:, None] * groups + np.arange(groups)[None, :]) * n_codes + codes  # (n, G): user, group, code
    cell = (slot[:, :, None] * n_rates + np.arange(n_rates)[None, None, :]).reshape(-1)
    a = decay_rates[None, :] * (times_s - new_t0[local])[:, None]  # (n, R)
    a = np.broadcast_to(a[:, None, :], (n, groups, n_rates)).reshape(-1)

    # Per cell, in log space against its largest term (old sum or newest event): scatter-adds
    # over the dense (U, G, K, R) grid, which is small. The newest event of a (user, group,
    # code) has the largest exponent at every rate, so the peaks need a maximum over (n, G)
    # times, not over (n, G, R) exponents; means only over the cells the batch touches.
    newest = _scatter_max(np.full(users * groups * n_codes, -np.inf), slot.reshape(-1), np.repeat(times_s, groups))
    flat_ell = ell.reshape(-1)
    hits = np.bincount(cell, minlength=flat_ell.shape[0])
    target = np.flatnonzero(hits)  # touched cells, ascending: grouped by user
    target_slot = target // n_rates
    peak = np.maximum(flat_ell[target], decay_rates[target % n_rates]
                      * (newest[target_slot] - new_t0[target_slot // (groups * n_codes)]))
    compact = (np.cumsum(hits > 0) - 1)[cell]  # row -> index into target
    weight = np.exp(a - peak[compact])
    keep = np.exp(flat_ell[target] - peak)  # 0 for an empty cell
    total = keep + np.bincount(compact, weight, minlength=target.shape[0])
    weighted = _weighted_sums(compact.reshape(n, groups, n_rates), weight.reshape(n, groups, n_rates), values,
                              target.shape[0])

    # Means: gather and scatter only the touched cells, addressed in the whole batch, each
    # cell's mean vector as one element (a row gather moves bytes, not dim floats one by one).
    cells_per_user = groups * n_codes * n_rates
    row_cell = touched[target // cells_per_user] * cells_per_user + target % cells_per_user
    vector = np.dtype((np.void, dim * batch.mean.itemsize))
    flat_mean = batch.mean.reshape(-1, dim).view(vector).reshape(-1)  # a view: StateBatch keeps its arrays contiguous
    means = flat_mean[row_cell].view(np.float64).reshape(-1, dim)
    means *= keep[:, None]
    means += weighted
    means /= total[:, None]
    flat_mean[row_cell] = means.view(vector).reshape(-1)
    flat_ell[target] = peak + np.log(total)

    batch.log_count[touched] = ell
    batch.landmark_t0[touched] = new_t0
    batch.last_event_time[touched] = new_t0
    batch.event_count[touched] += np.bincount(local, minlength=users).astype(np.uint64)
    if offsets is not None:
        latest = _scatter_max(np.full(users, NO_OFFSET, dtype=np.int64), local, offsets.astype(np.int64))
        batch.applied_offset[touched] = np.maximum(batch.applied_offset[touched], latest)
    return applied


def _scatter_max(out: np.ndarray, index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``out[index[i]] = max(out[index[i]], values[i])`` for every i, in place; returns ``out``.
    ``np.maximum.at`` does the same unbuffered, element by element, and was the fold's
    slowest line; torch's scatter is compiled."""
    import torch  # here, not at the top: rankers read states with this module and no torch

    torch.from_numpy(out).scatter_reduce_(0, torch.from_numpy(np.ascontiguousarray(index, np.int64)),
                                          torch.from_numpy(np.ascontiguousarray(values, out.dtype)), "amax")
    return out


def _weighted_sums(cell: np.ndarray, weight: np.ndarray, values: np.ndarray, cells: int) -> np.ndarray:
    """Per cell, the sum of weight * value vector over the rows that land in it: ``cell`` and
    ``weight`` are (n, G, R), ``values`` (n, G, D); returns (cells, D) float64.

    One row-wise scatter-add (torch's ``index_add_``) per rate: a row of the (n * G, D)
    products lands in its cell whole, where 16 ``np.bincount`` calls, one per value dimension,
    took 63 ms against 28 on a chunk of 35,107 events (the whole fold: docs/performance.md)."""
    import torch  # see _scatter_max

    sums = torch.zeros((cells, values.shape[-1]), dtype=torch.float64)
    vectors = torch.from_numpy(np.ascontiguousarray(values, np.float64))
    for rate in range(cell.shape[2]):
        products = torch.from_numpy(np.ascontiguousarray(weight[:, :, rate])).unsqueeze(-1) * vectors
        sums.index_add_(0, torch.from_numpy(np.ascontiguousarray(cell[:, :, rate])).reshape(-1),
                        products.reshape(-1, values.shape[-1]))
    return sums.numpy()


def read_log_count(state: UserState, now_s: float, decay_rates: np.ndarray) -> np.ndarray:
    """log Z_{g,c,r}(t) at request time t, read at max(t, latest event) (vql.md section 6)."""
    elapsed = max(float(now_s), state.last_event_time) - state.landmark_t0
    return state.log_count - decay_rates * elapsed


def merge_states(first: UserState, second: UserState, decay_rates: np.ndarray) -> UserState:
    """The state of the union of two disjoint event sets (shards, backfills)."""
    if first.event_count == 0:
        return second
    if second.event_count == 0:
        return first
    landmark = max(first.landmark_t0, second.landmark_t0)
    ell_a = read_log_count(first, landmark, decay_rates)
    ell_b = read_log_count(second, landmark, decay_rates)
    ell = np.logaddexp(ell_a, ell_b)
    safe = np.where(np.isfinite(ell), ell, 0.0)
    weight_a = np.exp(ell_a - safe)[..., None]
    weight_b = np.exp(ell_b - safe)[..., None]
    mean = np.where(np.isfinite(ell)[..., None], weight_a * first.mean + weight_b * second.mean, 0.0)
    return UserState(
        user_id=first.user_id,
        model_version=first.model_version,
        landmark_t0=landmark,
        last_event_time=landmark,
        event_count=first.event_count + second.event_count,
        applied_offset=max(first.applied_offset, second.applied_offset),
        log_count=ell,
        mean=mean,
    )
