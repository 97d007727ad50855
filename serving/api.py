"""The HTTP service's request and response bodies, and the OpenAPI document built from them.

One set of pydantic models is both the validator and the published schema, so the contract a
Java or Go backend reads (GET /openapi.json) cannot drift from what the service enforces.
Candidates travel as columns, which is how the scorer consumes them and a third of the JSON.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic.json_schema import models_json_schema

from vql.schemas.events import Modality

INT64_MAX = 2**63 - 1
NonNegative = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]  # ids are int64 in the scorer and the state


class CandidateColumns(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item: list[NonNegative] = Field(min_length=1, description="item ids")
    category: list[NonNegative] = Field(min_length=1, description="category ids")
    modality: list[Annotated[StrictInt, Field(ge=0, lt=len(Modality))]] = Field(
        min_length=1, description="modality index: " + ", ".join(f"{i} {m.value}" for i, m in enumerate(Modality)))

    @model_validator(mode="after")
    def _same_length(self) -> "CandidateColumns":
        if not len(self.item) == len(self.category) == len(self.modality):
            raise ValueError("item, category and modality must have the same length")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=1024)
    candidates: CandidateColumns
    now_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                description="request time, epoch seconds (default: the service's clock)")
    model_version: str | None = Field(None, description="the model the caller expects; 409 if the service loads another")
    allow_stale: StrictBool = Field(False, description="score even when the view cannot vouch for the state (flagged)")
    return_interest: StrictBool = Field(False, description="also return the (N, H, d_h) interest vectors")


class ScoreResponse(BaseModel):
    user_id: str
    model_version: str
    event_count: int = Field(description="events in the user's state")
    last_event_time: float = Field(description="epoch seconds of the newest event in the state")
    stale: bool = Field(description="true when served under allow_stale from a view that cannot vouch for it")
    view_lag: int | None = Field(description="records the view is behind the topic (null without a follower)")
    ctr: list[float] = Field(description="CTR probability per candidate, in request order")
    interest: list[list[list[float]]] | None = Field(None, description="(N, H, d_h), with return_interest")


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code: " + ", ".join(
        ["malformed_json", "invalid_request", "invalid_candidates", "user_not_found", "stale_state",
         "model_version_mismatch", "unreadable_state", "not_found", "method_not_allowed", "request_too_large",
         "too_many_candidates", "response_too_large", "unauthorized", "overloaded", "http_error", "internal_error"]))
    message: str
    details: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: str = Field(description="ready, or stale when the view cannot vouch for its states")
    model_version: str
    topic: str
    view_lag: int | None
    view_age_s: float | None
    reason: str


def openapi(model_version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service (JSON Schema 2020-12 components)."""
    _, schemas = models_json_schema(
        [(m, "validation" if m is ScoreRequest else "serialization")
         for m in (ScoreRequest, ScoreResponse, ErrorBody, Health)],
        ref_template="#/components/schemas/{model}",
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": ref("ErrorBody")}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "vql-stream scoring service", "version": model_version,
                 "description": "Scores candidates against a user's VQL state (docs/serving.md)."},
        "paths": {
            "/v1/score": {"post": {
                "operationId": "score",
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("ScoreRequest")}}},
                "responses": {
                    "200": {"description": "scores in request order",
                            "content": {"application/json": {"schema": ref("ScoreResponse")}}},
                    "400": error("malformed_json: the body is not JSON"),
                    "401": error("unauthorized: the service has a token and the request lacks it"),
                    "404": error("user_not_found: no state for this user"),
                    "409": error("model_version_mismatch: the caller's or the state's model is not the service's"),
                    "413": error("request_too_large / too_many_candidates / response_too_large: over a limit"),
                    "422": error("invalid_request / invalid_candidates: wrong fields or types (ids beyond int64 "
                                 "included); details per field"),
                    "503": error("stale_state: the view cannot vouch for the state (retry, or allow_stale); "
                                 "overloaded: every scoring thread busy and the queue full (Retry-After)"),
                },
            }},
            "/v1/health": {"get": {
                "operationId": "health",
                "responses": {"200": {"description": "ready", "content": {"application/json": {"schema": ref("Health")}}},
                              "503": {"description": "stale", "content": {"application/json": {"schema": ref("Health")}}}},
            }},
            "/openapi.json": {"get": {"operationId": "openapi",
                                      "responses": {"200": {"description": "this document"}}}},
        },
        "components": {"schemas": schemas["$defs"]},
    }
