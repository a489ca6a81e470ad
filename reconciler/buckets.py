"""SKU drift in a SKU split into stock buckets (see :mod:`allocator.stock_buckets`).

Each bucket is checked as a SKU of its own (lost, an interrupted rebuild, corrupt counters,
conservation); the SKU as a whole is checked on the sum:

* **stock not granted**: bucket 0's record of the SKU's total is below Postgres's (an
  add-stock whose Redis step never ran): the difference is added to bucket 0
  (``lua/grow.lua``);
* **a transfer left half-done** (the lender's journal still holds it after
  ``TRANSFER_GRACE_S``): credited to the receiver by the same id, then closed;
* **sold behind or ahead**, per bucket, against the confirmed orders of that bucket (an
  order's bucket is in its reservation id).

**A lost bucket** is rebuilt from the orders of that bucket, like a SKU. Its total is not in
Postgres (transfers move units between buckets without it): it is what the SKU was given less
what the other buckets and the transfers in flight account for, read as one consistent cut
(:meth:`~allocator.stock_buckets.BucketScripts.snapshot`) while the lost buckets are closed.
Transfers into a lost bucket are counted as in flight and credited once it is back. Several
lost buckets: each gets what its holds commit, the last one also every free unit; dry buckets
borrow from it. Before the cut is read, each lost bucket gets a new incarnation, written to
every other bucket, so that a credit of a transfer it lent before the loss, landing late, is
refused rather than counted a second time (:meth:`BucketChecks._fence`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.typing import EncodableT

from allocator.repair_scripts import RepairScripts
from allocator.sale_scripts import STOCK_FIELDS
from allocator.stock_buckets import BucketScripts, parse_journal
from flashsale.clients import RedisClient
from flashsale.keys import SkuKeys, bucket_keys
from flashsale.sales import fetch_sku
from reconciler.rebuild import rebuild_sku
from reconciler.report import PassReport, Repair

TRANSFER_GRACE_S = 5.0  # a transfer is finished by its own allocator within a few round trips
KEEP_OUTCOMES = ("stock_not_granted", "total_ahead", "transfer_unfinished")

# By bucket, and in the same statement the SKU's sold counter (see reconciler.sold_counter):
# a row with no bucket when the SKU has no order.
_SOLD_BY_BUCKET = """
SELECT k.sold AS counter, o.bucket, coalesce(o.sold, 0) AS sold, coalesce(o.open, 0) AS open
FROM sale_skus k LEFT JOIN (
  SELECT order_bucket(id) AS bucket,
         coalesce(sum(quantity) FILTER (WHERE state = 'CONFIRMED'), 0) AS sold,
         count(*) FILTER (WHERE state IN ('PENDING', 'PAYING')) AS open
  FROM orders WHERE sale_id = $1 AND sku = $2 GROUP BY 1) o ON true
WHERE k.sale_id = $1 AND k.sku = $2
"""


@dataclass(frozen=True, slots=True)
class SkuDrift:
    """A SKU (or one stock bucket of it) whose Redis state needs a repair, and why."""

    keys: SkuKeys
    reason: str
    redis: dict[str, Any]
    postgres: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BucketRead:
    """One bucket (or a SKU in one bucket) as the pass read it."""

    keys: SkuKeys
    counts: dict[str, int | None]
    status: str | None
    rebuilding: bool
    granted: int  # bucket 0 of a bucketed SKU: the SKU's total as Redis was given it; else -1
    journal: Any  # HGETALL of the bucket's transfers (a dict or a flat list)


def bucket_reason(b: BucketRead) -> str | None:
    """Why one bucket (or a SKU in one bucket) cannot be trusted as it stands, or None."""
    r = b.counts
    if b.status is None or r["total"] is None:
        return "lost"
    if b.rebuilding:
        return "rebuild_interrupted"
    values = [r[n] for n in ("available", "active", "paying", "sold")]
    if any(v is None or v < 0 for v in values):
        return "counters_corrupt"
    if r["total"] != sum(v or 0 for v in values):
        return "conservation"
    return None


class BucketChecks:
    """Drift and repairs of bucketed SKUs over one Postgres pool and one Redis client."""

    def __init__(self, pool: asyncpg.Pool, client: RedisClient) -> None:
        self.pool = pool
        self.client = client
        self.transfers = BucketScripts(client)

    async def find(self, row: asyncpg.Record, read: Sequence[BucketRead]) -> list[SkuDrift]:
        """What the SKU as a whole needs, its buckets being sound one by one. Writes nothing."""
        pg = {"stock_total": row["stock_total"], "sold": row["sold"]}
        first = read[0]
        found = []
        if 0 <= first.granted < row["stock_total"]:
            found.append(SkuDrift(first.keys, "stock_not_granted", {"granted": first.granted}, pg))
        elif first.granted > row["stock_total"]:
            found.append(SkuDrift(first.keys, "total_ahead", {"granted": first.granted}, pg))
        stale_ms = (time.time() - TRANSFER_GRACE_S) * 1000
        for b in read:
            lent = parse_journal(b.journal).items()
            stale = [tid for tid, loan in lent if loan.at_ms < stale_ms]
            if stale:
                found.append(SkuDrift(b.keys, "transfer_unfinished", {"transfers": stale}, pg))
        if sum(b.counts["sold"] or 0 for b in read) != row["sold"]:
            found += await self._sold(read, pg)
        return found

    async def _sold(self, read: Sequence[BucketRead], pg: dict[str, Any]) -> list[SkuDrift]:
        """Buckets whose sold count disagrees with their confirmed orders, and the SKU's
        sold counter when it does. Postgres is read after Redis (see
        reconciler.skus.SkuChecks._drift)."""
        keys = read[0].keys
        rows = await self.pool.fetch(_SOLD_BY_BUCKET, keys.sale_id, keys.sku)
        by_bucket = {r["bucket"]: r for r in rows if r["bucket"] is not None}
        confirmed = sum(r["sold"] for r in by_bucket.values())
        found = []
        if rows and rows[0]["counter"] != confirmed:
            found.append(SkuDrift(keys, "sold_counter", {"sold": sum(b.counts["sold"] or 0
                                                                     for b in read)},
                                  {**pg, "confirmed": confirmed}))  # fmt: skip
        for b in read:
            row = by_bucket.get(b.keys.bucket)
            sold, open_ = (row["sold"], row["open"]) if row else (0, 0)
            here = b.counts["sold"] or 0
            if here < sold:
                found.append(
                    SkuDrift(b.keys, "sold_behind", dict(b.counts), {**pg, "bucket": sold})
                )
            elif (
                here > sold and not open_ and not b.counts["paying"]
                and not await self.client.xlen(b.keys.outbox)
            ):  # fmt: skip
                found.append(SkuDrift(b.keys, "sold_ahead", dict(b.counts), {**pg, "bucket": sold}))
        return found

    # -- repairs --------------------------------------------------------------------------

    async def repair(self, drifts: Sequence[SkuDrift], report: PassReport) -> None:
        """Repair one SKU's buckets: grant stock, finish transfers, rebuild buckets."""
        keys = drifts[0].keys
        sale_id, sku = keys.sale_id, keys.sku
        row = await fetch_sku(self.pool, sale_id, sku)
        if row is None:
            raise LookupError(f"no SKU {sku} in sale {sale_id}")
        every = bucket_keys(sale_id, sku, row["buckets"])
        for drift in drifts:
            if drift.reason == "stock_not_granted":
                outcome, granted = await self.transfers.grow(every, row["stock_total"])
                after = {"granted": granted, "outcome": outcome}
                report.repairs.append(
                    Repair(sale_id, sku, "grant_stock", "bucket 0", drift.redis, after)
                )
            elif drift.reason == "total_ahead":
                report.unresolved.append(
                    f"{sale_id}/{sku}: Redis was given {drift.redis['granted']} units, Postgres "
                    f"has {row['stock_total']}: a person must decide which is right"
                )  # fmt: skip
        if any(d.reason == "transfer_unfinished" for d in drifts):
            states = await self.transfers.states(every)
            stale_ms = int((time.time() - TRANSFER_GRACE_S) * 1000)
            for tid, to, units, outcome in await self.transfers.finish(states, before_ms=stale_ms):
                report.repairs.append(Repair(sale_id, sku, "finish_transfer", tid,
                                             {"to_bucket": to, "units": units},
                                             {"credit": outcome}))  # fmt: skip
        rebuilds = [d for d in drifts if d.reason not in KEEP_OUTCOMES]
        if rebuilds:
            await self._rebuild(row, every, rebuilds, report)

    async def _rebuild(self, row: asyncpg.Record, every: list[SkuKeys],
                       drifts: Sequence[SkuDrift], report: PassReport) -> None:  # fmt: skip
        lost = sorted((d for d in drifts if d.redis.get("total") is None),
                      key=lambda d: d.keys.bucket)  # fmt: skip
        kept = [d for d in drifts if d.redis.get("total") is not None]
        repair = RepairScripts(self.client)
        for drift in lost:
            await repair.begin(drift.keys)
        if lost:
            # Closed, the lost buckets neither lend nor receive: the cut is theirs to share.
            incarnations = await self._fence(every, [d.keys for d in lost])
            snap = await self.transfers.snapshot(every)
            zero = snap.buckets[0]
            granted = row["stock_total"]
            if zero.counts is not None and zero.granted is not None:
                granted = zero.granted
            free, assigned = granted - snap.units, 0
            for index, drift in enumerate(lost):
                last = index == len(lost) - 1
                if last and free - assigned < 0:
                    raise RuntimeError(
                        f"{drift.keys.sale_id}/{drift.keys.sku}: the other buckets account for "
                        f"{snap.units} of {granted} units and the lost ones already hold "
                        f"{assigned}: no total is left for bucket {drift.keys.bucket}"
                    )  # fmt: skip
                total: int | str = free - assigned if last else "+0"
                meta = {"incarnation": incarnations[drift.keys.bucket]}
                if drift.keys.bucket == 0:
                    meta["stock_total"] = str(granted)
                done = await rebuild_sku(self.pool, self.client, drift.keys, total=total,
                                         meta=meta, begun=True)  # fmt: skip
                assigned += done.after.total
                self._record(report, drift, done, {"free_units": free})
        for drift in kept:
            ahead = drift.reason == "sold_ahead"
            done = await rebuild_sku(
                self.pool, self.client, drift.keys, total="", release_unordered_sold=ahead
            )
            self._record(report, drift, done, {})

    async def _fence(self, every: Sequence[SkuKeys], lost: Sequence[SkuKeys]) -> dict[int, str]:
        """New incarnations of the ``lost`` buckets (closed), written to every other bucket
        before the rebuild counts: from then on each refuses a credit lent by a lost
        incarnation (``lua/credit.lua``), whose units the rebuild counts back as the
        lender's. A lost bucket, having lost what it knew, is told the others' as well. What
        is left of a lost bucket's journal goes: the rebuild counts its units back as well.
        Returns {bucket: its new incarnation}."""
        new = {keys.bucket: secrets.token_hex(8) for keys in lost}
        kept = {s.keys.bucket: s.incarnation for s in await self.transfers.states(every)
                if s.incarnation and s.keys.bucket not in new}  # fmt: skip
        current = kept | new
        for keys in lost:
            await self.client.delete(keys.transfers)
        for keys in every:
            told = current if keys.bucket in new else new
            fields: dict[EncodableT, EncodableT] = {
                f"lender:{b}": i for b, i in told.items() if b != keys.bucket
            }
            if fields:
                await self.client.hset(keys.meta, mapping=fields)
        return new

    @staticmethod
    def _record(report: PassReport, drift: SkuDrift, done: Any, extra: dict[str, Any]) -> None:
        report.repairs.append(Repair(
            drift.keys.sale_id, drift.keys.sku, "rebuild_sku", f"bucket {drift.keys.bucket}",
            {"reason": drift.reason, "redis": drift.redis, "postgres": drift.postgres, **extra},
            {"redis": {n: getattr(done.after, n) for n in STOCK_FIELDS},
             "holds_written": done.written, "holds_released": done.released},
        ))  # fmt: skip
