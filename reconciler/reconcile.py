"""One reconcile pass: find where Redis drifted from Postgres (the truth) and repair it.

The pass runs the checks, each of which detects without writing and then repairs:

* **SKU drift** (:mod:`reconciler.skus`): a SKU Redis lost, an interrupted rebuild, corrupt
  counters, a total or sold counter that disagrees with Postgres: rebuilt from Postgres
  (:mod:`reconciler.rebuild`); a sale status or sale hash Redis lost: written again;
* **waiting rooms** (:mod:`reconciler.waiting_rooms`) lost or gone back: restored to at least
  what gateways and pumps checkpointed;
* **stuck orders** (:mod:`reconciler.stuck_orders`): resolved through the payment provider;
* **captures** (:mod:`reconciler.captures`): orphan captures refunded, confirmed orders with no
  capture flagged;
* **holds no order will follow** (:mod:`reconciler.orphan_holds`): overdue ACTIVE holds
  expired in any sale in scope, PAYING holds whose order was never written released.

Every repair is written to ``reconcile_events`` with its before and after values and counted in
metrics; a second pass over a repaired state finds nothing to do. The post-sale audit runs the
same checks' detection (:func:`would_repair`), not this driver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence

import asyncpg
import orjson
from prometheus_client import CollectorRegistry

from allocator.hold_scripts import HoldScripts
from flashsale.clients import RedisClient
from flashsale.orders import OrderStore
from flashsale.payments import PaymentProvider
from reconciler.captures import Captures, recorded_orphans
from reconciler.orphan_holds import ORDERLESS_AFTER_S, OrphanHolds
from reconciler.report import PassReport, ReconcileMetrics
from reconciler.skus import SkuChecks, every_bucket
from reconciler.stuck_orders import StuckOrders, find_stuck
from reconciler.waiting_rooms import WaitingRooms

log = logging.getLogger("flashsale.reconciler")

# An order in its payment longer than this is stuck (the default; would_repair's, the audit's)
STUCK_AFTER_S = 60.0

_RECORD = """
INSERT INTO reconcile_events (sale_id, sku, kind, subject, before, after)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
"""


class Reconciler:
    """Reconcile passes over one Postgres pool, one Redis client and the payment provider
    (None: payment checks are skipped and reported)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: RedisClient,
        provider: PaymentProvider | None,
        order_events_topic: str,
        *,
        stuck_after_s: float = STUCK_AFTER_S,
        queue_grace_s: float = 2.0,
        orderless_after_s: float = ORDERLESS_AFTER_S,
        slow_every_s: float = 30.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.pool = pool
        store = OrderStore(pool, order_events_topic, "reconciler")
        self.skus = SkuChecks(pool, client)
        self.rooms = WaitingRooms(pool, client, grace_s=queue_grace_s)
        self.stuck = StuckOrders(pool, HoldScripts(client), provider, store, self.skus,
                                 stuck_after_s=stuck_after_s)  # fmt: skip
        self.captures = Captures(pool, provider, store)
        self.orphans = OrphanHolds(pool, client, provider, grace_s=orderless_after_s)
        self.metrics = ReconcileMetrics(registry or CollectorRegistry())
        # The checks that read every open or confirmed order of a sale in scope run at most
        # this often for it in the service (always with --once and in the audit).
        self.slow_every_s = slow_every_s
        self._next_slow: dict[str, float] = {}  # by sale

    async def run_once(self, sales: Sequence[str] | None = None, *,
                       wait_for_grace: bool = False, full: bool = True,
                       only: Sequence[str] | None = None,
                       stage: Callable[[str], None] = lambda _: None) -> PassReport:  # fmt: skip
        """Detect and repair everything once. ``wait_for_grace``: a waiting room seen lost is
        restored in this pass after waiting out the grace (``--once``); otherwise a later pass
        restores it. ``full=False`` (the service) runs the checks that read every open or
        confirmed order of a sale only every ``slow_every_s``. ``only``: of the sales in
        scope (or of ``sales``), just these: the service gives each sale its turn at a pace
        set by its size (reconciler/service.py). ``stage`` is told what the pass is doing."""
        began = time.monotonic()
        report = PassReport()
        stopped = True  # by an outage: the repairs made so far are still recorded
        try:
            await self._checks(report, sales, only, wait_for_grace=wait_for_grace, full=full,
                               stage=stage)  # fmt: skip
            stopped = False
        finally:
            report.seconds = time.monotonic() - began
            try:
                await self._record(report)
            except Exception:
                if not stopped:
                    raise
                log.exception("could not record this stopped pass's repairs: %s",
                              [i.json() for i in report.repairs + report.flags])  # fmt: skip
            self.metrics.count(report, only)
        return report

    def keep(self, sales: Collection[str]) -> None:
        """Forget what this process knows of the sales not in ``sales``: they left the scope."""
        self.skus.keep(sales)
        self.metrics.keep(sales)
        self._next_slow = {sale: at for sale, at in self._next_slow.items() if sale in sales}

    async def _checks(self, report: PassReport, sales: Sequence[str] | None,
                      only: Sequence[str] | None, *, wait_for_grace: bool, full: bool,
                      stage: Callable[[str], None]) -> None:  # fmt: skip
        stage("finding the sales and SKUs to check")
        every = await self.skus.scope(sales, only)
        quiet = set(only or ()) & self.skus.all_settled  # in scope, no SKU row read
        in_scope = sorted({r["sale_id"] for r in every} | quiet)
        rows = self.skus.unsettled(every)  # the SKUs read: an ended sale's untouched ones once
        report.skus = len(rows)
        stage("restoring sales Redis lost")
        await self.skus.restore_sales(in_scope, report)
        stage(f"comparing {len(rows):,} SKUs in Redis with their orders")
        drifted, statuses = await self.skus.find(rows)
        stage(f"rebuilding {len(drifted):,} SKUs from their orders")
        await self.skus.rebuild_each(drifted, report)
        stage("writing the SKUs' statuses")
        await self.skus.write_statuses(statuses, report)
        stage("checking the waiting rooms")
        await self.rooms.repair(in_scope, report, wait=wait_for_grace)
        now = time.monotonic()
        slow = [sale for sale in in_scope if full or now >= self._next_slow.get(sale, 0.0)]
        if in_scope:
            stage("looking for charges without an order")
            await self.captures.repair_orphans(in_scope, report, with_payments_table=bool(slow))
        if slow:
            self._next_slow.update((sale, now + self.slow_every_s) for sale in slow)
            stage("finishing orders stuck in their payment")
            await self.stuck.repair(slow, report)
            stage("checking that every confirmed order was charged")
            await self.captures.flag_uncaptured(slow, report)
            # not the SKUs this pass found settled: nothing is held or paid there
            chosen = set(slow)
            held = [r for r in self.skus.unsettled(rows) if r["sale_id"] in chosen]
            stage("looking for holds without an order")
            await self.orphans.repair(every_bucket(held), report)

    async def _record(self, report: PassReport) -> None:
        items = report.repairs + report.flags
        if not items:
            return
        await self.pool.execute(
            _RECORD, [i.sale_id for i in items], [i.sku for i in items], [i.kind for i in items],
            [i.subject for i in items], [orjson.dumps(i.before).decode() for i in items],
            [orjson.dumps(i.after).decode() for i in items],
        )  # fmt: skip
        for item in items:
            log.debug("reconcile %s %s/%s %s: %s -> %s", item.kind, item.sale_id,
                      item.sku or "-", item.subject or "", item.before, item.after)  # fmt: skip


async def would_repair(pool: asyncpg.Pool, client: RedisClient,
                       sales: Sequence[str]) -> list[str]:  # fmt: skip
    """What a reconcile pass would repair now, described, from the checks' detection alone
    (nothing is written). The provider's side is left out: it needs the provider."""
    skus = SkuChecks(pool, client)
    rows = await skus.scope(sales)
    in_scope = sorted({r["sale_id"] for r in rows})
    drift, statuses = await skus.find(rows)
    found = [f"{d.keys.sale_id}/{d.keys.sku}: {d.reason}" for d in drift]
    found += [f"{r.sale_id}/{r.sku}: status {r.before['status']} -> {r.after['status']}"
              for r in statuses]  # fmt: skip
    rooms = await WaitingRooms(pool, client, grace_s=0.0).find(in_scope)
    found += [f"{sale}: waiting room {why}" for sale, why, _, _ in rooms]
    if in_scope:
        found += [f"{r['id']}: stuck {r['state']}"
                  for r in await find_stuck(pool, in_scope, STUCK_AFTER_S)]  # fmt: skip
        found += [f"{r['key']}: payment recorded for an order {r['state']}"
                  for r in await recorded_orphans(pool, in_scope)]  # fmt: skip
    held = every_bucket(skus.unsettled(rows))  # settled: nothing active or paying there
    orphans = OrphanHolds(pool, client, None, grace_s=ORDERLESS_AFTER_S)
    found += [f"{rid}: ACTIVE past its deadline" for _, rid in await orphans.overdue(held)]
    found += [f"{rid}: PAYING with no order" for _, rid in await orphans.orderless(held)]
    return found
