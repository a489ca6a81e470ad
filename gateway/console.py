"""The operators' live sale page: ``GET /admin/`` (a static shell), its vendored chart
library under ``/admin/static/``, and ``GET /admin/v1/sales/{sale}/live``, the one read the
page polls each second.

The shell and the static files carry no data, so they load without the admin token: the page
asks for the token once, keeps it in the tab's sessionStorage (never in a URL), and sends it
as ``Authorization: Bearer`` with every call to the admin API, like any other client.
"""

from __future__ import annotations

import functools
import heapq
import importlib.resources
import math
import time
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from allocator.sale_reads import without_counts
from flashsale.ops_endpoints import metrics_text
from flashsale.sales import archive_due, sale_json
from flashsale.timefmt import iso_ms
from gateway.catalog import MAX_INFO_TTL_S, copy_of
from gateway.documents import Document, document_response
from gateway.http import json_response, moved_to
from gateway.state import CATALOG_READS, CLIENTS, COUNTERS, LAG, LIVE, METRICS, SALES

STATIC = importlib.resources.files("gateway").joinpath("static")
FILES = {"uPlot.iife.min.js": "application/javascript", "uPlot.min.css": "text/css",
         "uPlot.LICENSE": "text/plain"}  # fmt: skip
PAGE = importlib.resources.files("gateway").joinpath("console.html").read_text()
# Framed by no other page: another site could show it under its own and invite a click on End.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
       "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'")  # fmt: skip
OPEN_PATHS = frozenset({"/admin", "/admin/", *(f"/admin/static/{name}" for name in FILES)})
LATENCY = "flashsale_gateway_request_duration_seconds"
LIVE_SKUS = 100  # SKU rows the live page gets: the busiest, beside the totals of them all
NAMED = 5  # SKUs named of those without counts, beside how many there are
CURVE_POINTS = 600  # points of a chart's history: a step a second over ten minutes


def route_figures(text: str) -> dict[str, dict[str, float]]:
    """Requests and p50/p99 latency per route since the gateway started, from its own
    histogram (summed over its processes), interpolated within buckets as Prometheus's
    ``histogram_quantile`` does."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != LATENCY:
            continue
        for sample in family.samples:
            if sample.name == f"{LATENCY}_bucket":
                le = float(sample.labels["le"])
                buckets.setdefault(sample.labels["route"], []).append((le, sample.value))
    figures = {}
    for route, points in buckets.items():
        points.sort()
        total = points[-1][1] if points else 0.0
        if total <= 0:
            continue
        figures[route] = {"requests": int(total), "p50_ms": _quantile(points, 0.5) * 1000,
                          "p99_ms": _quantile(points, 0.99) * 1000}  # fmt: skip
    return figures


def _quantile(points: list[tuple[float, float]], q: float) -> float:
    rank = q * points[-1][1]
    previous_le, previous_count = 0.0, 0.0
    for le, count in points:
        if count >= rank:
            if math.isinf(le):
                return previous_le
            within = (
                (rank - previous_count) / (count - previous_count) if count > previous_count else 0
            )
            return round(previous_le + (le - previous_le) * within, 6)
        previous_le, previous_count = le, count
    return previous_le


async def page(_request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html",
                        headers={"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer",
                                 "Cache-Control": "no-store"})  # fmt: skip


@functools.cache
def static_file(name: str) -> Document:
    """A vendored file, read and gzipped once (the chart library: 51 KB, 22 KB gzipped)."""
    return Document.of(None, STATIC.joinpath(name).read_bytes(), FILES[name], level=9)


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in FILES:
        raise web.HTTPNotFound()
    return document_response(request, static_file(name),
                             {"Cache-Control": "public, max-age=86400"})  # fmt: skip


def busiest(rows: list[dict[str, Any]], most: int = LIVE_SKUS
            ) -> tuple[list[dict[str, Any]], dict[str, int | None]]:  # fmt: skip
    """The ``most`` SKU rows of a status with the most units held, then sold (then by SKU),
    and the sale's totals over every row: a Redis count null when no SKU has one (a sale not
    preloaded has none free, none held: it has no counts yet)."""
    totals: dict[str, int | None] = dict.fromkeys(("stock_total", "confirmed", "failed"), 0)
    for name in ("available", "held", "paying", "sold"):
        counted = [row[name] for row in rows if row[name] is not None]
        totals[name] = sum(counted) if counted else None
    totals["stock_total"] = sum(row["stock_total"] for row in rows)
    totals["confirmed"] = sum(row["confirmed"] for row in rows)
    totals["failed"] = sum(row["orders"].get("PAYMENT_FAILED", 0) for row in rows)
    shown = heapq.nsmallest(most, rows, key=lambda r: (-(r["held"] or 0), -(r["sold"] or 0),
                                                       r["sku"]))  # fmt: skip
    return shown, totals


def uncounted(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The SKUs Redis has no counts of, by why (:func:`~allocator.sale_reads.without_counts`),
    each as ``{"count", "skus"}``, the first ``NAMED`` of them."""
    return {why: {"count": len(skus), "skus": skus[:NAMED]}
            for why, skus in without_counts(rows).items()}  # fmt: skip


async def _skus(app: web.Application, sale_id: str) -> dict[str, Any]:
    """The sale's busiest SKUs, their count and totals, and when they were read (unix
    seconds). Concurrent asks share one read, kept as the catalog keeps its copies
    (``READ_SHARE`` times as long as it took, up to a minute): a sale of a few SKUs is read
    afresh each second, one of 200,000 (5 s to read) about once a minute, instead of
    without pause."""
    copy = app[LIVE].get(sale_id)
    if copy is not None and time.monotonic() < copy.expires:
        return copy.value

    async def read() -> dict[str, Any]:
        began, at = time.monotonic(), time.time()
        status = await app[SALES].status(sale_id)  # 404 for an unknown sale
        shown, totals = busiest(status["skus"])
        value = {"skus": shown, "skus_total": len(status["skus"]), "totals": totals,
                 "uncounted": uncounted(status["skus"]), "revenue": status["revenue"],
                 "at": at}  # fmt: skip
        if len(app[LIVE]) > 64:
            app[LIVE].clear()
        app[LIVE][sale_id] = copy_of(value, began, 0.0, MAX_INFO_TTL_S)
        return value

    value: dict[str, Any] = await app[CATALOG_READS].once(("live", sale_id), read)
    return value


async def live(request: web.Request) -> web.Response:
    """Everything the live page shows of one sale, in one answer."""
    app, sale_id = request.app, request.match_info["sale"]
    skus = await _skus(app, sale_id)
    row = await app[SALES].row(sale_id)
    sale = sale_json(row)  # as it is now: paused a moment ago
    counters = await app[COUNTERS].get(sale_id)
    view = counters.view
    repairs = await app[CLIENTS].pool.fetch(
        "SELECT kind, count(*) AS n FROM reconcile_events WHERE sale_id = $1 GROUP BY kind",
        sale_id,
    )
    body: dict[str, Any] = {
        "at": iso_ms(int(time.time() * 1000)),
        "skus_read_at": iso_ms(int(skus["at"] * 1000)),
        "sale": sale,
        "skus": skus["skus"],
        "skus_total": skus["skus_total"],
        "totals": skus["totals"],
        **skus["uncounted"],
        "revenue": skus["revenue"],
        "queue": {
            **view.summary(counters.redis_now_ms(), sale["max_queue"]),
            # The pump's rate once the sale is preloaded (Redis has no other until then).
            "admission_rate": view.admission_rate if view.preloaded else sale["admission_rate"],
            # Measured while buyers wait; null before (the pump quotes the configured rate)
            "admitted_per_s": view.rate_p50 if view.rate_measured else None,
            "noshow_ratio": view.noshow,
        },
        "routes": route_figures(metrics_text(app[METRICS].registry).decode()),
        "consumer_lag": await app[LAG].read(),
        "repairs": {r["kind"]: int(r["n"]) for r in repairs},
        "archive_due_at": archive_due(row, app[SALES].archive_after_s),
    }  # fmt: skip
    return json_response(body)


async def history(request: web.Request) -> web.Response:
    """Where the live page's charts start: the units confirmed since the sale's start (its
    orders, in Postgres) and the buyers admitted (the pump's admission steps, in Redis), each
    in at most ``CURVE_POINTS`` points, as ``[unix seconds, value]`` pairs."""
    app, sale_id = request.app, request.match_info["sale"]
    sold = await app[SALES].sold_over_time(sale_id, CURVE_POINTS)  # 404 for an unknown sale
    steps = (await app[COUNTERS].get(sale_id)).steps
    every = max(1, math.ceil(len(steps) / CURVE_POINTS))
    kept = steps[every - 1 :: every] + ([steps[-1]] if len(steps) % every else [])
    start = sold[0]  # (the sale's start, 0)
    admitted = [start] + [
        (step.at_ms / 1000, step.to) for step in kept if step.at_ms >= start[0] * 1000
    ]
    return json_response({"sold": sold, "admitted": admitted})


def setup(app: web.Application) -> None:
    app.router.add_get("/admin/", page)
    app.router.add_get("/admin", moved_to("/admin/"))
    app.router.add_get("/admin/static/{name}", static)
    app.router.add_get("/admin/v1/sales/{sale}/live", live)
    app.router.add_get("/admin/v1/sales/{sale}/history", history)
