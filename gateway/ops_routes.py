"""``/healthz`` (really pings every dependency, through the gateway's long-lived clients) and
``/metrics`` (Prometheus text)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from flashsale.ops_endpoints import health, metrics_text
from gateway.http import json_response
from gateway.state import METRICS, PROBES


async def healthz(request: web.Request) -> web.Response:
    probes = request.app[PROBES]
    status, body = await health(probes)
    return json_response(body, status)


async def metrics(request: web.Request) -> web.Response:
    payload = metrics_text(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
