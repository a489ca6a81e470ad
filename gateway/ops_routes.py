"""The probes and ``/metrics``: ``/livez`` (the process answers), ``/readyz`` (every dependency
pinged through the gateway's long-lived clients, at most about once a second; see
:class:`flashsale.ops_endpoints.Readiness`), ``/healthz`` (the same), ``/metrics``."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from flashsale.ops_endpoints import LIVE, metrics_text
from gateway.http import json_response
from gateway.state import METRICS, READINESS


async def livez(_request: web.Request) -> web.Response:
    return json_response(LIVE)


async def readyz(request: web.Request) -> web.Response:
    status, body = await request.app[READINESS].check()
    return json_response(body, status)


async def metrics(request: web.Request) -> web.Response:
    await request.app[READINESS].check()  # flashsale_dependency_up, at most once a second
    payload = metrics_text(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", readyz)
    app.router.add_get("/metrics", metrics)
