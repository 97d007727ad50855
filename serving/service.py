"""`vql serve`: the HTTP scoring service over a followed local view of the states topic."""

from __future__ import annotations

import logging

from aiohttp import web

from vql.serving.client import FreshnessPolicy, RankingClient
from vql.serving.http import build_app
from vql.serving.settings import ServingSettings
from vql.streams.settings import Settings

log = logging.getLogger(__name__)


def run_service(settings: Settings, serving: ServingSettings, follow: bool = True) -> None:
    """Restore the view, then serve until SIGINT/SIGTERM; the view is closed on the way out."""
    client = RankingClient.connect(
        settings.kafka_bootstrap, settings.states_topic, settings.model_path, serving.dir,
        policy=FreshnessPolicy(max_lag=serving.max_lag, max_silence_s=serving.max_silence_s),
        follow=follow, restore_timeout_s=serving.restore_timeout_s,
    )
    fresh = client.freshness()
    log.info("serving topic %s with model %s: view lag %s%s", settings.states_topic, client.model_version,
             fresh.lag, f" ({fresh.reason})" if fresh.stale else "")
    try:
        web.run_app(build_app(client, serving), host=serving.host, port=serving.port,
                    access_log=None, print=lambda text: log.info("%s", text.strip()))
    finally:
        client.close()
