"""The gateway's Prometheus metrics, on a registry owned by the app (one per process)."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flashsale.ops_endpoints import build_info

# Error responses carry their stable code as response[ERROR_CODE] (set by error_response).
ERROR_CODE = web.ResponseKey("error_code", str)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        build_info(registry, "gateway")
        self.requests = Counter(
            "flashsale_gateway_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "flashsale_gateway_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.joins = Counter(
            "flashsale_gateway_queue_joins",
            "Queue joins by outcome (queued, pre_queue, sold_out, ...)",
            ["outcome"],
            registry=registry,
        )
        self.polls = Counter(
            "flashsale_gateway_queue_polls",
            "Queue status answers by state, and whether Redis was asked",
            ["state", "source"],
            registry=registry,
        )
        self.admissions = Counter(
            "flashsale_gateway_admission_tokens",
            "Admission tokens handed to admitted buyers",
            registry=registry,
        )
        self.reservations = Counter(
            "flashsale_gateway_reservations",
            "Reservation requests by outcome",
            ["outcome"],
            registry=registry,
        )
        self.transferred = Counter(
            "flashsale_gateway_stock_transferred_units",
            "Units moved into a dry stock bucket of a hot SKU by this process's borrows",
            registry=registry,
        )
        self.in_flight = Gauge(
            "flashsale_gateway_in_flight",
            "Requests being handled by this process",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.in_flight_limit = Gauge(
            "flashsale_gateway_in_flight_limit",
            "Requests this process handles at once before answering 503 overloaded",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.rejections = Counter(
            "flashsale_gateway_rejections",
            "Requests refused, by reason (error code)",
            ["reason"],
            registry=registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._labelled: dict[tuple[Counter, tuple[str, ...]], Counter] = {}

    def count(self, counter: Counter, *labels: str) -> None:
        """``counter.labels(*labels).inc()``, with the labelled child looked up once."""
        child = self._labelled.get((counter, labels))
        if child is None:
            child = self._labelled[counter, labels] = counter.labels(*labels)
        child.inc()

    def observe(self, request: web.Request, response: web.StreamResponse, began: float) -> None:
        """Count one answer (route, method, status), its latency and its refusal reason."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        key = (route, request.method, response.status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a tuple: once per key
            children = self._children[key] = (
                self.requests.labels(route, request.method, str(response.status)),
                self.latency.labels(route),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - began)
        if response.status >= 400 and isinstance(response, web.Response):
            self.count(self.rejections, _code(response))


def _code(response: web.Response) -> str:
    return response.get(ERROR_CODE) or str(response.status)
