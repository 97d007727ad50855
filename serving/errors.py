"""The failures a ranking backend must tell apart, each with a stable machine-readable code.

A backend reacts differently to each (skip the user, fall back to another ranker, page an
operator), so every one is its own type; the HTTP service sends the same ``code`` in its
error body (docs/serving.md lists them with their HTTP statuses).
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of the serving library's errors; ``code`` names the failure on every interface."""

    code = "serving_error"


class UserNotFound(ServingError, KeyError):
    """No state for this user in the local view: the user has no history yet, or was deleted
    (a tombstone), or the view has not caught up with the topic."""

    code = "user_not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StaleState(ServingError):
    """The local view cannot vouch that the state is current (behind the topic, or out of
    touch with the broker), and the caller asked for fresh states only."""

    code = "stale_state"


class InvalidCandidates(ServingError, ValueError):
    """The candidate columns do not describe a batch this model can score."""

    code = "invalid_candidates"


class StoreUnavailable(ServingError, RuntimeError):
    """The local store cannot be opened: another process holds it, or it is not a store."""

    code = "store_unavailable"


class StoreMismatch(StoreUnavailable):
    """The local store on disk was built from another topic than the one configured."""

    code = "store_mismatch"
