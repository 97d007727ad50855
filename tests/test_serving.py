"""The serving library and its HTTP service: same scores as the scorer and the reference
attention, typed errors on every interface, and a scoring path free of torch and Faust."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from test_state_math import build_state, make_model, random_candidates, random_events
from vql.model.features import Candidates
from vql.model.scoring import ModelVersionMismatch
from vql.schemas.user_state import encode_user_state
from vql.serving import InvalidCandidates, RankingClient, StaleState, StoreMismatch, StoreUnavailable, UserNotFound
from vql.serving.follower import FollowerStatus
from vql.serving.http import build_app
from vql.serving.store import StateStore

TOPIC = "test.user-states"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A model, one user's events and state, and a client over a store holding the state as published."""
    work = tmp_path_factory.mktemp("serving")
    model, scorer = make_model(work)
    rng = np.random.default_rng(3)
    events = random_events(rng, 2000)
    state = build_state(model, scorer.version, events, [np.arange(2000)])
    state.user_id = "alice"
    store = StateStore(work / "store", TOPIC)
    store.apply([(b"alice", encode_user_state(state, np.float32))], {0: 1})
    client = RankingClient(scorer, store)
    yield model, events, state, client, work
    client.close()


def test_client_scores_equal_the_scorer_and_the_reference_attention(served):
    model, events, state, client, _ = served
    candidates = random_candidates(np.random.default_rng(4), 50)
    now = events.time_s.max() + 7200
    ranking = client.score("alice", candidates, now)
    direct = client.scorer.score(state, candidates, now)
    assert np.abs(ranking.scores.ctr - direct.ctr).max() <= 1e-5
    assert np.abs(ranking.scores.interest - model.attend(events, candidates, now).numpy()).max() <= 1e-5
    assert ranking.state.event_count == 2000 and not ranking.freshness.stale


def test_library_errors_are_typed(served, tmp_path):
    _, events, state, client, _ = served
    candidates = random_candidates(np.random.default_rng(5), 3)
    with pytest.raises(UserNotFound, match="bob"):
        client.score("bob", candidates)
    with pytest.raises(InvalidCandidates):
        client.score("alice", Candidates(item=np.array([1, 2]), category=np.array([1]), modality=np.array([0])))
    with pytest.raises(InvalidCandidates):
        client.score("alice", Candidates(item=np.array([1]), category=np.array([1]), modality=np.array([9])))
    with pytest.raises(StoreUnavailable, match="lock"):  # one process owns a store
        StateStore(served[4] / "store", TOPIC)
    StateStore(tmp_path / "store", TOPIC).close()
    with pytest.raises(StoreMismatch):
        StateStore(tmp_path / "store", "another-topic")
    stranger = RankingClient(make_model(tmp_path, seed=9)[1], client.store)
    with pytest.raises(ModelVersionMismatch):
        stranger.score("alice", candidates)


class LaggingFollower:
    """A follower that reports a fixed status: freshness without a broker."""

    def __init__(self, lag: int, age_s: float) -> None:
        self.status = FollowerStatus(lag={0: lag}, checked_at=time.monotonic() - age_s)

    def stop(self) -> None:
        pass


def test_stale_views_refuse_unless_allowed(served):
    _, _, _, client, _ = served
    candidates = random_candidates(np.random.default_rng(6), 3)
    for follower in (LaggingFollower(lag=5000, age_s=0), LaggingFollower(lag=0, age_s=60)):
        lagging = RankingClient(client.scorer, client.store, follower)
        with pytest.raises(StaleState):
            lagging.score("alice", candidates)
        assert lagging.score("alice", candidates, allow_stale=True).freshness.stale
    assert not RankingClient(client.scorer, client.store, LaggingFollower(lag=3, age_s=1)).freshness().stale


def request(app, method: str, path: str, **kwargs) -> tuple[int, dict]:
    """One request to the app on a test server; the status and the JSON body (every answer is JSON)."""

    async def go():
        async with TestClient(TestServer(app)) as http:
            response = await http.request(method, path, **kwargs)
            assert response.content_type == "application/json"
            return response.status, json.loads(await response.read())

    return asyncio.run(go())


def score_body(**overrides) -> dict:
    return {"user_id": "alice", "candidates": {"item": [1, 2, 3], "category": [4, 5, 6], "modality": [0, 1, 2]},
            **overrides}


def test_http_scores_what_the_library_scores(served):
    _, events, _, client, _ = served
    now = float(events.time_s.max() + 60)
    status, body = request(build_app(client), "POST", "/v1/score",
                           json=score_body(now_s=now, return_interest=True, model_version=client.model_version))
    assert status == 200
    expected = client.score("alice", Candidates(np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([0, 1, 2])), now)
    assert np.abs(np.array(body["ctr"]) - expected.scores.ctr).max() <= 1e-12
    assert np.array(body["interest"]).shape == expected.scores.interest.shape
    assert body["event_count"] == 2000 and body["stale"] is False and body["view_lag"] is None


@pytest.mark.parametrize("kwargs, status, code", [
    (dict(json=score_body(user_id="bob")), 404, "user_not_found"),
    (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "malformed_json"),
    (dict(json=score_body(candidates={"item": ["a"], "category": [1], "modality": [0]})), 422, "invalid_request"),
    (dict(json=score_body(candidates={"item": [1, 2], "category": [1], "modality": [0]})), 422, "invalid_request"),
    (dict(json=score_body(candidates={"item": [1], "category": [1], "modality": [7]})), 422, "invalid_request"),
    (dict(json=score_body(now_s="soon")), 422, "invalid_request"),
    (dict(json=score_body(surprise=1)), 422, "invalid_request"),
    (dict(json=[1, 2]), 422, "invalid_request"),
    (dict(json=score_body(model_version="0123456789abcdef")), 409, "model_version_mismatch"),
])
def test_http_errors_are_typed(served, kwargs, status, code):
    got, body = request(build_app(served[3]), "POST", "/v1/score", **kwargs)
    assert (got, body["error"]) == (status, code)
    assert body["message"] and "Traceback" not in json.dumps(body)
    if code == "invalid_request" and status == 422:
        assert body["details"] and all({"loc", "type", "msg"} <= set(d) for d in body["details"])


def test_http_stale_state_and_other_models_state(served, tmp_path):
    _, _, state, client, _ = served
    lagging = RankingClient(client.scorer, client.store, LaggingFollower(lag=5000, age_s=0))
    status, body = request(build_app(lagging), "POST", "/v1/score", json=score_body())
    assert (status, body["error"]) == (503, "stale_state") and "behind" in body["message"]
    status, body = request(build_app(lagging), "POST", "/v1/score", json=score_body(allow_stale=True))
    assert status == 200 and body["stale"] is True and body["view_lag"] == 5000
    assert request(build_app(lagging), "GET", "/v1/health")[0] == 503

    store = StateStore(tmp_path / "store", TOPIC)
    store.apply([(b"alice", encode_user_state(state, np.float32)), (b"mallory", b"VQLS garbage")], {})
    stranger = RankingClient(make_model(tmp_path, seed=9)[1], store)
    status, body = request(build_app(stranger), "POST", "/v1/score", json=score_body())
    assert (status, body["error"]) == (409, "model_version_mismatch")
    status, body = request(build_app(stranger), "POST", "/v1/score", json=score_body(user_id="mallory"))
    assert (status, body["error"]) == (502, "unreadable_state")
    store.close()


def test_http_unexpected_errors_are_json_without_traceback(served, monkeypatch):
    client = served[3]
    monkeypatch.setattr(client, "score", lambda *a, **k: 1 / 0)
    status, body = request(build_app(client), "POST", "/v1/score", json=score_body())
    assert (status, body["error"]) == (500, "internal_error") and "ZeroDivision" not in json.dumps(body)
    assert request(build_app(client), "GET", "/nowhere")[1]["error"] == "not_found"
    assert request(build_app(client), "GET", "/v1/score")[1]["error"] == "method_not_allowed"


def test_openapi_document_is_served_and_its_references_resolve(served):
    status, doc = request(build_app(served[3]), "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/score", "/v1/health", "/openapi.json"} <= set(doc["paths"])
    refs = {m for m in _walk(doc) if isinstance(m, str) and m.startswith("#/")}
    for ref in refs:
        node = doc
        for part in ref[2:].split("/"):
            node = node[part]
    assert "#/components/schemas/ScoreRequest" in refs and "#/components/schemas/ErrorBody" in refs
    status, health = request(build_app(served[3]), "GET", "/v1/health")
    assert status == 200 and health["status"] == "ready"


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value) if key != "$ref" else [value]
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_scoring_imports_neither_torch_nor_faust(served, tmp_path):
    _, _, state, client, _ = served
    store_path = tmp_path / "store"
    store = StateStore(store_path, TOPIC)
    store.apply([(b"alice", encode_user_state(state, np.float32))], {})
    store.close()
    artifact = next(served[4].glob("model-*.npz"))
    script = f"""
import sys
import numpy as np
from pathlib import Path
from vql.serving import Candidates, RankingClient
from vql.model.scoring import Scorer
from vql.serving.store import StateStore
client = RankingClient(Scorer.from_path({str(artifact)!r}), StateStore(Path({str(store_path)!r}), {TOPIC!r}))
ranking = client.score("alice", Candidates(np.array([1]), np.array([2]), np.array([0])))
assert ranking.scores.ctr.shape == (1,)
print(sorted(m for m in ("torch", "faust", "aiohttp") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
