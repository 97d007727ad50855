"""vql.serving: what a ranking backend installs to score candidates against user states.

``RankingClient.connect(...)`` keeps a local RocksDB copy of the compacted `user-states`
topic (restored on start, then followed, its lag exposed) and ``client.score(user_id,
candidates, now)`` returns interest vectors and CTR scores from numpy alone: importing this
package loads neither torch nor Faust (tests/test_serving.py checks). The HTTP service
(:mod:`vql.serving.http`, `vql serve`) wraps the same call; docs/serving.md describes both.
"""

from vql.model.features import Candidates
from vql.model.scoring import ModelVersionMismatch, Scores
from vql.serving.client import Freshness, FreshnessPolicy, Ranking, RankingClient
from vql.serving.errors import InvalidCandidates, ServingError, StaleState, StoreMismatch, StoreUnavailable, UserNotFound

__all__ = [
    "Candidates",
    "Freshness",
    "FreshnessPolicy",
    "InvalidCandidates",
    "ModelVersionMismatch",
    "Ranking",
    "RankingClient",
    "Scores",
    "ServingError",
    "StaleState",
    "StoreMismatch",
    "StoreUnavailable",
    "UserNotFound",
]
