"""The user-grouped batch layout the CTR models consume (:class:`UserBatch`).

It lives with the runtime model, not with the training data, because the encoder builds one
itself (:meth:`vql.model.encoder.VQLModel.attend` puts one user's events in a one-row batch);
the training data module (vql.research.datasets) produces the same layout from a data set.

numpy only; torch is never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserBatch:
    """A batch grouped by user: every target of a user attends over that user's events,
    each target seeing only its own prefix (visible[b, t] events).

    Row b holds the user's events, oldest first, LEFT-aligned at positions [0, n_b) and padded
    after (event_mask). The row ends at the largest ``history_end`` among the user's samples in
    the batch; with ``max_events`` it keeps only the newest ``max_events`` of them (the oldest
    are dropped). Target t of row b may see positions [0, visible[b, t]): the row's events that
    precede its own ``history_end``.

    The row usually holds events that some of its targets must NOT see (later interactions,
    whose action can give away a label): every model must mask by ``visible``, never pool over
    ``event_mask`` alone. ``max_events`` caps the row, not each target's window: a target whose
    history ends early in a truncated row sees fewer events (possibly none). For a per-target
    "last k behaviors" baseline, keep the full row (or a generous cap) and mask positions
    [visible - k, visible).
    """

    # events, padded to the longest history in the batch (after truncation to max_events)
    item: np.ndarray  # (B, L) int64, padding 0
    action: np.ndarray  # (B, L) int64, padding 0
    category: np.ndarray  # (B, L) int64, padding 0
    modality: np.ndarray  # (B, L) int64, padding 0
    time_s: np.ndarray  # (B, L) float64, padding 0
    event_mask: np.ndarray  # (B, L) bool, True for real events
    # targets, padded to the most targets of a user in the batch
    target_item: np.ndarray  # (B, T) int64
    target_category: np.ndarray  # (B, T) int64
    target_modality: np.ndarray  # (B, T) int64
    target_time_s: np.ndarray  # (B, T) float64
    visible: np.ndarray  # (B, T) int64: target t sees events [0, visible) of row b
    label: np.ndarray  # (B, T) float32
    target_mask: np.ndarray  # (B, T) bool
    sample_index: np.ndarray  # (B, T) int64 index into the Samples (-1 padding)
    user: np.ndarray  # (B,) int64
