"""The gateway's one middleware, and the one place where exceptions become HTTP answers."""

from __future__ import annotations

import itertools
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from flashsale.errors import FlashsaleError, SchemaBehind
from flashsale.http_protocol import EVERY_ANSWER, unrouted
from flashsale.logs import CONTEXT
from flashsale.ops_endpoints import PROBE_PATHS
from flashsale.outages import is_outage, log_failure, schema_error
from gateway.http import GATEWAY_SERVES, error_response, meant
from gateway.metrics import Metrics

log = logging.getLogger("flashsale.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Guard = Callable[[web.Request], None]
# What a refusal is shown as (gateway.page.error_page: a page to a browser that asked for one)
Shown = Callable[[web.Request, web.StreamResponse], web.StreamResponse]
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")  # what is kept of a caller's X-Request-Id


# New request ids: this process's random prefix and a counter, unique across processes and
# restarts without asking the OS for randomness on every request (a tenth of a poll's cost).
_PREFIX = secrets.token_hex(4)
_SERIAL = itertools.count(1)


def request_id(request: web.Request) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, else a new one."""
    given = request.headers.get("X-Request-Id")
    return given if given and REQUEST_ID.match(given) else f"{_PREFIX}{next(_SERIAL):08x}"


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def error_for(request: web.Request, exc: Exception) -> web.Response:
    """Domain errors by their ``http_status`` and stable ``code``, aiohttp's own (404, 405,
    413) in the same JSON shape, a dependency that is down 503, a client that hung up 499,
    anything else a logged 500 that names no internals. Re-raises aiohttp's redirects, which
    are not errors."""
    behind = schema_error(exc)
    if behind is not None:  # the operator's to mend: said in the log, not to every caller
        log_failure(log, f"{request.method} {request.path}", exc, key=route_of(request))
        exc = SchemaBehind("the database schema is not up to date; retry shortly")
    if isinstance(exc, ConnectionError) and client_gone(request):
        # Writing to a client that hung up (a streamed export): nobody reads this answer, and
        # it is neither a dependency's fault nor ours. 499, as proxies count it.
        log.info("%s %s: the client closed the connection", request.method, request.path)
        return error_response(499, "client_closed", "the client closed the connection")
    if isinstance(exc, FlashsaleError):
        headers = None
        if exc.retry_after_s is not None:
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return error_response(exc.http_status, exc.code, exc.message, headers, exc.details())
    if is_outage(exc):  # one line per route now and then: every request of a spike meets it
        log_failure(log, f"dependency unavailable on {request.method} {request.path}", exc,
                    key=route_of(request))  # fmt: skip
        return error_response(503, "unavailable", "a dependency is unavailable; retry shortly",
                              {"Retry-After": "1"})  # fmt: skip
    if isinstance(exc, web.HTTPException) and exc.status == 403 and request.method == "OPTIONS":
        # aiohttp-cors refusing a preflight; its text names the origin, method or header
        return error_response(403, "cors_refused", exc.text or "CORS preflight refused")
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status, "http_error"
        )
        kept = ("allow", "retry-after")
        headers = {k: v for k, v in exc.headers.items() if k.lower() in kept}
        said = exc.reason
        if request.match_info.route.resource is None and exc.status in (404, 405):
            said = unrouted(request, exc, GATEWAY_SERVES)  # no route took it
            hint = meant(request.method, request.path) if exc.status == 405 else None
            said += f"; {hint}" if hint else ""
        return error_response(exc.status, code, said, headers)
    if isinstance(exc, web.HTTPException):
        raise exc
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal", "internal error")


# Route classes by the value of their work to a sale, highest first: an admitted buyer's
# reservation (and reading or cancelling it), a waiting buyer's poll (or leaving), a new
# arrival. Everything else (probes, admin, pages) is "other".
ADMITTED, WAITING, ARRIVING, OTHER = "admitted", "waiting", "arriving", "other"
ROUTE_CLASSES: dict[tuple[str, str], str] = {
    ("POST", "/v1/sales/{sale}/reservations"): ADMITTED,
    ("GET", "/v1/reservations/{id}"): ADMITTED,
    ("DELETE", "/v1/reservations/{id}"): ADMITTED,
    ("GET", "/v1/sales/{sale}/queue/status"): WAITING,
    ("DELETE", "/v1/sales/{sale}/queue"): WAITING,
    ("POST", "/v1/sales/{sale}/queue"): ARRIVING,
}


@dataclass(frozen=True, slots=True)
class Budgets:
    """Requests in flight per process: ``total`` for all, and within it ceilings for the
    lower classes, so that under a spike joins are refused first, then polls, and an admitted
    buyer's reservation always finds room (at least ``total - arriving - waiting``)."""

    total: int
    arriving: int
    waiting: int

    def ceiling(self, route_class: str) -> int:
        if route_class == ARRIVING:
            return min(self.arriving, self.total)
        if route_class == WAITING:
            return min(self.waiting, self.total)
        return self.total


def route_of(request: web.Request) -> str:
    """The request's method and route (``POST /v1/sales/{sale}/queue``), else its path."""
    resource = request.match_info.route.resource
    return f"{request.method} {request.path if resource is None else resource.canonical}"


def route_class(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None:
        return OTHER
    return ROUTE_CLASSES.get((request.method, resource.canonical), OTHER)


def edge(metrics: Metrics, budgets: Budgets, guard: Guard, shown: Shown) -> Middleware:
    """The gateway's one middleware, so each request pays for one layer:

    * the per-process in-flight budgets (:class:`Budgets`): beyond its class's ceiling, or
      beyond the total, a request is answered 503 ``overloaded`` with ``Retry-After`` at once
      instead of queueing without bound, lowest-value work first (the probes and ``/metrics``
      are exempt, so operators can still look; readiness is cached);
    * ``guard`` before any handler and before routing errors, so an unauthorised admin path
      is 401 even when it does not exist;
    * every exception mapped to HTTP by :func:`error_for`;
    * every answer counted and timed, refusals by reason;
    * a request id (the caller's ``X-Request-Id`` or a new one) bound to every log line of
      the request and returned in ``X-Request-Id``;
    * a refusal passed to ``shown`` (which may answer a browser with a page instead).
    """
    exempt = PROBE_PATHS
    gauge = metrics.in_flight
    in_flight = dict.fromkeys((ADMITTED, WAITING, ARRIVING, OTHER), 0)
    ceilings = {c: budgets.ceiling(c) for c in in_flight}
    total = budgets.total
    current = 0
    published = 0.0  # when the in-flight gauge was last set

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request)
        bound = CONTEXT.set({"request_id": rid})
        try:
            response = await answer(request, handler)
            if response.status >= 400:
                response = shown(request, response)
        finally:
            CONTEXT.reset(bound)
        if not response.prepared:
            response.headers["X-Request-Id"] = rid
            response.headers.update(EVERY_ANSWER)
        return response

    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal current, published
        began = time.perf_counter()
        counted = request.path not in exempt
        kind = route_class(request) if counted else OTHER
        if counted and (current >= total or in_flight[kind] >= ceilings[kind]):
            response: web.StreamResponse = error_response(
                503, "overloaded", "the gateway is at capacity; retry shortly",
                {"Retry-After": "1"},
            )  # fmt: skip
        else:
            if counted:
                current += 1
                in_flight[kind] += 1
            try:
                guard(request)
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - the error boundary: error_for logs or re-raises
                response = error_for(request, exc)
            finally:
                if counted:
                    current -= 1
                    in_flight[kind] -= 1
        # The gauge is a shared-memory write in multiprocess mode: set it at most every
        # 50 ms rather than twice per request.
        if began - published >= 0.05:
            published = began
            gauge.set(current)
        metrics.observe(request, response, began)
        return response

    return middleware
