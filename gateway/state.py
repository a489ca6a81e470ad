"""What a gateway process holds, under typed AppKeys: its settings, signers and metrics, and
the clients and per-process helpers that one cleanup context opens (:mod:`gateway.app`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from allocator.hold_scripts import HoldScripts
from allocator.queue_scripts import Joins, Places, QueueScripts
from allocator.rate_limits import RateLimiter
from allocator.sale_admin import SaleAdmin
from allocator.sale_scripts import SkuRule
from allocator.sku_allocator import Allocators
from flashsale.clients import Clients
from flashsale.fairness import Published
from flashsale.inflight import Copy, InFlight
from flashsale.kafka import LagCache
from flashsale.ops_endpoints import Probe, Readiness
from flashsale.queue_marks import QueueMarks
from flashsale.settings import Settings
from flashsale.tokens import Signers
from gateway.announcer import Announcer
from gateway.counters import CounterCache
from gateway.documents import Summary
from gateway.lane import Lane
from gateway.metrics import Metrics

SETTINGS = web.AppKey("settings", Settings)
SIGNERS = web.AppKey("signers", Signers)
METRICS = web.AppKey("metrics", Metrics)
CLIENTS = web.AppKey("clients", Clients)
PROBES = web.AppKey("probes", dict[str, Probe])
READINESS = web.AppKey("readiness", Readiness)
SALES = web.AppKey("sales", SaleAdmin)
QUEUE = web.AppKey("queue", QueueScripts)
JOINS = web.AppKey("joins", Joins)
PLACES = web.AppKey("places", Places)
HOLDS = web.AppKey("holds", HoldScripts)
ALLOCATORS = web.AppKey("allocators", Allocators)
LIMITER = web.AppKey("limiter", RateLimiter)
COUNTERS = web.AppKey("counters", CounterCache)
MARKS = web.AppKey("marks", QueueMarks)
ANNOUNCER = web.AppKey("announcer", Announcer)
LISTENER = web.AppKey("listener", bool)  # the reservations listener (--reservations-only)
LANE = web.AppKey("lane", Lane)  # the hot routes beside the application: see gateway.lane
LAG = web.AppKey("lag", LagCache)  # the workers' consumer lag, for the live sale page
# sale id -> a copy of the sale's public summary, encoded, and of its SKUs' per-buyer limits
# as Redis holds them: see gateway.catalog
CATALOG = web.AppKey("catalog", dict[str, Copy[Summary]])
# the reads of those, of the fairness records and of the live page's status in flight, by
# ("summary", "limits", "fairness" or "live", sale id): one per sale at a time
CATALOG_READS = web.AppKey("catalog_reads", InFlight[tuple[str, str], Any])
SKU_LIMITS = web.AppKey("sku_limits", dict[str, Copy[dict[str, SkuRule]]])
FAIRNESS = web.AppKey("fairness", dict[str, Copy[Published]])  # fairness records, by sale
LIVE = web.AppKey("live", dict[str, Copy[dict[str, Any]]])  # sales' status for the live page
