"""One reconcile pass: find where Redis drifted from Postgres (the truth) and repair it.

For every SKU of the sales in scope (preloaded, not ended more than 15 minutes before their
longest hold could have lived; or the sales named) a pass reads the
Redis counters and configuration (one pipelined round trip for all SKUs) and the Postgres
rows (one query), and repairs:

* **a SKU Redis lost** (restart without persistence, FLUSHALL, evicted or deleted keys), an
  interrupted rebuild, **counters that break conservation** or disagree with the stock total,
  and **a sold counter behind Postgres**: rebuilt from Postgres (:mod:`reconciler.rebuild`);
* **a sold counter ahead of Postgres once the pipeline has drained** (no open order, no outbox
  entry, nothing paying): reported, then rebuilt the same way;
* **a sale status** Redis disagrees with: written again;
* **a waiting room Redis lost** (or whose counters went back): restored to at least what
  gateways and pumps checkpointed, after a short grace so every gateway has flushed;
* **orders stuck PENDING or PAYING** beyond ``stuck_after_s``: the payment is looked up at the
  provider by its idempotency key, then the hold and the order are confirmed or released. A
  provider that cannot answer leaves the order alone (never a guess);
* **a capture with no confirmed order** (from the payments table and the provider's list of
  the sale's charges): refunded, and the refund recorded;
* **a confirmed order with no capture**: flagged once (an event; nothing to repair
  automatically).

Every repair is written to ``reconcile_events`` with its before and after values and counted
in metrics; a second pass over a repaired state finds nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge

from allocator.scripts import HoldScripts, Scripts, read_packed
from flashsale.errors import PaymentError
from flashsale.events import HoldRecord
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.marks import Mark, highest
from flashsale.sales import sale_fields
from reconciler.rebuild import STATE_CAUSE, rebuild_sku, restore_queue
from workers.orders import OrderStore, state_for_cause
from workers.payments import Charge, PaymentProvider

log = logging.getLogger("flashsale.reconciler")

# Sales in scope: preloaded, and not ended more than 15 minutes before their longest hold
# could have lived (an ended sale ends when it was ended); or named explicitly.
SCOPE = """
SELECT k.sale_id, k.sku, k.stock_total, k.sold, s.status
FROM sale_skus k JOIN sales s ON s.id = k.sale_id
WHERE k.preloaded_at IS NOT NULL
  AND ($1::text[] IS NOT NULL OR
       CASE WHEN s.status = 'ended' THEN least(s.ends_at, s.updated_at) ELSE s.ends_at END
       + make_interval(secs => k.hold_ttl_seconds) + interval '15 minutes' > now())
  AND ($1::text[] IS NULL OR k.sale_id = ANY($1::text[]))
ORDER BY k.sale_id, k.sku
"""
_OPEN_FOR_SKU = """
SELECT count(*) FROM orders WHERE sale_id = $1 AND sku = $2 AND state IN ('PENDING', 'PAYING')
"""
_STUCK = """
SELECT id, sale_id, sku, state, quantity, amount, currency FROM orders
WHERE sale_id = ANY($1::text[]) AND state IN ('PENDING', 'PAYING')
  AND updated_at < now() - make_interval(secs => $2)
ORDER BY updated_at LIMIT $3
"""
# Captures (or unknown outcomes) recorded for an order that is not CONFIRMED and no longer
# open: the money must go back.
_ORPHAN_PAYMENTS = """
SELECT p.idempotency_key AS key, o.state
FROM unnest($1::text[]) AS s(sale)
CROSS JOIN LATERAL (
    -- A sale's payments by key range: the key is the reservation id, "<sale>~<sku>~r-...".
    -- OFFSET 0 keeps the planner from flattening this into a scan of every payment.
    SELECT idempotency_key, order_id FROM payments
    WHERE idempotency_key > s.sale || '~' AND idempotency_key < s.sale || '~~'
      AND state IN ('CAPTURED', 'UNKNOWN')
    OFFSET 0
) p
LEFT JOIN LATERAL (SELECT state FROM orders WHERE id = p.order_id OFFSET 0) o ON true
WHERE o.state IS NULL OR o.state IN ('EXPIRED', 'CANCELLED', 'PAYMENT_FAILED')
"""
_ORDER_STATES = "SELECT id, state FROM orders WHERE id = ANY($1::text[])"
_UNCAPTURED = """
SELECT o.id, o.sale_id, o.sku, p.state AS payment FROM orders o
LEFT JOIN payments p ON p.idempotency_key = o.id
WHERE o.sale_id = ANY($1::text[]) AND o.state = 'CONFIRMED'
  AND p.state IS DISTINCT FROM 'CAPTURED'
  AND NOT EXISTS (SELECT 1 FROM reconcile_events e
                  WHERE e.kind = 'flag_uncaptured' AND e.subject = o.id)
"""
_RECORD = """
INSERT INTO reconcile_events (sale_id, sku, kind, subject, before, after)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
"""
_RECORD_REFUND = """
INSERT INTO payments (idempotency_key, order_id, provider_ref, amount, currency, state)
VALUES ($1, $1, $2, $3, $4, 'REFUNDED')
ON CONFLICT (idempotency_key) DO UPDATE SET provider_ref = EXCLUDED.provider_ref,
    state = 'REFUNDED', updated_at = now()
"""


@dataclass(frozen=True, slots=True)
class Repair:
    """One change the reconciler made (or would make), as recorded in ``reconcile_events``."""

    sale_id: str
    sku: str | None
    kind: str
    subject: str | None = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {"sale_id": self.sale_id, "sku": self.sku, "kind": self.kind,
                "subject": self.subject, "before": self.before, "after": self.after}  # fmt: skip


@dataclass
class PassReport:
    """What one pass looked at and did. ``unresolved``: what it could not decide now
    (provider down, a hold that moved meanwhile); the next pass tries again."""

    skus: int = 0
    seconds: float = 0.0
    repairs: list[Repair] = field(default_factory=list)
    flags: list[Repair] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.repairs)

    def json(self) -> dict[str, Any]:
        return {"skus": self.skus, "seconds": round(self.seconds, 4), "changed": self.changed,
                "repairs": [r.json() for r in self.repairs],
                "flags": [f.json() for f in self.flags], "unresolved": self.unresolved}  # fmt: skip


@dataclass(frozen=True, slots=True)
class SkuDrift:
    """A SKU whose Redis state needs a rebuild, and why."""

    keys: SkuKeys
    reason: str
    redis: dict[str, Any]
    postgres: dict[str, Any]


def sku_reads(rows: Sequence[asyncpg.Record]) -> list[tuple[str | int, ...]]:
    """The pass's read of each SKU in scope: its counters, then its status and rebuild flag."""
    commands: list[tuple[str | int, ...]] = []
    for row in rows:
        keys = SkuKeys(row["sale_id"], row["sku"])
        commands.append(("HMGET", keys.stock, "total", "available", "active", "paying", "sold"))
        commands.append(("HMGET", keys.meta, "status", "rebuilding"))
    return commands


class ReconcileMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.repairs = Counter("flashsale_reconcile_repairs", "Repairs made, by kind", ["kind"],
                               registry=registry)  # fmt: skip
        self.flags = Counter("flashsale_reconcile_flags", "Problems flagged for a human, by kind",
                             ["kind"], registry=registry)  # fmt: skip
        self.passes = Counter("flashsale_reconcile_passes", "Reconcile passes run",
                              registry=registry)  # fmt: skip
        self.failures = Counter("flashsale_reconcile_pass_failures",
                                "Passes that stopped on an error", registry=registry)  # fmt: skip
        self.seconds = Gauge("flashsale_reconcile_pass_seconds", "Duration of the last pass",
                             registry=registry)  # fmt: skip
        self.skus = Gauge("flashsale_reconcile_skus", "SKUs in scope of the last pass",
                          registry=registry)  # fmt: skip
        self.unresolved = Gauge(
            "flashsale_reconcile_unresolved", "Items the last pass could not decide",
            registry=registry,
        )  # fmt: skip


class Reconciler:
    """Reconcile passes over one Postgres pool, one Redis client and the payment provider
    (None: payment checks are skipped and reported)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: aioredis.Redis,
        provider: PaymentProvider | None,
        order_events_topic: str,
        *,
        stuck_after_s: float = 60.0,
        queue_grace_s: float = 2.0,
        slow_every_s: float = 30.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.pool = pool
        self.client = client
        self.provider = provider
        self.store = OrderStore(pool, order_events_topic, "reconciler")
        self.holds = HoldScripts(client)
        self.scripts = Scripts(client)
        self.stuck_after_s = stuck_after_s
        self.queue_grace_s = queue_grace_s
        self.metrics = ReconcileMetrics(registry or CollectorRegistry())
        self._lost_since: dict[str, float] = {}  # sale -> when its waiting room was seen lost
        self._cursor: dict[str, str | None] = {}  # sale -> last provider charge listed
        # The checks that read every open or confirmed order of the sales in scope run at
        # most this often in the service (always with --once and in the audit).
        self.slow_every_s = slow_every_s
        self._next_slow = 0.0

    # -- detection (no writes) ------------------------------------------------------------

    async def scope(self, sales: Sequence[str] | None = None) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(SCOPE, list(sales) if sales is not None else None))

    async def sku_drift(
        self, rows: Sequence[asyncpg.Record]
    ) -> tuple[list[SkuDrift], list[Repair]]:
        """The SKUs whose Redis state needs a rebuild, and the status writes due on the
        others: one pipelined read of every SKU's counters and configuration."""
        replies = await read_packed(self.client, sku_reads(rows))
        drift: list[SkuDrift] = []
        statuses: list[Repair] = []
        names = ("total", "available", "active", "paying", "sold")
        for index, row in enumerate(rows):
            keys = SkuKeys(row["sale_id"], row["sku"])
            counts, (status, rebuilding) = replies[2 * index], replies[2 * index + 1]
            redis: dict[str, Any] = {
                n: (None if v is None else int(v)) for n, v in zip(names, counts, strict=True)
            }
            pg = {"stock_total": row["stock_total"], "sold": row["sold"]}
            reason = await self._reason(keys, redis, status, rebuilding, pg)
            if reason is not None:
                redis["status"] = None if status is None else _text(status)
                drift.append(SkuDrift(keys, reason, redis, pg))
            elif _text(status) != row["status"]:
                statuses.append(Repair(
                    row["sale_id"], row["sku"], "status", None, {"status": _text(status)},
                    {"status": row["status"]},
                ))  # fmt: skip
        return drift, statuses

    async def _reason(self, keys: SkuKeys, r: dict[str, Any], status: Any, rebuilding: Any,
                      pg: dict[str, Any]) -> str | None:  # fmt: skip
        if status is None or r["total"] is None:
            return "lost"
        if rebuilding is not None:
            return "rebuild_interrupted"
        values = [r[n] for n in ("available", "active", "paying", "sold")]
        if any(v is None or v < 0 for v in values):
            return "counters_corrupt"
        if r["total"] != sum(values):
            return "conservation"
        if r["total"] != pg["stock_total"]:
            return "total_differs"
        if r["sold"] < pg["sold"]:
            return "sold_behind"
        if r["sold"] > pg["sold"] and await self._drained(keys, r):
            return "sold_ahead"
        return None

    async def _drained(self, keys: SkuKeys, r: dict[str, Any]) -> bool:
        """Nothing of the SKU is in flight: no PAYING hold, no outbox entry, no open order."""
        if r["paying"]:
            return False
        if await self.client.xlen(keys.outbox):
            return False
        return not await self.pool.fetchval(_OPEN_FOR_SKU, keys.sale_id, keys.sku)

    async def queue_drift(self, sales: Sequence[str]) -> list[tuple[str, str, Mark, Mark]]:
        """(sale, why, Redis counters, checkpointed marks) for waiting rooms to restore:
        ``lost`` (not live) or ``behind`` (below what was seen)."""
        pipe = self.client.pipeline(transaction=False)
        for sale in sales:
            pipe.hmget(SaleKeys(sale).queue, "live", "tail", "serving", "pre", "cutoff",
                       "sealed", "shuffled", "sold_out")  # fmt: skip
        replies = await pipe.execute() if sales else []
        out = []
        for sale, q in zip(sales, replies, strict=True):
            now = Mark(_int(q[1]), _int(q[2]), _int(q[3]),
                       None if _int(q[4], -1) < 0 else _int(q[4]), _int(q[5]) == 1,
                       _int(q[6]) == 1, _int(q[7]) == 1)  # fmt: skip
            seen = await highest(self.pool, sale)
            if _int(q[0]) != 1:
                out.append((sale, "lost", now, seen))
            elif now.behind(seen):
                out.append((sale, "behind", now, seen))
        return out

    async def pending(self, sales: Sequence[str] | None = None) -> list[str]:
        """What a pass would repair now, described, without writing anything (the audit's
        convergence check). Provider-side checks are left out: they need the provider."""
        rows = await self.scope(sales)
        in_scope = sorted({r["sale_id"] for r in rows})
        drift, statuses = await self.sku_drift(rows)
        found = [f"{d.keys.sale_id}/{d.keys.sku}: {d.reason}" for d in drift]
        found += [f"{r.sale_id}/{r.sku}: status {r.before['status']} -> {r.after['status']}"
                  for r in statuses]  # fmt: skip
        found += [f"{sale}: waiting room {why}" for sale, why, _, _ in
                  await self.queue_drift(in_scope)]  # fmt: skip
        if in_scope:
            stuck = await self.pool.fetch(_STUCK, in_scope, self.stuck_after_s, 1000)
            found += [f"{r['id']}: stuck {r['state']}" for r in stuck]
            orphans = await self.pool.fetch(_ORPHAN_PAYMENTS, in_scope)
            found += [f"{r['key']}: payment recorded for an order {r['state']}" for r in orphans]
        return found

    # -- one pass ---------------------------------------------------------------------------

    async def run_once(self, sales: Sequence[str] | None = None, *,
                       wait_for_grace: bool = False, full: bool = True) -> PassReport:  # fmt: skip
        """Detect and repair everything above once. ``wait_for_grace``: a waiting room seen
        lost is restored in this pass after waiting out the grace (``--once``); otherwise a
        later pass restores it. ``full=False`` (the service) runs the checks that read every
        open or confirmed order only every ``slow_every_s``."""
        began = time.monotonic()
        report = PassReport()
        rows = await self.scope(sales)
        report.skus = len(rows)
        in_scope = sorted({r["sale_id"] for r in rows})
        await self._restore_sales(in_scope, report)
        drifted, statuses = await self.sku_drift(rows)
        for drift in drifted:
            await self._rebuild(drift, report)
        for repair in statuses:
            await self.scripts.set_status(SkuKeys(repair.sale_id, repair.sku or "").meta,
                                          repair.after["status"])  # fmt: skip
            report.repairs.append(repair)
        await self._queues(in_scope, report, wait_for_grace)
        slow = full or time.monotonic() >= self._next_slow
        if in_scope:
            await self._orphans(in_scope, report, with_payments_table=slow)
        if in_scope and slow:
            self._next_slow = time.monotonic() + self.slow_every_s
            await self._stuck(in_scope, report)
            await self._uncaptured(in_scope, report)
        report.seconds = time.monotonic() - began
        await self._record(report)
        m = self.metrics
        m.passes.inc()
        m.seconds.set(report.seconds)
        m.skus.set(report.skus)
        m.unresolved.set(len(report.unresolved))
        for repair in report.repairs:
            m.repairs.labels(repair.kind).inc()
        for flag in report.flags:
            m.flags.labels(flag.kind).inc()
        return report

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

    async def _restore_sales(self, sales: Sequence[str], report: PassReport) -> None:
        """Sale configuration hashes Redis lost: written again from Postgres."""
        pipe = self.client.pipeline(transaction=False)
        for sale in sales:
            pipe.exists(SaleKeys(sale).sale)
        present = await pipe.execute() if sales else []
        for sale, exists in zip(sales, present, strict=True):
            if exists:
                continue
            async with self.pool.acquire() as conn:
                row = await conn.fetchrow("SELECT * FROM sales WHERE id = $1", sale)
                skus = await conn.fetch("SELECT * FROM sale_skus WHERE sale_id = $1 ORDER BY sku",
                                        sale)  # fmt: skip
            fields = sale_fields(row, skus)
            await self.scripts.put_sale(SaleKeys(sale), fields, open_queue=False)
            report.repairs.append(Repair(sale, None, "restore_sale", None, {"present": False},
                                         {"status": fields["status"]}))  # fmt: skip

    async def _rebuild(self, drift: SkuDrift, report: PassReport) -> None:
        # Counted ahead of Postgres with nothing in flight: the SOLD holds Postgres has no
        # order for are not sold as far as the truth is concerned.
        done = await rebuild_sku(self.pool, self.client, drift.keys,
                                 release_unordered_sold=drift.reason == "sold_ahead")  # fmt: skip
        report.repairs.append(Repair(
            drift.keys.sale_id, drift.keys.sku, "rebuild_sku", None,
            {"reason": drift.reason, "redis": drift.redis, "postgres": drift.postgres},
            {"redis": _counts(done.after), "holds_written": done.written,
             "holds_released": done.released},
        ))  # fmt: skip

    async def _queues(self, sales: Sequence[str], report: PassReport, wait: bool) -> None:
        drift = await self.queue_drift(sales)
        now = time.monotonic()
        for sale, why, _, _ in drift:
            if why == "lost":
                self._lost_since.setdefault(sale, now)
        lost = [self._lost_since[sale] for sale, why, _, _ in drift if why == "lost"]
        left = self.queue_grace_s - (now - min(lost)) if lost else 0.0
        if left > 0 and wait:  # every gateway flushes its marks within the grace
            log.info("waiting %.1fs for the gateways' queue marks before restoring", left)
            await asyncio.sleep(left)
        for sale, why, current, _ in drift:
            if why == "lost" and not wait and now - self._lost_since[sale] < self.queue_grace_s:
                report.unresolved.append(f"{sale}: waiting room lost; restored after "
                                         f"{self.queue_grace_s:g}s of grace")  # fmt: skip
                continue
            mark, (tail, serving, cutoff) = await restore_queue(self.pool, self.client, sale)
            self._lost_since.pop(sale, None)
            report.repairs.append(Repair(
                sale, None, "restore_queue", None,
                {"reason": why, "tail": current.tail, "serving": current.serving},
                {"tail": tail, "serving": serving, "cutoff": cutoff, "marks_tail": mark.tail,
                 "marks_serving": mark.serving},
            ))  # fmt: skip

    # -- payments -------------------------------------------------------------------------

    async def _stuck(self, sales: Sequence[str], report: PassReport) -> None:
        """Orders PENDING or PAYING for longer than ``stuck_after_s``."""
        rows = await self.pool.fetch(_STUCK, list(sales), self.stuck_after_s, 1000)
        if not rows:
            return
        if self.provider is None:
            report.unresolved += [f"{r['id']}: stuck {r['state']}, no provider to ask"
                                  for r in rows]  # fmt: skip
            return
        keys_of = {r["id"]: SkuKeys(r["sale_id"], r["sku"]) for r in rows}
        raw = await self.holds.holds([(keys_of[r["id"]], r["id"]) for r in rows])
        missing = {keys_of[r["id"]] for r, h in zip(rows, raw, strict=True) if h is None}
        for keys in missing:  # Redis lost these holds: bring them back first
            await self._rebuild(SkuDrift(keys, "holds_lost", {}, {}), report)
        if missing:
            raw = await self.holds.holds([(keys_of[r["id"]], r["id"]) for r in rows])
        for row, hold_raw in zip(rows, raw, strict=True):
            if hold_raw is None:
                report.unresolved.append(f"{row['id']}: no hold even after a rebuild")
                continue
            hold = HoldRecord.parse(hold_raw)
            if row["state"] == "PENDING" and hold.state == "ACTIVE":
                continue  # re-driven to the saga by the rebuild, or the sweeper expires it
            try:
                charge = await self.provider.lookup(row["id"])
            except PaymentError as exc:
                report.unresolved.append(f"{row['id']}: provider lookup failed ({exc})")
                continue
            await self._settle(row, keys_of[row["id"]], hold, charge, report)

    async def _settle(self, row: asyncpg.Record, keys: SkuKeys, hold: HoldRecord,
                      charge: Charge | None, report: PassReport) -> None:  # fmt: skip
        """Take a stuck order to the end its payment decides; Redis first, Postgres follows."""
        rid, before = row["id"], {"order": row["state"], "hold": hold.state,
                                  "payment": charge.status if charge else None}  # fmt: skip
        if charge is not None and charge.status == "captured" and hold.state != "RELEASED":
            if hold.state != "SOLD":
                answer = await self.holds.confirm(keys, rid)
                if not answer.ok:
                    report.unresolved.append(f"{rid}: confirm refused ({answer.reason})")
                    return
            async with self.pool.acquire() as conn, conn.transaction():
                await self.store.advance(
                    conn, [(rid, "payment_captured")], ["PENDING", "PAYING"], "CONFIRMED",
                    "order.confirmed", count_sold=True,
                )  # fmt: skip
                await self.store.settle_payments(conn, [(rid, charge.provider_ref, "CAPTURED")])
            after: dict[str, Any] = {"order": "CONFIRMED", "hold": "SOLD", "payment": "CAPTURED"}
        elif charge is not None and charge.status == "captured":  # released meanwhile
            refund = await self._refund_capture(rid)
            cause = hold.cause or "cancelled"
            async with self.pool.acquire() as conn, conn.transaction():
                await self.store.advance(conn, [(rid, cause)], ["PENDING", "PAYING"],
                                         state_for_cause(cause),
                                         f"order.{state_for_cause(cause).lower()}")  # fmt: skip
                await self.store.note(conn, [(rid, "late_capture_refunded")], "payment.refunded")
                await self.store.settle_payments(conn, [(rid, refund.provider_ref, "REFUNDED")])
            after = {"order": state_for_cause(cause), "hold": "RELEASED", "payment": "REFUNDED"}
        else:
            # Declined, refunded, or never charged (the provider has no charge under the key):
            # the hold goes back (a released one stays released) and the order ends with it.
            causes: dict[str | None, str] = {
                None: "expired", "declined": "payment_failed", "refunded": "cancelled",
            }  # fmt: skip
            cause = causes[charge.status if charge else None]
            if hold.state in ("ACTIVE", "PAYING"):
                answer = await self.holds.release(keys, rid, cause)
                if not answer.ok:
                    report.unresolved.append(f"{rid}: release refused ({answer.reason})")
                    return
            elif hold.state == "RELEASED":
                cause = hold.cause or cause
            else:  # SOLD without a capture: a human must look
                report.flags.append(Repair(keys.sale_id, keys.sku, "flag_sold_uncaptured", rid,
                                           before, {}))  # fmt: skip
                return
            state = state_for_cause(cause)
            async with self.pool.acquire() as conn, conn.transaction():
                await self.store.advance(conn, [(rid, cause)], ["PENDING", "PAYING"], state,
                                         f"order.{state.lower()}")  # fmt: skip
                if charge is not None:
                    await self.store.settle_payments(conn, [
                        (rid, charge.provider_ref, charge.status.upper())])  # fmt: skip
            paid = charge.status.upper() if charge else None
            after = {"order": state, "hold": "RELEASED", "payment": paid}
        report.repairs.append(Repair(keys.sale_id, keys.sku, "resolve_stuck", rid, before, after))

    async def _refund_capture(self, rid: str) -> Charge:
        assert self.provider is not None
        log.warning("refunding the capture of %s: its order is not confirmed", rid)
        return await self.provider.refund(rid)

    async def _orphans(self, sales: Sequence[str], report: PassReport, *,
                       with_payments_table: bool) -> None:  # fmt: skip
        """Captures with no confirmed order: from the provider's list of each sale's charges
        since the last pass and, ``with_payments_table``, captures recorded in Postgres."""
        candidates: dict[str, str | None] = {}
        if with_payments_table:
            rows = await self.pool.fetch(_ORPHAN_PAYMENTS, list(sales))
            candidates = {r["key"]: r["state"] for r in rows}
        if self.provider is None:
            if candidates:
                report.unresolved.append(f"{len(candidates)} payments to check: no provider")
            return
        listed: dict[str, Charge] = {}
        for sale in sales:
            try:
                for made in await self._new_charges(sale):
                    if made.status == "captured":
                        listed[made.key] = made
            except PaymentError as exc:
                report.unresolved.append(f"{sale}: could not list the provider's charges ({exc})")
        if listed:
            states = {r["id"]: r["state"]
                      for r in await self.pool.fetch(_ORDER_STATES, list(listed))}  # fmt: skip
            for key in listed:
                state = states.get(key)
                if state is None or state in STATE_CAUSE:
                    candidates[key] = state
        for key, state in candidates.items():
            charge: Charge | None
            try:
                charge = listed.get(key) or await self.provider.lookup(key)
            except PaymentError as exc:
                report.unresolved.append(f"{key}: provider lookup failed ({exc})")
                continue
            if charge is None or charge.status != "captured":
                if charge is not None:  # declined or already refunded: record what it is
                    async with self.pool.acquire() as conn:
                        await self.store.settle_payments(
                            conn, [(key, charge.provider_ref, charge.status.upper())]
                        )
                    report.repairs.append(Repair(
                        key.partition("~")[0], None, "record_payment", key,
                        {"payment": "CAPTURED or UNKNOWN"}, {"payment": charge.status.upper()},
                    ))  # fmt: skip
                continue
            refund = await self._refund_capture(key)
            sale_id, _, rest = key.partition("~")
            sku = rest.partition("~")[0] or None
            async with self.pool.acquire() as conn, conn.transaction():
                if state is not None:
                    await self.store.note(conn, [(key, "orphan_capture_refunded")],
                                          "payment.refunded")  # fmt: skip
                await conn.execute(_RECORD_REFUND, key, refund.provider_ref, refund.amount,
                                   refund.currency)  # fmt: skip
            report.repairs.append(Repair(
                sale_id, sku, "refund_orphan", key, {"order": state, "payment": "captured"},
                {"order": state, "payment": "refunded", "refund": refund.provider_ref},
            ))  # fmt: skip

    async def _new_charges(self, sale: str) -> list[Charge]:
        """The sale's charges made since the last pass (all of them on the first)."""
        assert self.provider is not None
        out: list[Charge] = []
        after = self._cursor.get(sale)
        while True:
            charges, more = await self.provider.list_charges(f"{sale}~", after, 500)
            out += charges
            if charges:
                after = charges[-1].key
            if not more:
                break
        self._cursor[sale] = after
        return out

    async def _uncaptured(self, sales: Sequence[str], report: PassReport) -> None:
        """Confirmed orders with no recorded capture: flagged once each."""
        for row in await self.pool.fetch(_UNCAPTURED, list(sales)):
            report.flags.append(Repair(
                row["sale_id"], row["sku"], "flag_uncaptured", row["id"],
                {"order": "CONFIRMED", "payment": row["payment"]}, {},
            ))  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any, default: int = 0) -> int:
    return int(value) if value not in (None, b"", "") else default


def _counts(counts: Any) -> dict[str, int]:
    return {n: getattr(counts, n) for n in ("total", "available", "active", "paying", "sold")}
