"""``flashsale reconcile``: one pass (``--once``) or the reconciler service (a pass every
``--interval`` seconds, with ``/healthz`` and ``/metrics`` on the ops port).

A pass that fails (a dependency down, or a bug) is logged and counted, and the service goes on;
the next one starts afresh. Inside a pass, an item that fails is reported and the others go on
(:func:`reconciler.report.isolated`).
Nothing a pass does depends on the previous one having finished: every repair re-reads what
it repairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from allocator.ids import route_of
from allocator.pacing import SaleTurns
from flashsale.clients import Clients, open_clients
from flashsale.errors import NotFound, shown
from flashsale.kafka import LagReader
from flashsale.ops_endpoints import dependency_probes, serve_ops
from flashsale.outages import describe, is_outage
from flashsale.settings import Settings
from reconciler.archive import Archived, Archiver, archive_sale
from reconciler.audit import audit_sale
from reconciler.reconcile import Reconciler
from reconciler.report import AuditReport, PassReport, ReconcileMetrics
from reconciler.skus import REBUILDS_AT_ONCE

log = logging.getLogger("flashsale.reconciler")


def reconciler(c: Clients, settings: Settings, *, stuck_after_s: float,
               registry: CollectorRegistry | None = None) -> Reconciler:  # fmt: skip
    if c.provider is None:
        log.warning("FLASHSALE_PSP_URL is not set: payments are not checked")
    return Reconciler(c.pool, c.redis, c.provider, settings.topics.order_events,
                      stuck_after_s=stuck_after_s, registry=registry)  # fmt: skip


async def require_sales(pool: asyncpg.Pool, sales: Sequence[str] | None) -> None:
    """NotFound naming the first of ``sales`` Postgres does not know: a mistyped id would
    otherwise make a pass over nothing, reported as done."""
    if not sales:
        return
    known = {r["id"] for r in await pool.fetch("SELECT id FROM sales WHERE id = ANY($1)",
                                               list(sales))}  # fmt: skip
    for sale in sales:
        if sale not in known:
            raise NotFound(f"unknown sale {shown(sale)}", code="unknown_sale")


async def reconcile_once(settings: Settings, sales: Sequence[str] | None,
                         stuck_after_s: float) -> PassReport:  # fmt: skip
    async with open_clients(settings, pool_size=POOL_SIZE) as c:
        await require_sales(c.pool, sales)
        return await reconciler(c, settings, stuck_after_s=stuck_after_s).run_once(
            sales, wait_for_grace=True
        )


async def audit(settings: Settings, sale_id: str) -> AuditReport:
    async with open_clients(settings, pool_size=POOL_SIZE) as c:
        return await audit_sale(c.pool, c.redis, c.provider, settings, sale_id)


async def archive(settings: Settings, sale_id: str) -> Archived:
    async with open_clients(settings, pool_size=POOL_SIZE) as c:
        return await archive_sale(c.pool, c.redis, c.provider, settings, sale_id)


# With more SKUs to read than this many a second at --interval, passes are spread out
# (allocator/pacing.py): ended sales stay in scope for 15 minutes after their holds, and three
# ended 10,000-SKU sales made back-to-back passes of 3 s each (their untouched SKUs are now
# read once: reconciler.skus.SkuChecks.unsettled). The budget is shared out sale by sale, so
# a small sale keeps its --interval beside a catalogue sale of 200,000 SKUs.
SKUS_PER_S = 2000.0
# Postgres connections: the rebuilds that run at once (reconciler.skus), and two more.
POOL_SIZE = REBUILDS_AT_ONCE + 2


async def serve(settings: Settings, stop: asyncio.Event, *, interval: float,
                stuck_after_s: float, ops_port: int | None, host: str,
                sales: Sequence[str] | None = None) -> None:  # fmt: skip
    """Until ``stop``, a pass over each sale every ``interval`` seconds (a sale with more
    SKUs than its share of ``SKUS_PER_S`` allows at that pace, less often), over ``sales``
    (default: every sale in scope). The sales due at once share a pass."""
    registry = CollectorRegistry()
    async with open_clients(settings, pool_size=POOL_SIZE, lazy=True) as c:
        rec = reconciler(c, settings, stuck_after_s=stuck_after_s, registry=registry)
        runner: web.AppRunner | None = None
        if ops_port is not None:
            checks = dependency_probes(c.redis, c.pool)
            runner = await serve_ops(host, ops_port, checks, registry)
            log.info("reconciler ops endpoints on http://%s:%d/healthz and /metrics", host,
                     ops_port)  # fmt: skip
        lag = LagReader(settings, settings.consumer_group)
        archiver = None
        if settings.archive_after_s is not None:
            archiver = Archiver(c, settings, settings.archive_after_s, rec.metrics)
        checked = False  # the sales asked for exist (checked once Postgres answers)
        turns = SaleTurns(interval, SKUS_PER_S)
        try:
            while not stop.is_set():
                await _read_lag(lag, settings, rec.metrics)
                wait, due = interval, []
                try:
                    if not checked:
                        await require_sales(c.pool, sales)
                        checked = True
                    sizes = await rec.skus.sizes(sales)
                    rec.keep(sizes)
                    due = turns.due(sizes, time.monotonic())
                    report = await rec.run_once(sales, full=False, only=due)
                    if archiver is not None:
                        await archiver.run(sales)
                except NotFound:
                    raise
                except Exception as exc:
                    rec.metrics.failures.inc()
                    turns.retry(due, time.monotonic() + interval)
                    if is_outage(exc):
                        log.warning("reconcile pass stopped by an outage (next one in %gs): %s",
                                    interval, describe(exc))  # fmt: skip
                    else:
                        log.exception("reconcile pass failed (next one in %gs)", interval)
                else:
                    wait = turns.wait(time.monotonic())
                    if report.changed or report.flags:
                        log.warning("reconcile pass: %d repairs, %d flags over %d SKUs in %.3fs",
                                    report.changed, len(report.flags), report.skus,
                                    report.seconds)  # fmt: skip
                        log_items(report)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await lag.aclose()
            if runner is not None:
                await runner.cleanup()


async def _read_lag(reader: LagReader, settings: Settings, metrics: ReconcileMetrics) -> None:
    """The workers' lag on the reservations topic, into ``flashsale_consumer_lag_messages``;
    an unreachable broker is counted and logged, and the last reading stays."""
    topic = settings.topics.reservations
    try:
        behind = await reader.read(topic)
    except Exception as exc:  # noqa: BLE001 - read again next pass
        metrics.lag_failures.inc()
        log.warning("cannot read the consumer lag: %s", describe(exc))
        return
    metrics.lag.labels(topic, settings.consumer_group).set(behind)


def log_items(report: PassReport) -> None:
    """A line per repair and flag, with the reservation id when it is about one, so that a
    reservation's story across the services is one grep."""
    for kind, items in (("repair", report.repairs), ("flag", report.flags)):
        for item in items:
            rid = item.subject if item.subject and route_of(item.subject) else None
            log.info("reconcile %s %s", kind, item.kind,
                     extra={"sale": item.sale_id, "sku": item.sku, "subject": item.subject,
                            **({"reservation_id": rid} if rid else {})})  # fmt: skip
