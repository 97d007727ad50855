"""CTR metrics: AUC, group AUC (per user, weighted by impressions) and log loss."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN without both classes."""
    labels = np.asarray(labels) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores))
    # Average ranks over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean of per-user AUCs weighted by the user's samples, over users with both classes."""
    order = np.argsort(users, kind="mergesort")
    users, labels, scores = users[order], labels[order], scores[order]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    total, weight = 0.0, 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        value = auc(labels[start:end], scores[start:end])
        if not np.isnan(value):
            total += value * (end - start)
            weight += end - start
    return total / weight if weight else float("nan")


def logloss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(probabilities, eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
