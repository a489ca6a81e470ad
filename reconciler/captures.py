"""Captures against orders: a capture with no confirmed order is refunded and the refund
recorded; a confirmed order with no recorded capture is flagged once, for a human.

Captures are found in the ``payments`` table and, incrementally (a cursor per sale), in the
provider's list of the sale's charges: reservation ids start with the sale id, so the provider
lists a sale's charges by key prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import asyncpg

from flashsale.errors import PaymentError
from flashsale.orders import STATE_CAUSE, OrderStore
from flashsale.payments import Charge, PaymentProvider, payment_row
from flashsale.wording import counted
from reconciler.report import PassReport, Repair, isolated

log = logging.getLogger("flashsale.reconciler")

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
_RECORD_REFUND = """
INSERT INTO payments (idempotency_key, order_id, provider_ref, amount, currency, state)
VALUES ($1, $1, $2, $3, $4, 'REFUNDED')
ON CONFLICT (idempotency_key) DO UPDATE SET provider_ref = EXCLUDED.provider_ref,
    state = 'REFUNDED', updated_at = now()
"""


async def refund_capture(provider: PaymentProvider, key: str) -> Charge:
    """Refund the capture made under ``key``: its order is not confirmed."""
    log.warning("refunding the capture of %s: its order is not confirmed", key)
    return await provider.refund(key)


async def recorded_orphans(pool: asyncpg.Pool, sales: Sequence[str]) -> list[asyncpg.Record]:
    """Captures (or unknown outcomes) the payments table holds for orders of ``sales`` that
    ended without being confirmed: (key, order state). Writes nothing."""
    return list(await pool.fetch(_ORPHAN_PAYMENTS, list(sales)))


class Captures:
    """Captures against orders, over one Postgres pool and the payment provider (None: the
    provider's side is skipped and reported unresolved)."""

    def __init__(self, pool: asyncpg.Pool, provider: PaymentProvider | None,
                 store: OrderStore) -> None:  # fmt: skip
        self.pool = pool
        self.provider = provider
        self.store = store
        self._cursor: dict[str, str | None] = {}  # sale -> last provider charge listed

    async def repair_orphans(self, sales: Sequence[str], report: PassReport, *,
                             with_payments_table: bool) -> None:  # fmt: skip
        """Refund captures with no confirmed order: from the provider's list of each sale's
        charges since the last pass and, ``with_payments_table``, those recorded in Postgres."""
        candidates: dict[str, str | None] = {}
        if with_payments_table:
            candidates = {r["key"]: r["state"] for r in await recorded_orphans(self.pool, sales)}
        if self.provider is None:
            if candidates:
                report.unresolved.append(
                    f"{counted(len(candidates), 'payment')} to check: no provider"
                )
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
            await isolated(report, f"{key}: refund the capture with no confirmed order",
                           partial(self._refund, key, state, listed.get(key), report))  # fmt: skip

    async def _refund(self, key: str, state: str | None, listed: Charge | None,
                      report: PassReport) -> None:  # fmt: skip
        assert self.provider is not None
        charge: Charge | None
        try:
            charge = listed or await self.provider.lookup(key)
        except PaymentError as exc:
            report.unresolved.append(f"{key}: provider lookup failed ({exc})")
            return
        if charge is None or charge.status != "captured":
            # Declined, already refunded, or never made: record what it is, nothing to refund.
            payment = payment_row(key, charge)
            async with self.pool.acquire() as conn:
                await self.store.settle_payments(conn, [payment])
            report.repairs.append(Repair(
                key.partition("~")[0], None, "record_payment", key,
                {"payment": "CAPTURED or UNKNOWN"}, {"payment": payment[2]},
            ))  # fmt: skip
            return
        refund = await refund_capture(self.provider, key)
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

    async def flag_uncaptured(self, sales: Sequence[str], report: PassReport) -> None:
        """Confirmed orders with no recorded capture: flagged once each."""
        for row in await self.pool.fetch(_UNCAPTURED, list(sales)):
            report.flags.append(Repair(
                row["sale_id"], row["sku"], "flag_uncaptured", row["id"],
                {"order": "CONFIRMED", "payment": row["payment"]}, {},
            ))  # fmt: skip
