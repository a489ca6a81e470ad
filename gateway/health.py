"""``/healthz`` (really pings every dependency) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flashsale.devstack import ping_kafka
from gateway.app import METRICS, PG, REDIS, SETTINGS, json_response

PING_TIMEOUT_S = 2.0


async def _check(probe: Awaitable[object]) -> str | None:
    """None when the probe answered in time, else why not."""
    try:
        await asyncio.wait_for(probe, PING_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {PING_TIMEOUT_S:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure means down; say which
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]

    async def kafka() -> None:  # an unset KAFKA_BOOTSTRAP is reported as down, not raised
        await ping_kafka(settings.require_kafka(), PING_TIMEOUT_S)

    checks = {
        "redis": _check(app[REDIS].ping()),
        "postgres": _check(app[PG].fetchval("SELECT 1")),
        "kafka": _check(kafka()),
    }
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    down = {name: why for name, why in results.items() if why is not None}
    body = {
        "status": "ok" if not down else "down",
        "checks": {name: "ok" if why is None else f"down: {why}" for name, why in results.items()},
    }
    if down:
        body["error"] = {
            "code": "dependency_down",
            "message": "down: " + ", ".join(sorted(down)),
        }
    return json_response(body, 503 if down else 200)


async def metrics(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
