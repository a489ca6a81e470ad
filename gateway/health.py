"""``/healthz`` (really pings every dependency) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from flashsale.devstack import ping_kafka
from flashsale.ops import PING_TIMEOUT_S, health, metrics_text
from gateway.app import METRICS, PG, REDIS, SETTINGS, json_response


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]

    async def kafka() -> None:  # an unset KAFKA_BOOTSTRAP is reported as down, not raised
        await ping_kafka(settings.require_kafka(), PING_TIMEOUT_S)

    status, body = await health({
        "redis": app[REDIS].ping,
        "postgres": lambda: app[PG].fetchval("SELECT 1"),
        "kafka": kafka,
    })  # fmt: skip
    return json_response(body, status)


async def metrics(request: web.Request) -> web.Response:
    payload = metrics_text(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
