"""The gateway's aiohttp application: state under typed AppKeys, clients owned by one cleanup
context, domain errors mapped to HTTP in one middleware.

Routes live next to what they serve (``admin.py``, ``public.py``, ``health.py``); this module
only wires them together.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import asyncpg
import orjson
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from allocator.allocator import Allocators
from allocator.queue import Joins, QueueScripts
from allocator.scripts import HoldScripts
from flashsale.clients import pg_pool, redis_client
from flashsale.errors import ConfigError, FlashsaleError
from flashsale.marks import QueueMarks
from flashsale.sales import SaleAdmin
from flashsale.settings import Settings
from flashsale.tokens import Signer
from gateway.counters import CounterCache
from gateway.metrics import ERROR_CODE, Metrics
from gateway.protect import RateLimiter

log = logging.getLogger("flashsale.gateway")

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
PG = web.AppKey("pg", asyncpg.Pool)
SALES = web.AppKey("sales", SaleAdmin)
METRICS = web.AppKey("metrics", Metrics)
QUEUE = web.AppKey("queue", QueueScripts)
JOINS = web.AppKey("joins", Joins)
HOLDS = web.AppKey("holds", HoldScripts)
ALLOCATORS = web.AppKey("allocators", Allocators)
LIMITER = web.AppKey("limiter", RateLimiter)
COUNTERS = web.AppKey("counters", CounterCache)
MARKS = web.AppKey("marks", QueueMarks)


@dataclass(frozen=True, slots=True)
class Signers:
    """Buyer tokens are the storefront's (``FLASHSALE_BUYER_TOKEN_SECRET``); queue tickets and
    admission tokens are the engine's own (``FLASHSALE_SECRET``)."""

    buyer: Signer
    ticket: Signer
    admission: Signer

    @classmethod
    def from_settings(cls, settings: Settings) -> Signers:
        buyer, own = settings.buyer_token_secret.reveal(), settings.secret.reveal()
        for name, value in (("FLASHSALE_BUYER_TOKEN_SECRET", buyer), ("FLASHSALE_SECRET", own)):
            if len(value.split(",")[0].strip()) < 16:
                raise ConfigError(f"{name} must be set to a secret of at least 16 characters")
        return cls(
            Signer.from_setting(buyer, "buyer"),
            # Every waiting buyer presents the same ticket on each poll: remember verified ones.
            Signer.from_setting(own, "ticket", remember=TICKETS_REMEMBERED),
            Signer.from_setting(own, "admission"),
        )


SIGNERS = web.AppKey("signers", Signers)
TICKETS_REMEMBERED = 100_000  # per process: about 70 MB when full (claims, token strings)

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


Guard = Callable[[web.Request], None]


def error_for(request: web.Request, exc: Exception) -> web.Response:
    """The one place where exceptions become HTTP: domain errors by their ``http_status`` and
    stable ``code``, aiohttp's own (404, 405, 413) in the same JSON shape, an unreachable
    dependency 503, anything else a logged 500 that names no internals. Re-raises aiohttp's
    redirects, which are not errors."""
    if isinstance(exc, FlashsaleError):
        headers = None
        if exc.retry_after_s is not None:
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return error_response(exc.http_status, exc.code, exc.message, headers)
    if isinstance(exc, DEPENDENCY_ERRORS):
        log.warning("dependency unavailable on %s %s: %r", request.method, request.path, exc)
        return error_response(503, "unavailable", "a dependency is unavailable; retry shortly",
                              {"Retry-After": "1"})  # fmt: skip
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status, "http_error"
        )
        kept = ("allow", "retry-after")
        headers = {k: v for k, v in exc.headers.items() if k.lower() in kept}
        return error_response(exc.status, code, exc.reason, headers)
    if isinstance(exc, web.HTTPException):
        raise exc
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal", "internal error")


DEPENDENCY_ERRORS = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
    asyncpg.PostgresConnectionError, OSError,
)  # fmt: skip


def edge(metrics: Metrics, limit: int, guard: Guard) -> Middleware:
    """The gateway's one middleware, so each request pays for one layer:

    * the per-process in-flight cap: beyond ``limit`` concurrent requests, 503 ``overloaded``
      with ``Retry-After`` at once instead of queueing without bound (``/healthz`` and
      ``/metrics`` are exempt, so operators can still look);
    * ``guard`` before any handler and before routing errors, so an unauthorised admin path
      is 401 even when it does not exist;
    * every exception mapped to HTTP by :func:`error_for`;
    * every answer counted and timed, refusals by reason.
    """
    exempt = frozenset({"/healthz", "/metrics"})
    gauge = metrics.in_flight
    current = 0
    published = 0.0  # when the in-flight gauge was last set

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal current, published
        began = time.perf_counter()
        counted = request.path not in exempt
        if counted and current >= limit:
            response: web.StreamResponse = error_response(
                503, "overloaded", "the gateway is at capacity; retry shortly",
                {"Retry-After": "1"},
            )  # fmt: skip
        else:
            if counted:
                current += 1
            try:
                guard(request)
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - the error boundary: error_for logs or re-raises
                response = error_for(request, exc)
            finally:
                if counted:
                    current -= 1
        # The gauge is a shared-memory write in multiprocess mode: set it at most every
        # 50 ms rather than twice per request.
        if began - published >= 0.05:
            published = began
            gauge.set(current)
        metrics.observe(request, response, began)
        return response

    return middleware


async def clients(app: web.Application) -> AsyncIterator[None]:
    """Open every client the gateway uses, and close them when the app stops."""
    settings = app[SETTINGS]
    redis = redis_client(settings)
    pool = await pg_pool(settings, min_size=1, max_size=10)
    app[REDIS] = redis
    app[PG] = pool
    app[SALES] = SaleAdmin.build(pool, redis)
    app[QUEUE] = queue = QueueScripts(redis)
    app[HOLDS] = holds = HoldScripts(redis)
    app[ALLOCATORS] = allocators = Allocators(holds)
    app[JOINS] = joins = Joins(queue)
    app[LIMITER] = limiter = RateLimiter(redis)
    app[MARKS] = marks = QueueMarks(f"gateway:{socket.gethostname()}:{os.getpid()}")
    app[COUNTERS] = CounterCache(queue, marks=marks)
    stop = asyncio.Event()
    checkpoints = asyncio.create_task(marks.run(pool, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait({checkpoints})  # a last flush; a cancelled task is just done
        await allocators.aclose()
        await joins.aclose()
        await limiter.aclose()
        await pool.close()
        await redis.aclose()


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    from gateway import (  # noqa: PLC0415 - they import this module
        admin,
        health,
        openapi,
        page,
        public,
        queue,
        reservations,
    )  # fmt: skip

    metrics = Metrics(registry or CollectorRegistry())
    app = web.Application(
        middlewares=[edge(metrics, settings.max_in_flight, admin.require_admin)],
        client_max_size=MAX_BODY,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[SIGNERS] = Signers.from_settings(settings)
    app.cleanup_ctx.append(clients)
    health.setup(app)
    public.setup(app)
    admin.setup(app)
    queue.setup(app)
    reservations.setup(app)
    openapi.setup(app)
    page.setup(app)
    return app
