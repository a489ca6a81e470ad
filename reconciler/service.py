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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from allocator.ids import route_of
from allocator.pacing import SaleTurns
from flashsale.clients import Clients, open_clients, pg_connect
from flashsale.errors import NotFound
from flashsale.kafka import LagReader
from flashsale.ops_endpoints import dependency_probes, serve_ops
from flashsale.outages import describe, is_outage
from flashsale.sales import unknown_sale
from flashsale.settings import Settings
from reconciler.archive import Archived, Archiver, archive_sale
from reconciler.audit import audit_sale
from reconciler.reconcile import Reconciler
from reconciler.report import AuditReport, PassReport, ReconcileMetrics, recorded
from reconciler.skus import REBUILDS_AT_ONCE

log = logging.getLogger("flashsale.reconciler")

# The broker's offsets (the lag gauges' input) are read at most this often, however often
# passes run: Prometheus scrapes every 15 s.
BROKER_EVERY_S = 1.0


def reconciler(c: Clients, settings: Settings, *, stuck_after_s: float,
               registry: CollectorRegistry | None = None) -> Reconciler:  # fmt: skip
    if c.provider is None:
        log.warning("FLASHSALE_PSP_URL is not set: payments are not checked")
    return Reconciler(c.pool, c.redis, c.provider, settings.topics.order_events,
                      stuck_after_s=stuck_after_s, registry=registry)  # fmt: skip


async def require_sales(pool: asyncpg.Pool | asyncpg.Connection,
                        sales: Sequence[str] | None) -> None:  # fmt: skip
    """NotFound naming the first of ``sales`` Postgres does not know: a mistyped id would
    otherwise make a pass over nothing, reported as done."""
    if not sales:
        return
    known = {r["id"] for r in await pool.fetch("SELECT id FROM sales WHERE id = ANY($1)",
                                               list(sales))}  # fmt: skip
    for sale in sales:
        if sale not in known:
            raise await unknown_sale(pool, sale)


async def reconcile_once(
    settings: Settings, sales: Sequence[str] | None, stuck_after_s: float,
    stage: Callable[[str], None] = lambda doing: None,
) -> PassReport:  # fmt: skip
    async with open_clients(settings, pool_size=POOL_SIZE) as c:
        await require_sales(c.pool, sales)
        return await reconciler(c, settings, stuck_after_s=stuck_after_s).run_once(
            sales, wait_for_grace=True, stage=stage
        )


async def repairs_recorded(settings: Settings, *, sale: str | None, kind: str | None,
                           within: timedelta | None, limit: int
                           ) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
    """:func:`reconciler.report.recorded`, ``within`` the last while; an unknown sale is
    NotFound."""
    db = await pg_connect(settings)
    try:
        await require_sales(db, [sale] if sale else None)
        since = datetime.now(UTC) - within if within is not None else None
        return await recorded(db, sale=sale, kind=kind, since=since, limit=limit)
    finally:
        await db.close()


async def audit(settings: Settings, sale_id: str,
                stage: Callable[[str], None] = lambda doing: None) -> AuditReport:  # fmt: skip
    async with open_clients(settings, pool_size=POOL_SIZE) as c:
        return await audit_sale(c.pool, c.redis, c.provider, settings, sale_id, stage=stage)


async def archive(settings: Settings, sale_id: str,
                  stage: Callable[[str], None] = lambda doing: None) -> Archived:  # fmt: skip
    async with open_clients(settings, pool_size=POOL_SIZE) as c:
        return await archive_sale(c.pool, c.redis, c.provider, settings, sale_id, stage=stage)


# With more SKUs to read than this many a second at --interval, passes are spread out
# (allocator/pacing.py): ended sales stay in scope for 15 minutes after their holds, and three
# ended 10,000-SKU sales made back-to-back passes of 3 s each (their untouched SKUs are now
# read once: reconciler.skus.SkuChecks.unsettled). The budget is shared out sale by sale, so
# a small sale keeps its --interval beside a catalogue sale of 200,000 SKUs.
SKUS_PER_S = 2000.0
LARGE_SALE = 2000  # SKUs: a sale with more has its passes beside the others' (Passes)
STOP_WAIT_S = 10.0  # how long a stopping service waits for a large sale's pass
# Postgres connections: the rebuilds that run at once (reconciler.skus) in two passes (a
# large sale's beside the others'), and two more.
POOL_SIZE = 2 * REBUILDS_AT_ONCE + 2


async def serve(settings: Settings, stop: asyncio.Event, *, interval: float,
                stuck_after_s: float, ops_port: int | None, host: str,
                sales: Sequence[str] | None = None) -> None:  # fmt: skip
    """Until ``stop``, a pass over each sale every ``interval`` seconds (a sale with more
    SKUs than its share of ``SKUS_PER_S`` allows at that pace, less often), over ``sales``
    (default: every sale in scope). The sales due at once share a pass, but a sale of more
    than ``LARGE_SALE`` SKUs has its own beside them (:class:`Passes`)."""
    registry = CollectorRegistry()
    async with open_clients(settings, pool_size=POOL_SIZE, lazy=True) as c:
        rec = reconciler(c, settings, stuck_after_s=stuck_after_s, registry=registry)
        runner: web.AppRunner | None = None
        if ops_port is not None:
            checks = dependency_probes(c.redis, c.pool)
            runner = await serve_ops(host, ops_port, checks, registry)
            log.info("reconciler ops endpoints on http://%s:%d/healthz and /metrics", host,
                     ops_port)  # fmt: skip
        broker = BrokerReadings(settings)
        archiver = None
        if settings.archive_after_s is not None:
            archiver = Archiver(c, settings, settings.archive_after_s, rec.metrics)
        checked = False  # the sales asked for exist (checked once Postgres answers)
        turns = SaleTurns(interval, SKUS_PER_S)
        passes = Passes(rec, sales, turns, interval)
        try:
            while not stop.is_set():
                await broker.read(rec.metrics)
                passes.check()
                wait = interval
                try:
                    if not checked:
                        await require_sales(c.pool, sales)
                        checked = True
                    sizes = await rec.skus.sizes(sales)
                    rec.keep(sizes)
                    due = passes.take(turns.due(sizes, time.monotonic()), sizes)
                    if await passes.run(due) and archiver is not None:
                        await archiver.run(sales)
                except NotFound:
                    raise
                except Exception as exc:  # noqa: BLE001 - the service outlives any pass
                    failed(rec, exc, interval)
                else:
                    wait = turns.wait(time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await passes.close()
            await broker.aclose()
            if runner is not None:
                await runner.cleanup()


def failed(rec: Reconciler, exc: Exception, interval: float) -> None:
    """A pass (or what the service does around it) that failed: counted and logged."""
    rec.metrics.failures.inc()
    if is_outage(exc):
        log.warning("reconcile pass stopped by an outage (next one in %gs): %s", interval,
                    describe(exc))  # fmt: skip
    else:
        log.error("reconcile pass failed (next one in %gs)", interval, exc_info=exc)


class Passes:
    """The service's passes. The sales due together share one, awaited; a sale of more
    than ``LARGE_SALE`` SKUs has its own, run beside them, one such at a time: a pass over a
    100,000-SKU sale takes about 2.6 s here, and a small sale due with it had its repairs
    made at its end (a SKU Redis lost answered "unavailable" up to 6.6 s with passes every
    5 s). A large sale due while another's pass runs is due again an interval later. A pass
    that fails is counted and logged, and its sales are due again an interval later."""

    def __init__(self, rec: Reconciler, sales: Sequence[str] | None, turns: SaleTurns,
                 interval: float) -> None:  # fmt: skip
        self.rec, self.sales, self.turns, self.interval = rec, sales, turns, interval
        self.task: asyncio.Task[bool] | None = None

    def take(self, due: list[str], sizes: Mapping[str, int]) -> list[str]:
        """``due`` but a large sale, whose pass starts beside the others' when none runs."""
        large = [sale for sale in due if sizes.get(sale, 0) > LARGE_SALE]
        self.check()
        if large and self.task is None:
            self.task = asyncio.create_task(self.run(large[:1]))
            large = large[1:]
        self.turns.retry(large, time.monotonic() + self.interval)
        return [sale for sale in due if sizes.get(sale, 0) <= LARGE_SALE]

    async def run(self, due: list[str]) -> bool:
        """A pass over ``due``; whether it went through."""
        try:
            report = await self.rec.run_once(self.sales, full=False, only=due)
        except NotFound:
            raise
        except Exception as exc:  # noqa: BLE001 - the service outlives any pass
            failed(self.rec, exc, self.interval)
            self.turns.retry(due, time.monotonic() + self.interval)
            return False
        if report.changed or report.flags:
            log.warning("reconcile pass: %d repairs, %d flags over %d SKUs in %.3fs",
                        report.changed, len(report.flags), report.skus,
                        report.seconds)  # fmt: skip
            log_items(report)
        return True

    def check(self) -> None:
        """Forgets the large sale's pass once done, raising what ended it: NotFound (a sale
        asked for is gone; the others are caught in :meth:`run`)."""
        if self.task is not None and self.task.done():
            task, self.task = self.task, None
            if not task.cancelled():
                task.result()

    async def close(self) -> None:
        """Waits for a large sale's pass still running, for ``STOP_WAIT_S`` at most."""
        if self.task is not None:
            with contextlib.suppress(Exception):  # TimeoutError: cancelled
                await asyncio.wait_for(self.task, STOP_WAIT_S)


class BrokerReadings:
    """What the service reads from the broker before each pass: the workers' lag on the
    reservations topic (``flashsale_consumer_lag_messages``), the messages ever parked on
    the dead-letter topic (``flashsale_dead_letter_messages``) and, with order webhooks on,
    the order events the storefront has not taken yet (``flashsale_webhook_lag_messages``:
    a slow shop, not a failing one, is seen there). At most every ``BROKER_EVERY_S``. An
    unreachable broker is counted and logged, and the last readings stay."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.last: float | None = None  # monotonic time of the last reading
        self.workers = LagReader(settings, settings.consumer_group)
        self.webhooks: LagReader | None = None
        if settings.webhook_url:
            self.webhooks = LagReader(settings, settings.webhook_group)

    async def read(self, metrics: ReconcileMetrics) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last < BROKER_EVERY_S:
            return
        self.last = now
        topics = self.settings.topics
        try:
            behind = await self.workers.read(topics.reservations)
            written = await self.workers.written(topics.dead_letter)
            unsent = await self.webhooks.read(topics.order_events) if self.webhooks else None
        except Exception as exc:  # noqa: BLE001 - read again next pass
            metrics.lag_failures.inc()
            log.warning("cannot read the consumer lag: %s", describe(exc))
            return
        metrics.lag.labels(topics.reservations, self.settings.consumer_group).set(behind)
        metrics.dead_letters.labels(topics.dead_letter).set(written)
        if unsent is not None:
            metrics.webhook_lag.labels(self.settings.webhook_group).set(unsent)

    async def aclose(self) -> None:
        await self.workers.aclose()
        if self.webhooks is not None:
            await self.webhooks.aclose()


def log_items(report: PassReport) -> None:
    """A line per repair and flag, with the reservation id when it is about one, so that a
    reservation's story across the services is one grep."""
    for kind, items in (("repair", report.repairs), ("flag", report.flags)):
        for item in items:
            rid = item.subject if item.subject and route_of(item.subject) else None
            log.info("reconcile %s %s", kind, item.kind,
                     extra={"sale": item.sale_id, "sku": item.sku, "subject": item.subject,
                            **({"reservation_id": rid} if rid else {})})  # fmt: skip
