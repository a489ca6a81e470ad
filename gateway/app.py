"""The gateway's aiohttp application: state under typed AppKeys, clients owned by one cleanup
context, domain errors mapped to HTTP in one middleware.

Routes live next to what they serve (``admin.py``, ``public.py``, ``health.py``); this module
only wires them together.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from flashsale.clients import pg_pool, redis_client
from flashsale.errors import FlashsaleError
from flashsale.sales import SaleAdmin
from flashsale.settings import Settings
from gateway.metrics import ERROR_CODE, Metrics

log = logging.getLogger("flashsale.gateway")

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
PG = web.AppKey("pg", asyncpg.Pool)
SALES = web.AppKey("sales", SaleAdmin)
METRICS = web.AppKey("metrics", Metrics)

MAX_BODY = 16 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    data: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    response = json_response({"error": {"code": code, "message": message}}, status, headers)
    response[ERROR_CODE] = code
    return response


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where exceptions become HTTP: domain errors by their ``http_status`` and
    stable ``code``, aiohttp's own (404, 405, 413) in the same JSON shape, anything else a
    logged 500 that names no internals."""
    try:
        return await handler(request)
    except FlashsaleError as exc:
        return error_response(exc.http_status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status, "http_error"
        )
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(exc.status, code, exc.reason, headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error")


async def clients(app: web.Application) -> AsyncIterator[None]:
    """Open every client the gateway uses, and close them when the app stops."""
    settings = app[SETTINGS]
    redis = redis_client(settings)
    pool = await pg_pool(settings, min_size=1, max_size=10)
    app[REDIS] = redis
    app[PG] = pool
    app[SALES] = SaleAdmin.build(pool, redis)
    try:
        yield
    finally:
        await pool.close()
        await redis.aclose()


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    from gateway import admin, health, public  # noqa: PLC0415 - they import this module

    metrics = Metrics(registry or CollectorRegistry())
    app = web.Application(
        middlewares=[metrics.middleware, errors, admin.require_admin],
        client_max_size=MAX_BODY,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app.cleanup_ctx.append(clients)
    health.setup(app)
    public.setup(app)
    admin.setup(app)
    return app
