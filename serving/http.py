"""The scoring service over HTTP (aiohttp): the library's ``score`` for backends in other languages.

Every failure leaves as a typed JSON body (:class:`vql.serving.api.ErrorBody`) with its own
status, never a 500 with a traceback: an unexpected exception is logged here and answered as
``internal_error``. docs/serving.md is the reference for callers.

What a caller can make the service do is bounded (docs/security.md): with ``VQL_SERVE_TOKEN``
every request needs it as a bearer token (401); ids are int64 (422 beyond), candidates per
request and response bytes are capped (413); validation, scoring and serialization run in a
:class:`ScoringPool`, off the event loop, and a full pool answers 503 at once.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

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
from vql.serving.pool import Overloaded, ScoringPool
from vql.serving.settings import ServingSettings

log = logging.getLogger(__name__)

CLIENT_KEY = web.AppKey("client", RankingClient)
SETTINGS_KEY = web.AppKey("settings", ServingSettings)
POOL_KEY = web.AppKey("pool", ScoringPool)
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


def error_response(status: int, code: str, message: str, details: list | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def bearer_auth(token: str) -> Callable:
    """A middleware that answers 401 to any request without ``Authorization: Bearer <token>``
    (compared in constant time)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return error_response(401, "unauthorized", "this service needs Authorization: Bearer <VQL_SERVE_TOKEN>",
                                  headers={"WWW-Authenticate": 'Bearer realm="vql"'})
        return await handler(request)

    return check


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
    raw = await request.read()
    try:
        return await request.app[POOL_KEY].run(answer_score, request.app[CLIENT_KEY], request.app[SETTINGS_KEY], raw)
    except Overloaded as exc:
        return error_response(503, exc.code, str(exc), headers={"Retry-After": "1"})


def answer_score(client: RankingClient, settings: ServingSettings, raw: bytes) -> web.Response:
    """The whole answer to a score request, from its raw body: runs in a scoring thread."""
    try:
        body = ScoreRequest.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        return error_response(422, "invalid_request", "the request does not match ScoreRequest (GET /openapi.json)",
                              _validation_details(exc))
    limit = settings.max_candidates
    if len(body.candidates.item) > limit:
        return error_response(413, "too_many_candidates",
                              f"{len(body.candidates.item)} candidates exceed the limit of {limit} (VQL_SERVE_MAX_CANDIDATES)")
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
    encoded = orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
    if len(encoded) > settings.max_response_bytes:
        return error_response(413, "response_too_large",
                              f"the response would be {len(encoded):,} bytes, over the limit of "
                              f"{settings.max_response_bytes:,} (VQL_SERVE_MAX_RESPONSE_BYTES): send fewer candidates"
                              + (" or leave out return_interest" if body.return_interest else ""))
    return web.Response(body=encoded, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    client = request.app[CLIENT_KEY]
    fresh = client.freshness()
    body = {"status": "stale" if fresh.stale else "ready", "model_version": client.model_version,
            "topic": client.store.topic, "view_lag": fresh.lag, "view_age_s": fresh.age_s, "reason": fresh.reason}
    return web.Response(status=503 if fresh.stale else 200, body=orjson.dumps(body), content_type="application/json")


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[OPENAPI_KEY]), content_type="application/json")


def build_app(client: RankingClient, settings: ServingSettings | None = None) -> web.Application:
    """The service's routes over ``client`` with ``settings``' limits (default: the
    environment's); the caller owns the client's lifetime, the app its scoring pool."""
    settings = settings or ServingSettings()
    middlewares = [typed_errors]
    if settings.token is not None:
        middlewares.append(bearer_auth(settings.token.get_secret_value()))
    # Room for max_candidates ids of 19 digits in three columns, and the rest of the request.
    app = web.Application(middlewares=middlewares, client_max_size=64 * settings.max_candidates + 4096)
    app[CLIENT_KEY] = client
    app[SETTINGS_KEY] = settings
    app[POOL_KEY] = ScoringPool(settings.workers, settings.queue)

    async def close_pool(app: web.Application) -> None:
        app[POOL_KEY].close()

    app.on_cleanup.append(close_pool)
    app[OPENAPI_KEY] = openapi(client.model_version)
    app.router.add_post("/v1/score", score)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/openapi.json", openapi_document)
    return app
