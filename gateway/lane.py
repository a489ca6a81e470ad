"""The buyers' hot routes, served beside aiohttp's application layer.

A spike is polls, joins and reservations. Through :class:`aiohttp.web.Application` each of
them pays for the router's walk over every resource under ``/v1/sales`` (a regular expression
per candidate, a new match-info object), the application's dispatch and aiohttp's
sub-application fix-up before the gateway's one middleware runs: about a tenth of a poll's
CPU (profile in docs/BENCHMARKS.md). The lane recognises these three paths by splitting the
raw path, gives the request a match info made once per (route, sale), and calls the
gateway's middleware with the route's handler: the same handler, the same budgets, error
mapping, metrics and request id as through the application.

Every other request, and any hot path the lane is not sure of (a query string, a
percent-escape, an ``Expect`` header, a segment the router would not match), goes through the
application unchanged. The routes stay registered on the application as well, for that
fallback, the OpenAPI document and CORS preflights.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# (method, the path's segments after /v1/sales/{sale}) -> the route's canonical path.
Hot = dict[tuple[str, tuple[str, ...]], str]
RESERVE: Hot = {("POST", ("reservations",)): "/v1/sales/{sale}/reservations"}
HOT: Hot = {
    ("GET", ("queue", "status")): "/v1/sales/{sale}/queue/status",
    ("POST", ("queue",)): "/v1/sales/{sale}/queue",
    **RESERVE,
}
PREFIX = "/v1/sales/"
MAX_SALES = 1024  # match infos kept; cleared when more sales than this were seen


class Lane:
    """Routes the hot paths of ``app`` itself (``hot``: all three, or only the reservation of
    a reservations-only gateway); everything else goes to ``fallback`` (the application's own
    request handler)."""

    def __init__(self, app: web.Application, middleware: Middleware, hot: Hot = HOT) -> None:
        self._app = app
        self._middleware = middleware
        self._routes: dict[tuple[str, tuple[str, ...]], web.AbstractRoute] = {}
        by_path = {
            (route.method, route.resource.canonical): route
            for route in app.router.routes()
            if route.resource is not None
        }
        for key, canonical in hot.items():
            route = by_path.get((key[0], canonical))
            if route is None:
                raise ValueError(f"the application has no route {key[0]} {canonical}")
            self._routes[key] = route
        self._infos: dict[tuple[web.AbstractRoute, str], UrlMappingMatchInfo] = {}
        self._fallback: Handler | None = None

    def install(self, server: web.Server) -> None:
        """Put the lane in front of ``server``'s request handler (call after the runner's
        ``setup()``, before its sites start)."""
        self._fallback = server.request_handler
        server.request_handler = self.handle

    def match(self, request: web.BaseRequest) -> tuple[web.AbstractRoute, str] | None:
        """The hot route and sale of ``request``, or None to leave it to the application."""
        path = request.raw_path
        if not path.startswith(PREFIX) or "?" in path or "%" in path:
            return None
        sale, _, tail = path[len(PREFIX) :].partition("/")
        route = self._routes.get((request.method, tuple(tail.split("/"))))
        if route is None or not sale or "{" in sale or "}" in sale:
            return None
        return route, sale

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._fallback is not None, "install() the lane first"
        found = None if request.headers.get(hdrs.EXPECT) else self.match(request)
        if found is None:
            return await self._fallback(request)  # type: ignore[arg-type]
        info = self._infos.get(found)
        if info is None:
            if len(self._infos) >= MAX_SALES:
                self._infos.clear()
            route, sale = found
            info = UrlMappingMatchInfo({"sale": sale}, route)
            info.add_app(self._app)
            info.freeze()
            self._infos[found] = info
        # What Application._handle does once the router has matched.
        request._match_info = info  # type: ignore[attr-defined]
        # The server's request factory is the application's: every request is a web.Request.
        return await self._middleware(cast(web.Request, request), info.handler)
