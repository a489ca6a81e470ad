"""Holds that no order will follow: they must not keep their units for good.

* **An ACTIVE hold past its deadline** in any sale in scope, ended or not (the sweeper may
  not have reached it): expired now, by the same script the sweeper runs.
* **A PAYING hold with no order row** once ``grace_s`` has passed since it was granted
  (5 minutes by default: longer than the workers wait out a dependency's outage): its
  ``reservation.created`` could not become an order (parked on the dead letters as bad data,
  or lost). The payment is looked up by its idempotency key; a capture is refunded, and the
  hold is released (cause ``reconciled``), Redis before Postgres: a PAYING hold that has an
  order has had it since before the holds were read, so an order read afterwards is not missed.
  A provider that cannot answer leaves the hold alone.

Only SKUs whose counters show ACTIVE or PAYING units are looked at.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

import asyncpg

from allocator.hold_scripts import HoldScripts
from allocator.redis_calls import read_packed
from flashsale.clients import RedisClient
from flashsale.errors import PaymentError
from flashsale.keys import SkuKeys
from flashsale.payments import PaymentProvider
from flashsale.records import HoldRecord, integer, text
from reconciler.captures import refund_capture
from reconciler.rebuild import RECONCILED
from reconciler.report import PassReport, Repair, isolated

_ORDERED = "SELECT id FROM orders WHERE id = ANY($1::text[])"
# A PAYING hold this long after it was granted, with no order, will never get one.
ORDERLESS_AFTER_S = 300.0


class OrphanHolds:
    """Holds no order will follow, over one Postgres pool, one Redis client and the payment
    provider (None: PAYING holds are reported unresolved)."""

    def __init__(self, pool: asyncpg.Pool, client: RedisClient,
                 provider: PaymentProvider | None, *, grace_s: float) -> None:  # fmt: skip
        self.pool = pool
        self.client = client
        self.holds = HoldScripts(client)
        self.provider = provider
        self.grace_s = grace_s

    async def _held(self, skus: Sequence[SkuKeys]) -> tuple[list[SkuKeys], list[SkuKeys]]:
        """The SKUs with ACTIVE units, and those with PAYING units."""
        counts = await read_packed(self.client, [("HMGET", k.stock, "active", "paying")
                                                 for k in skus])  # fmt: skip
        active = [k for k, (a, _) in zip(skus, counts, strict=True) if integer(a) > 0]
        paying = [k for k, (_, p) in zip(skus, counts, strict=True) if integer(p) > 0]
        return active, paying

    async def overdue(self, skus: Sequence[SkuKeys]) -> list[tuple[SkuKeys, str]]:
        """ACTIVE holds past their deadline. Writes nothing."""
        active, _ = await self._held(skus)
        now_ms = int(time.time() * 1000)
        found = []
        for keys in active:
            for rid, raw in (await self.client.hgetall(keys.holds)).items():
                hold = HoldRecord.parse(raw)
                if hold.state == "ACTIVE" and hold.deadline_ms <= now_ms:
                    found.append((keys, text(rid)))
        return found

    async def orderless(self, skus: Sequence[SkuKeys]) -> list[tuple[SkuKeys, str]]:
        """PAYING holds granted more than ``grace_s`` ago with no order row. Writes nothing."""
        _, paying = await self._held(skus)
        granted_before = int((time.time() - self.grace_s) * 1000)
        candidates: list[tuple[SkuKeys, str]] = []
        for keys in paying:
            for rid, raw in (await self.client.hgetall(keys.holds)).items():
                hold = HoldRecord.parse(raw)
                if hold.state == "PAYING" and hold.created_ms < granted_before:
                    candidates.append((keys, text(rid)))
        if not candidates:
            return []
        ordered = {r["id"] for r in await self.pool.fetch(_ORDERED, [r for _, r in candidates])}
        return [(keys, rid) for keys, rid in candidates if rid not in ordered]

    async def repair(self, skus: Sequence[SkuKeys], report: PassReport) -> None:
        active, _ = await self._held(skus)
        for keys in active:
            await isolated(report, f"{keys.sale_id}/{keys.sku}: expire overdue holds",
                           partial(self._expire, keys, report))  # fmt: skip
        for keys, rid in await self.orderless(skus):
            await isolated(report, f"{rid}: release the PAYING hold with no order",
                           partial(self._release, keys, rid, report))  # fmt: skip

    async def _expire(self, keys: SkuKeys, report: PassReport) -> None:
        expired: list[str] = []
        while True:
            result = await self.holds.expire(keys)
            expired += result.expired
            if not result.more:
                break
        if expired:
            report.repairs.append(Repair(keys.sale_id, keys.sku, "expire_overdue", None,
                                         {"active": len(expired)},
                                         {"expired": expired[:20]}))  # fmt: skip

    async def _release(self, keys: SkuKeys, rid: str, report: PassReport) -> None:
        if self.provider is None:
            report.unresolved.append(f"{rid}: PAYING with no order, no provider to ask")
            return
        try:
            charge = await self.provider.lookup(rid)
            refund = None
            if charge is not None and charge.status == "captured":
                refund = await refund_capture(self.provider, rid)
        except PaymentError as exc:
            report.unresolved.append(f"{rid}: PAYING with no order; provider failed ({exc})")
            return
        answer = await self.holds.release(keys, rid, RECONCILED)
        if not answer.ok:
            report.unresolved.append(f"{rid}: release refused ({answer.reason})")
            return
        report.repairs.append(Repair(
            keys.sale_id, keys.sku, "release_orderless", rid,
            {"hold": "PAYING", "order": None, "payment": charge.status if charge else None},
            {"hold": "RELEASED", "refund": refund.provider_ref if refund else None},
        ))  # fmt: skip
