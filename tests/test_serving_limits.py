"""What a caller can make the HTTP scorer do is bounded: a bearer token when one is set, ids
within int64, candidates and response bytes capped, and scoring in a bounded pool off the
event loop (a full pool is a 503 at once, and health checks answer while scores run)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from aiohttp.test_utils import TestClient, TestServer

from test_serving import request, score_body, served  # noqa: F401 - served is a fixture
from vql.serving.http import POOL_KEY, build_app
from vql.serving.settings import ServingSettings


def limits(**overrides) -> ServingSettings:
    return ServingSettings(**{"token": None, **overrides})


def test_a_token_set_is_required_on_every_route(served):
    app = lambda: build_app(served[3], limits(token="s3cret"))  # noqa: E731 - a fresh app per request
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, body = request(app(), "POST", "/v1/score", json=score_body(), headers=headers)
        assert (status, body["error"]) == (401, "unauthorized")
    assert request(app(), "GET", "/v1/health")[0] == 401
    assert request(app(), "GET", "/openapi.json")[0] == 401
    status, body = request(app(), "POST", "/v1/score", json=score_body(), headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and len(body["ctr"]) == 3
    assert request(build_app(served[3], limits()), "POST", "/v1/score", json=score_body())[0] == 200


@pytest.mark.parametrize("column", ["item", "category"])
def test_ids_beyond_int64_are_invalid_requests_not_server_errors(served, column):
    candidates = {"item": [1], "category": [1], "modality": [0]}
    status, body = request(build_app(served[3], limits()), "POST", "/v1/score",
                           json=score_body(candidates={**candidates, column: [2**64]}))
    assert (status, body["error"]) == (422, "invalid_request")
    assert body["details"][0]["loc"][:2] == ["candidates", column]
    status, _ = request(build_app(served[3], limits()), "POST", "/v1/score",
                        json=score_body(candidates={**candidates, column: [2**63 - 1]}))
    assert status == 200


def test_too_many_candidates_is_413(served):
    status, body = request(build_app(served[3], limits(max_candidates=2)), "POST", "/v1/score", json=score_body())
    assert (status, body["error"]) == (413, "too_many_candidates") and "VQL_SERVE_MAX_CANDIDATES" in body["message"]


def test_a_response_over_the_limit_is_413(served):
    app = lambda: build_app(served[3], limits(max_response_bytes=1024))  # noqa: E731
    status, body = request(app(), "POST", "/v1/score", json=score_body(return_interest=True))
    assert (status, body["error"]) == (413, "response_too_large") and "return_interest" in body["message"]
    assert request(app(), "POST", "/v1/score", json=score_body())[0] == 200


class BlockingScores:
    """Wraps a client's ``score`` so that calls wait until released (or 10 s pass)."""

    def __init__(self, client, monkeypatch) -> None:
        self.entered, self.release, self.done = threading.Event(), threading.Event(), threading.Event()
        original = client.score

        def score(*args, **kwargs):
            self.entered.set()
            self.release.wait(10)
            self.done.set()
            return original(*args, **kwargs)

        monkeypatch.setattr(client, "score", score)


def test_scoring_runs_off_the_event_loop(served, monkeypatch):
    """A health check answers while a score is still running: the loop is not blocked (on a
    blocked loop the health answer would come only after the score had finished)."""
    blocking = BlockingScores(served[3], monkeypatch)

    async def go():
        async with TestClient(TestServer(build_app(served[3], limits()))) as http:
            scoring = asyncio.ensure_future(http.post("/v1/score", json=score_body()))
            await asyncio.get_running_loop().run_in_executor(None, blocking.entered.wait, 10)
            health = await http.get("/v1/health")
            answered_while_scoring = not blocking.done.is_set()
            blocking.release.set()
            return health.status, answered_while_scoring, (await scoring).status

    assert asyncio.run(go()) == (200, True, 200)


def test_a_full_pool_answers_503_at_once(served, monkeypatch):
    blocking = BlockingScores(served[3], monkeypatch)

    async def go():
        app = build_app(served[3], limits(workers=1, queue=1))
        async with TestClient(TestServer(app)) as http:
            first = asyncio.ensure_future(http.post("/v1/score", json=score_body()))
            await asyncio.get_running_loop().run_in_executor(None, blocking.entered.wait, 10)
            second = asyncio.ensure_future(http.post("/v1/score", json=score_body()))
            for _ in range(1000):  # until the second is queued behind the first (10 s at most)
                if app[POOL_KEY].admitted >= 2:
                    break
                await asyncio.sleep(0.01)
            third = await http.post("/v1/score", json=score_body())
            refused = third.status, (await third.json())["error"], third.headers.get("Retry-After")
            blocking.release.set()
            return refused, (await first).status, (await second).status

    assert asyncio.run(go()) == ((503, "overloaded", "1"), 200, 200)
