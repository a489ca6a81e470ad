"""Orders stuck PENDING or PAYING: the payment is looked up at the provider by its
idempotency key, then the hold and the order are confirmed or released, Redis first and
Postgres following. A provider that cannot answer leaves the order alone: never a guess.
A hold Redis lost is rebuilt from Postgres first."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import asyncpg

from allocator.hold_scripts import HoldScripts
from allocator.ids import hold_keys
from flashsale.errors import PaymentError
from flashsale.keys import SkuKeys
from flashsale.orders import OrderStore, state_for_cause
from flashsale.payments import Charge, PaymentProvider, payment_row
from flashsale.records import HoldRecord
from reconciler.buckets import SkuDrift
from reconciler.captures import refund_capture
from reconciler.report import PassReport, Repair, isolated
from reconciler.skus import SkuChecks

_STUCK = """
SELECT id, sale_id, sku, state, quantity, amount, currency FROM orders
WHERE sale_id = ANY($1::text[]) AND state IN ('PENDING', 'PAYING')
  AND updated_at < now() - make_interval(secs => $2)
ORDER BY updated_at LIMIT $3
"""


async def find_stuck(pool: asyncpg.Pool, sales: Sequence[str], stuck_after_s: float,
                     limit: int = 1000) -> list[asyncpg.Record]:  # fmt: skip
    """The orders of ``sales`` PENDING or PAYING for longer than ``stuck_after_s``, oldest
    first. Writes nothing."""
    return list(await pool.fetch(_STUCK, list(sales), stuck_after_s, limit))


class StuckOrders:
    """Stuck orders over one Postgres pool, the holds, and the payment provider (None: every
    stuck order is reported unresolved)."""

    def __init__(self, pool: asyncpg.Pool, holds: HoldScripts, provider: PaymentProvider | None,
                 store: OrderStore, skus: SkuChecks, *, stuck_after_s: float) -> None:  # fmt: skip
        self.pool = pool
        self.holds = holds
        self.provider = provider
        self.store = store
        self.skus = skus
        self.stuck_after_s = stuck_after_s

    async def repair(self, sales: Sequence[str], report: PassReport) -> None:
        """Take every stuck order to the end its payment decides."""
        rows = await find_stuck(self.pool, sales, self.stuck_after_s)
        if not rows:
            return
        if self.provider is None:
            report.unresolved += [f"{r['id']}: stuck {r['state']}, no provider to ask"
                                  for r in rows]  # fmt: skip
            return
        keys_of = {r["id"]: hold_keys(r["sale_id"], r["sku"], r["id"]) for r in rows}
        raw = await self.holds.holds([(keys_of[r["id"]], r["id"]) for r in rows])
        missing = {keys_of[r["id"]] for r, h in zip(rows, raw, strict=True) if h is None}
        # Redis lost these holds: bring them back first.
        await self.skus.rebuild_each([SkuDrift(k, "holds_lost", {}, {}) for k in missing], report)
        if missing:
            raw = await self.holds.holds([(keys_of[r["id"]], r["id"]) for r in rows])
        for row, hold_raw in zip(rows, raw, strict=True):
            resolve = partial(self._resolve, row, keys_of[row["id"]], hold_raw, report)
            await isolated(report, f"{row['id']}: resolve the stuck order", resolve)

    async def _resolve(self, row: asyncpg.Record, keys: SkuKeys, hold_raw: bytes | None,
                       report: PassReport) -> None:  # fmt: skip
        assert self.provider is not None
        if hold_raw is None:
            report.unresolved.append(f"{row['id']}: no hold even after a rebuild")
            return
        hold = HoldRecord.parse(hold_raw)
        if row["state"] == "PENDING" and hold.state == "ACTIVE":
            return  # re-driven to the saga by the rebuild, or the sweeper expires it
        try:
            charge = await self.provider.lookup(row["id"])
        except PaymentError as exc:
            report.unresolved.append(f"{row['id']}: provider lookup failed ({exc})")
            return
        await self._settle(row, keys, hold, charge, report)

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
            assert self.provider is not None
            refund = await refund_capture(self.provider, rid)
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
                payment = payment_row(rid, charge)  # NOT_CHARGED when none was made
                await self.store.settle_payments(conn, [payment])
            after = {"order": state, "hold": "RELEASED", "payment": payment[2]}
        report.repairs.append(Repair(keys.sale_id, keys.sku, "resolve_stuck", rid, before, after))
