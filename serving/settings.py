"""Settings of the scoring service (prefix VQL_SERVE_), apart from the worker's.

The broker, the states topic and the model artifact come from :class:`vql.streams.settings.Settings`
(VQL_KAFKA_BOOTSTRAP, VQL_STATES_TOPIC, VQL_MODEL_PATH), so a backend and the worker that
feeds it read the same variables; docs/serving.md lists these.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VQL_SERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the scoring service binds (0.0.0.0 in containers)")
    port: int = Field(8080, ge=1, le=65535, description="port of the scoring service")
    dir: Path = Field(Path(".vql/serving"), description="the local RocksDB copy of the states topic")
    max_lag: int = Field(1000, ge=0, description="states are stale when the view is more records behind than this")
    max_silence_s: float = Field(10.0, gt=0, description="states are stale after this long without the broker")
    max_candidates: int = Field(10_000, ge=1, description="largest candidate batch of one request (more: 413)")
    max_response_bytes: int = Field(
        16 * 1024 * 1024, ge=1024,
        description="largest response body (interest vectors grow with the candidates): larger is a 413")
    token: SecretStr | None = Field(
        None, description="bearer token every request must carry (Authorization: Bearer ...); unset: no auth")
    workers: int = Field(2, ge=1, description="threads that score, off the event loop")
    queue: int = Field(32, ge=0, description="requests admitted to wait for a scoring thread; more are a 503")
    restore_timeout_s: float = Field(120.0, gt=0, description="longest catch-up with the topic before serving")
