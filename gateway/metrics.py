"""The gateway's Prometheus metrics, on a registry owned by the app (one per process)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

# Error responses carry their stable code as response[ERROR_CODE] (set by error_response).
ERROR_CODE = web.ResponseKey("error_code", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "flashsale_gateway_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "flashsale_gateway_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.rejections = Counter(
            "flashsale_gateway_rejections",
            "Requests refused, by reason (error code)",
            ["reason"],
            registry=registry,
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: counts every answer, including the error middleware's."""
        began = time.perf_counter()
        response = await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self.requests.labels(route, request.method, str(response.status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - began)
        if response.status >= 400 and isinstance(response, web.Response):
            self.rejections.labels(_code(response)).inc()
        return response


def _code(response: web.Response) -> str:
    body = response.body
    if isinstance(body, bytes) and body.startswith(b'{"error":{"code":"'):
        start = len(b'{"error":{"code":"')
        end = body.find(b'"', start)
        return body[start:end].decode()
    return str(response.status)
