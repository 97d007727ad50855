"""The scoring service over HTTP (aiohttp): the library's ``score`` for backends in other languages.

Every failure leaves as a typed JSON body (:class:`vql.serving.api.ErrorBody`) with its own
status, never a 500 with a traceback: an unexpected exception is logged here and answered as
``internal_error``. docs/serving.md is the reference for callers.
"""

from __future__ import annotations

import logging

import numpy as np
import orjson
from aiohttp import web
from pydantic import ValidationError

from vql.model.features import Candidates
from vql.model.scoring import ModelVersionMismatch
from vql.schemas.user_state import StateFormatError
from vql.serving.api import ScoreRequest, openapi
from vql.serving.client import RankingClient
from vql.serving.errors import InvalidCandidates, StaleState, UserNotFound

log = logging.getLogger(__name__)

CLIENT_KEY = web.AppKey("client", RankingClient)
MAX_CANDIDATES_KEY = web.AppKey("max_candidates", int)
OPENAPI_KEY = web.AppKey("openapi", dict)
MAX_ERROR_DETAILS = 20  # a batch of 10^4 bad ids answers with the first few, not a megabyte

# What each failure of a score call answers: (type, HTTP status, error code).
_FAILURES: list[tuple[type[Exception], int, str]] = [
    (UserNotFound, 404, UserNotFound.code),
    (ModelVersionMismatch, 409, "model_version_mismatch"),
    (InvalidCandidates, 422, InvalidCandidates.code),
    (StaleState, 503, StaleState.code),
    (StateFormatError, 502, "unreadable_state"),  # the topic holds bytes this reader cannot parse
]


def error_response(status: int, code: str, message: str, details: list | None = None) -> web.Response:
    body = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


@web.middleware
async def typed_errors(request: web.Request, handler) -> web.StreamResponse:
    """Turn aiohttp's own errors (404, 405, 413) and any unexpected one into ErrorBody JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal_error", "unexpected error; the service log has the details")


def _validation_details(exc: ValidationError) -> list[dict]:
    return [{"loc": list(e["loc"]), "type": e["type"], "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)[:MAX_ERROR_DETAILS]]


async def score(request: web.Request) -> web.Response:
    client = request.app[CLIENT_KEY]
    try:
        body = ScoreRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        return error_response(422, "invalid_request", "the request does not match ScoreRequest (GET /openapi.json)",
                              _validation_details(exc))
    limit = request.app[MAX_CANDIDATES_KEY]
    if len(body.candidates.item) > limit:
        return error_response(422, "invalid_request", f"{len(body.candidates.item)} candidates exceed the limit of {limit}")
    if body.model_version is not None and body.model_version != client.model_version:
        return error_response(409, "model_version_mismatch",
                              f"the caller expects model {body.model_version}, the service loads {client.model_version}")
    columns = body.candidates
    candidates = Candidates(item=np.asarray(columns.item, np.int64), category=np.asarray(columns.category, np.int64),
                            modality=np.asarray(columns.modality, np.int64))
    try:
        ranking = client.score(body.user_id, candidates, body.now_s, allow_stale=body.allow_stale)
    except tuple(kind for kind, _, _ in _FAILURES) as exc:
        status, code = next((status, code) for kind, status, code in _FAILURES if isinstance(exc, kind))
        return error_response(status, code, str(exc))
    state = ranking.state
    result = {
        "user_id": state.user_id, "model_version": client.model_version, "event_count": state.event_count,
        "last_event_time": state.last_event_time, "stale": ranking.freshness.stale,
        "view_lag": ranking.freshness.lag, "ctr": ranking.scores.ctr,
        "interest": np.ascontiguousarray(ranking.scores.interest) if body.return_interest else None,
    }
    return web.Response(body=orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    client = request.app[CLIENT_KEY]
    fresh = client.freshness()
    body = {"status": "stale" if fresh.stale else "ready", "model_version": client.model_version,
            "topic": client.store.topic, "view_lag": fresh.lag, "view_age_s": fresh.age_s, "reason": fresh.reason}
    return web.Response(status=503 if fresh.stale else 200, body=orjson.dumps(body), content_type="application/json")


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[OPENAPI_KEY]), content_type="application/json")


def build_app(client: RankingClient, max_candidates: int = 10_000) -> web.Application:
    """The service's routes over ``client``; the caller owns the client's lifetime."""
    app = web.Application(middlewares=[typed_errors], client_max_size=64 * max_candidates + 4096)
    app[CLIENT_KEY] = client
    app[MAX_CANDIDATES_KEY] = max_candidates
    app[OPENAPI_KEY] = openapi(client.model_version)
    app.router.add_post("/v1/score", score)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/openapi.json", openapi_document)
    return app
