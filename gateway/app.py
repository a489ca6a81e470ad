"""The gateway's aiohttp application, wired: settings, signers and metrics under AppKeys
(:mod:`gateway.state`), every client opened and closed by one cleanup context, the one
middleware (:mod:`gateway.middleware`), and the route modules."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from allocator.hold_scripts import HoldScripts
from allocator.queue_scripts import Joins, Places, QueueScripts
from allocator.rate_limits import RateLimiter
from allocator.sale_admin import SaleAdmin
from allocator.sku_allocator import Allocators
from flashsale.clients import open_clients
from flashsale.errors import NotFound
from flashsale.inflight import InFlight
from flashsale.kafka import LagCache
from flashsale.ops_endpoints import KafkaProbe, Readiness, dependency_probes
from flashsale.queue_marks import QueueMarks
from flashsale.settings import Settings
from flashsale.tokens import Signers
from gateway import (
    admin,
    challenge,
    console,
    cors,
    openapi,
    ops_routes,
    page,
    reservations,
    sale_info,
    waiting_room,
)
from gateway.announcer import Announcer
from gateway.counters import CounterCache
from gateway.http import MAX_BODY
from gateway.lane import HOT, RESERVE, Lane
from gateway.metrics import Metrics
from gateway.middleware import Budgets, edge
from gateway.state import (
    ALLOCATORS,
    ANNOUNCER,
    CATALOG,
    CATALOG_READS,
    CLIENTS,
    COUNTERS,
    FAIRNESS,
    HOLDS,
    JOINS,
    LAG,
    LANE,
    LIMITER,
    LISTENER,
    LIVE,
    MARKS,
    METRICS,
    PLACES,
    PROBES,
    QUEUE,
    READINESS,
    SALES,
    SETTINGS,
    SIGNERS,
    SKU_LIMITS,
)


async def clients(app: web.Application) -> AsyncIterator[None]:
    """Open every client the gateway uses, and close them when the app stops."""
    settings = app[SETTINGS]
    kafka = KafkaProbe(settings)
    async with open_clients(settings, pool_size=10, lazy=True) as c:
        app[CLIENTS] = c
        app[PROBES] = probes = dependency_probes(c.redis, c.pool, kafka)
        app[READINESS] = Readiness(probes, registry=app[METRICS].registry)
        app[LAG] = LagCache(settings)
        app[SALES] = SaleAdmin.build(c.pool, c.redis, settings.archive_after_s)
        app[QUEUE] = queue = QueueScripts(c.redis)
        app[HOLDS] = holds = HoldScripts(c.redis)
        # Grants come back with their holds: the event is published without a read back.
        app[ALLOCATORS] = allocators = Allocators(
            holds, on_borrow=app[METRICS].transferred.inc, with_holds=True
        )
        app[JOINS] = joins = Joins(queue)
        app[PLACES] = places = Places(queue)
        app[LIMITER] = limiter = RateLimiter(c.redis)
        app[MARKS] = marks = QueueMarks(f"gateway:{socket.gethostname()}:{os.getpid()}")
        app[COUNTERS] = CounterCache(queue, marks=marks)
        # The reservations listener's loop serves no joins or polls: the producer shares it.
        app[ANNOUNCER] = announcer = Announcer(settings, own_loop=not app[LISTENER])
        stop = asyncio.Event()
        checkpoints = asyncio.create_task(marks.run(c.pool, stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait({checkpoints})  # a last flush; a cancelled task is just done
            await allocators.aclose()
            await joins.aclose()
            await places.aclose()
            await limiter.aclose()
            await announcer.aclose()
            await kafka.aclose()
            await app[LAG].aclose()


def budgets(settings: Settings) -> Budgets:
    return Budgets(settings.max_in_flight, settings.max_joins_in_flight,
                   settings.max_polls_in_flight)  # fmt: skip


async def _not_served_here(request: web.Request) -> web.Response:
    """Anything but a reservation, at the reservations listener: a 404 that says where to go."""
    raise NotFound("this address serves admitted buyers' reservations only: join the queue and "
                   "poll at the gateway", code="not_found")  # fmt: skip


def create_app(settings: Settings, registry: CollectorRegistry | None = None, *,
               reservations_only: bool = False) -> web.Application:  # fmt: skip
    """The gateway; with ``reservations_only``, the listener kept for admitted buyers: the
    reservation routes and the operators' probes, nothing of the waiting room (a buyer reaches
    it through the ``reserve_url`` of an admitted status answer, or a proxy's path rule)."""
    metrics = Metrics(registry or CollectorRegistry())
    metrics.in_flight_limit.set(settings.max_in_flight)
    middleware = edge(metrics, budgets(settings), admin.require_admin, page.error_page)
    app = web.Application(middlewares=[middleware], client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[LISTENER] = reservations_only
    app[METRICS] = metrics
    app[SIGNERS] = Signers.from_settings(settings)
    app[CATALOG] = {}
    app[CATALOG_READS] = InFlight()
    app[LIVE] = {}
    app[SKU_LIMITS] = {}
    app[FAIRNESS] = {}
    app.cleanup_ctx.append(clients)
    # The buyers' hot routes first: aiohttp tries the resources under one path prefix
    # ("/v1/sales") in the order they were added.
    modules = (reservations, ops_routes) if reservations_only else (
        waiting_room,
        reservations,
        ops_routes,
        sale_info,
        admin,
        challenge,
        openapi,
        page,
        console,
    )  # fmt: skip
    for routes in modules:
        routes.setup(app)
    if reservations_only:
        app.router.add_route("*", "/{path:.*}", _not_served_here)
    cors.setup(app, settings.cors_origins)
    app[LANE] = Lane(app, middleware, RESERVE if reservations_only else HOT)
    return app
