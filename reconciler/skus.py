"""SKU drift: where a SKU's Redis counters, configuration or sale status disagree with
Postgres, and the repairs (a rebuild from Postgres, a status written again, a lost sale hash
put back).

Detection is one pipelined read of every SKU in scope (:func:`sku_reads`) and one query; a
SKU needs a rebuild when Redis lost it, a rebuild was interrupted, its counters are corrupt or
break conservation, its total differs from Postgres, its sold count is behind the confirmed
orders, or ahead of them once nothing of the SKU is in flight. Where Postgres's own sold
counter is the one apart from the orders, that counter is counted again instead
(:mod:`reconciler.sold_counter`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import asyncpg

from allocator.redis_calls import read_packed
from allocator.repair_scripts import RepairScripts
from allocator.sale_reads import in_parts
from allocator.sale_scripts import STOCK_FIELDS, SaleScripts, StockCounts
from allocator.settled import ended_for_redis
from flashsale.clients import RedisClient
from flashsale.keys import SaleKeys, SkuKeys, bucket_keys
from flashsale.outages import describe, is_outage
from flashsale.records import integer, text
from flashsale.sales import (
    HOLDS_END,
    SALE_END,
    fetch_in_play,
    fetch_skus,
    preloaded,
    sale_hash,
)
from reconciler.buckets import BucketChecks, BucketRead, SkuDrift, bucket_reason
from reconciler.rebuild import SALE_HELD, SkuRebuild, rebuild_lost, rebuild_sku
from reconciler.report import PassReport, Repair, isolated, log, several_at_a_time
from reconciler.sold_counter import recount_sold

REBUILDS_AT_ONCE = 8
LOST_AT_ONCE = 500  # lost SKUs of a sale rebuilt together

# Sales in scope: preloaded, not archived (reconciler/archive.py), their Redis state not
# deleted on purpose (``redis_cleared_at``: an archive, or a benchmark's discarded sale an
# engine made orders of, which a pass found lost and wrote back), even when named; and not
# ended more than 15 minutes before their longest hold could have lived (an ended sale ends
# when it was ended), or named explicitly.
_IN_SCOPE = f"""
WHERE s.archived_at IS NULL AND s.redis_cleared_at IS NULL
  AND CASE WHEN $1::text[] IS NULL THEN {HOLDS_END} + interval '15 minutes' > now()
      ELSE s.id = ANY($1::text[]) END
"""
_SKUS = f"""
SELECT k.sale_id, k.sku, k.stock_total, k.sold, k.buckets, s.status,
       s.ends_at < now() - interval '1 minute' AS past_end
FROM sales s
CROSS JOIN LATERAL (SELECT * FROM sale_skus k WHERE k.sale_id = s.id
                    AND k.preloaded_at IS NOT NULL OFFSET 0) k
{_IN_SCOPE}
  AND ($1::text[] IS NOT NULL OR
       {SALE_END} + make_interval(secs => k.hold_ttl_seconds) + interval '15 minutes' > now())
"""  # noqa: S608 - only constants of this code go in
SCOPE = f"{_SKUS} ORDER BY k.sale_id, k.sku"
# The SKUs in scope of some of the sales in scope ($2): a turn of the service's passes.
SCOPE_OF = f"{_SKUS} AND s.id = ANY($2::text[]) ORDER BY k.sale_id, k.sku"
# The sales in scope and how many SKUs each has, preloaded or not (an index-only count: the
# service paces its passes by it, sale by sale, and asks before each).
SCOPE_SIZES = f"""
SELECT s.id AS sale_id, (SELECT count(*) FROM sale_skus k WHERE k.sale_id = s.id) AS skus
FROM sales s
{_IN_SCOPE}
"""  # noqa: S608 - only constants of this code go in
_VERSIONS = "SELECT id, skus_version FROM sales WHERE id = ANY($1::text[])"
# Read after the Redis counters, in one statement: the sold counter now, the units of the
# confirmed orders (the two agree unless the counter was changed by hand) and the open orders.
_SOLD_AND_OPEN = """
SELECT k.sold, (SELECT coalesce(sum(quantity), 0) FROM orders o WHERE o.sale_id = $1
                AND o.sku = $2 AND o.state = 'CONFIRMED') AS confirmed,
       (SELECT count(*) FROM orders o WHERE o.sale_id = $1 AND o.sku = $2
        AND o.state IN ('PENDING', 'PAYING')) AS open
FROM sale_skus k WHERE k.sale_id = $1 AND k.sku = $2
"""


def every_bucket(rows: Sequence[asyncpg.Record]) -> list[SkuKeys]:
    """The keys of every stock bucket of the SKU rows (one per SKU in one bucket)."""
    return [k for r in rows for k in bucket_keys(r["sale_id"], r["sku"], r["buckets"])]


def sku_reads(
    rows: Sequence[asyncpg.Record], keys: Sequence[list[SkuKeys]] | None = None
) -> list[tuple[str | int, ...]]:
    """The pass's read of each SKU in scope, for each of its stock buckets (``keys``, by
    row, when already made): its counters, then its status, rebuild flag and (bucket 0 of a
    bucketed SKU) the total Redis was given, and for a bucketed SKU its journal of transfers
    (:mod:`reconciler.buckets`)."""
    commands: list[tuple[str | int, ...]] = []
    for row, buckets in zip(rows, keys or [_buckets(r) for r in rows], strict=True):
        for bucket in buckets:
            commands.append(("HMGET", bucket.stock, *STOCK_FIELDS))
            commands.append(("HMGET", bucket.meta, "status", "rebuilding", "stock_total"))
            if row["buckets"] > 1:
                commands.append(("HGETALL", bucket.transfers))
    return commands


def _buckets(row: asyncpg.Record) -> list[SkuKeys]:
    return bucket_keys(row["sale_id"], row["sku"], row["buckets"])


def _settled(row: asyncpg.Record, read: Sequence[BucketRead]) -> bool:
    """A SKU in one bucket of a sale ended for Redis too (``ended_for_redis``), sound,
    untouched: nothing held, paid or sold, its total Postgres's."""
    if row["buckets"] != 1 or read[0].rebuilding:
        return False
    ended = ended_for_redis(row)
    over = ended or (ended is None and read[0].status == "ended")
    c = read[0].counts
    return bool(over) and row["sold"] == 0 and c["active"] == c["paying"] == c["sold"] == 0 \
        and c["total"] == c["available"] == row["stock_total"]  # fmt: skip


class SkuChecks:
    """SKU drift over one Postgres pool and one Redis client."""

    def __init__(self, pool: asyncpg.Pool, client: RedisClient) -> None:
        self.pool = pool
        self.client = client
        self.scripts = SaleScripts(client)
        self.repair = RepairScripts(client)
        self.buckets = BucketChecks(pool, client)
        self._counts: dict[tuple[str, str], int] = {}  # stock buckets of the SKUs in scope
        self._settled: set[tuple[str, str]] = set()  # see unsettled()
        self.all_settled: set[str] = set()  # sales whose every SKU is settled (see sizes())

    async def scope(
        self, sales: Sequence[str] | None = None, only: Sequence[str] | None = None
    ) -> list[asyncpg.Record]:
        """The SKU rows in scope (see ``SCOPE``), or those of ``sales``; ``only``: of those
        sales only (a turn of the service's passes). Without ``only``, the SKUs of sales that
        left the scope are forgotten as settled."""
        named = list(sales) if sales is not None else None
        if only is not None:
            read = [sale for sale in only if sale not in self.all_settled]
            return await fetch_in_play(self.pool, SCOPE_OF, named, read) if read else []
        rows = await fetch_in_play(self.pool, SCOPE, named)
        self.keep({r["sale_id"] for r in rows})
        return rows

    async def sizes(self, sales: Sequence[str] | None = None) -> dict[str, int]:
        """The sales in scope (or ``sales``) and the SKUs of each a pass would read: its SKUs
        but those known settled. A sale whose every SKU is known settled goes in
        ``all_settled``: a turn of the service's passes (``scope(only=...)``) fetches none of
        its rows (an ended 100,000-SKU sale's took about 0.17 s every turn, 15 minutes
        long), and its other checks still run."""
        rows = await fetch_in_play(
            self.pool, SCOPE_SIZES, list(sales) if sales is not None else None
        )
        settled = Counter(sale for sale, _ in self._settled)
        self.all_settled = {r["sale_id"] for r in rows if r["skus"] == settled[r["sale_id"]] > 0}
        return {r["sale_id"]: max(1, r["skus"] - settled[r["sale_id"]]) for r in rows}

    def keep(self, sales: Collection[str]) -> None:
        """Forget what is known settled of the sales not in ``sales`` (they left the scope)."""
        self._settled = {k for k in self._settled if k[0] in sales}
        self.all_settled &= set(sales)

    def unsettled(self, rows: Sequence[asyncpg.Record]) -> list[asyncpg.Record]:
        """``rows`` but the SKUs :meth:`find` saw settled: an ended sale's SKU in one bucket
        that nobody held or bought, sound and in line with Postgres. Nothing changes such a
        SKU any more (no reservation is granted after the end, by Redis's clock), so the
        passes of this process read it no more: a 100,000-SKU catalogue sale stays in scope
        for 15 minutes after its end, and was read whole every pass. Drift that needs no
        reservation (Redis losing it) goes unrepaired then; it changes no buyer's answer."""
        return [r for r in rows if (r["sale_id"], r["sku"]) not in self._settled]

    async def find(self, rows: Sequence[asyncpg.Record]) -> tuple[list[SkuDrift], list[Repair]]:
        """The SKUs whose Redis state needs a rebuild, and the status writes due on the
        others. Writes nothing."""
        every = [_buckets(r) for r in rows]
        replies = iter(await read_packed(self.client, sku_reads(rows, every)))
        drift: list[SkuDrift] = []
        statuses: list[Repair] = []
        for row, buckets in zip(rows, every, strict=True):
            self._counts[(row["sale_id"], row["sku"])] = row["buckets"]
            pg = {"stock_total": row["stock_total"], "sold": row["sold"]}
            read = []
            for keys in buckets:
                counts, (status, rebuilding, granted) = next(replies), next(replies)
                journal = next(replies) if row["buckets"] > 1 else {}
                read.append(BucketRead(keys, {
                    n: (None if v is None else int(v))
                    for n, v in zip(STOCK_FIELDS, counts, strict=True)
                }, None if status is None else text(status), rebuilding is not None,
                   integer(granted, -1), journal))  # fmt: skip
            found = [SkuDrift(b.keys, reason, {**b.counts, "status": b.status}, pg)
                     for b in read if (reason := bucket_reason(b)) is not None]  # fmt: skip
            if not found and row["buckets"] == 1:
                found = await self._drift(read[0].keys, read[0].counts, pg)
            elif not found:
                found = await self.buckets.find(row, read)
            drift += found
            if not found and any(b.status != row["status"] for b in read):
                statuses.append(Repair(
                    row["sale_id"], row["sku"], "status", None, {"status": read[0].status},
                    {"status": row["status"]},
                ))  # fmt: skip
            elif not found and _settled(row, read):
                self._settled.add((row["sale_id"], row["sku"]))
        return drift, statuses

    async def _drift(self, keys: SkuKeys, r: dict[str, Any],
                     pg: dict[str, Any]) -> list[SkuDrift]:  # fmt: skip
        """Why a SKU in one bucket, sound as a bucket, disagrees with Postgres: its total, or
        its sold count against the confirmed orders (its counter in Postgres too, when that
        is the one apart: :mod:`reconciler.sold_counter`)."""
        if r["total"] != pg["stock_total"]:
            return [SkuDrift(keys, "total_differs", r, pg)]
        if r["sold"] == pg["sold"]:
            return []
        # What is in flight, then Postgres, read after Redis: a hold SOLD when Redis was read
        # has had its order since before then, and that order is open or confirmed now.
        moving = bool(r["paying"] or await self.client.xlen(keys.outbox))
        now = await self.pool.fetchrow(_SOLD_AND_OPEN, keys.sale_id, keys.sku)
        if now is None:
            return []
        confirmed = int(now["confirmed"])
        found = []
        if now["sold"] != confirmed:
            found.append(SkuDrift(keys, "sold_counter", r, {**pg, "confirmed": confirmed}))
        if r["sold"] < confirmed:
            found.append(SkuDrift(keys, "sold_behind", r, pg))
        elif r["sold"] > confirmed and not (moving or now["open"]):  # nothing in flight
            found.append(SkuDrift(keys, "sold_ahead", r, pg))
        return found

    # -- repairs --------------------------------------------------------------------------

    async def restore_sales(self, sales: Sequence[str], report: PassReport) -> None:
        """Sale configuration hashes Redis lost: written again from Postgres. And the list
        of SKUs of those it holds, when written from another version of the sale's set of
        SKUs than Postgres's (``sales.skus_version``): written again (``_relist``)."""
        if not sales:
            return
        replies = await read_packed(
            self.client, [("HMGET", SaleKeys(sale).sale, "id", "skus_version") for sale in sales]
        )
        versions = {r["id"]: str(r["skus_version"])
                    for r in await self.pool.fetch(_VERSIONS, list(sales))}  # fmt: skip
        for sale, (present, version) in zip(sales, replies, strict=True):
            if present is None:
                await isolated(report, f"{sale}: restore the sale hash",
                               partial(self._restore_sale, sale, report))  # fmt: skip
            elif sale in versions and (version is None or text(version) != versions[sale]):
                await isolated(report, f"{sale}: list its SKUs again",
                               partial(self._relist, sale, report))  # fmt: skip

    async def _restore_sale(self, sale: str, report: PassReport) -> None:
        """Under the sale's row (``SALE_HELD``): read before a pause and written after it,
        the hash came back active, and no pass compares its status again."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(SALE_HELD, sale)
            if row is None:
                return
            fields = sale_hash(row, preloaded(await fetch_skus(conn, sale)))
            await self.scripts.put_sale(SaleKeys(sale), fields, open_queue=False)
        report.repairs.append(Repair(sale, None, "restore_sale", None, {"present": False},
                                     {"status": fields["status"]}))  # fmt: skip

    async def _relist(self, sale: str, report: PassReport) -> None:
        """The sale's list of SKUs as Postgres has them (its preloaded SKUs), under its row.
        A list that only lacks the version (SKUs imported since, not preloaded yet, and not
        listed) takes the version without a repair recorded."""
        key = SaleKeys(sale).sale
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(SALE_HELD, sale)
            if row is None:
                return
            skus = ",".join(s["sku"] for s in preloaded(await fetch_skus(conn, sale)))
            was = text(await self.client.hget(key, "skus") or "")
            version = str(row["skus_version"])
            await self.scripts.set_fields(key, {"skus": skus, "skus_version": version})
        if was != skus:
            before, after = set(filter(None, was.split(","))), set(filter(None, skus.split(",")))
            report.repairs.append(Repair(sale, None, "relist_skus", None, {
                "listed": len(before), "not_in_postgres": sorted(before - after)[:20]}, {
                "listed": len(after), "added": sorted(after - before)[:20]}))  # fmt: skip

    async def rebuild_each(self, drifts: Sequence[SkuDrift], report: PassReport) -> None:
        """Rebuild each SKU of ``drifts``; one that cannot be rebuilt stays closed (it answers
        ``unavailable``) and is reported, and the next pass takes it up again first. The
        stock buckets of one SKU are repaired together (:mod:`reconciler.buckets`)."""
        for drift in (d for d in drifts if d.reason == "sold_counter"):  # Postgres's own
            named = f"{drift.keys.sale_id}/{drift.keys.sku}: recount its sold counter"
            await isolated(report, named, partial(self._recount, drift.keys, report))
        bucketed: dict[tuple[str, str], list[SkuDrift]] = {}
        single: list[SkuDrift] = []
        lost: dict[str, list[SkuDrift]] = {}  # by sale
        order: dict[tuple[str, str | None], int] = {}
        for drift in (d for d in drifts if d.reason != "sold_counter"):
            count = self._counts.get((drift.keys.sale_id, drift.keys.sku), 1)
            if count > 1:
                bucketed.setdefault((drift.keys.sale_id, drift.keys.sku), []).append(drift)
                continue
            order[(drift.keys.sale_id, drift.keys.sku)] = len(order)
            if drift.reason == "lost":
                lost.setdefault(drift.keys.sale_id, []).append(drift)
            else:
                single.append(drift)
        first = len(report.repairs)
        try:
            # SKUs Redis lost, LOST_AT_ONCE of a sale together (100,000 of a catalogue sale:
            # 19 s here, 3 min 15 s one by one); those that need more, and every other
            # drift, one by one, several at a time, their round trips overlapping. Reported
            # in scope order.
            for sale_drifts in lost.values():
                for start in range(0, len(sale_drifts), LOST_AT_ONCE):
                    single += await self._rebuild_lost(
                        sale_drifts[start : start + LOST_AT_ONCE], report
                    )
            jobs: list[Callable[[], Awaitable[None]]] = [
                partial(isolated, report,
                        f"{drift.keys.sale_id}/{drift.keys.sku}: rebuild ({drift.reason})",
                        partial(self.rebuild, drift, report))
                for drift in single
            ]  # fmt: skip
            await several_at_a_time(jobs, REBUILDS_AT_ONCE)
        finally:
            report.repairs[first:] = sorted(
                report.repairs[first:], key=lambda r: order.get((r.sale_id, r.sku), len(order))
            )
        for (sale_id, sku), group in bucketed.items():
            reasons = ", ".join(f"bucket {d.keys.bucket} {d.reason}" for d in group)
            await isolated(report, f"{sale_id}/{sku}: repair ({reasons})",
                           partial(self.buckets.repair, group, report))  # fmt: skip

    async def _rebuild_lost(self, drifts: Sequence[SkuDrift], report: PassReport
                            ) -> list[SkuDrift]:  # fmt: skip
        """Rebuild lost SKUs of one sale together (:func:`reconciler.rebuild.rebuild_lost`);
        the drifts left to rebuild one by one (all of them if this failed: reported then)."""
        sale_id = drifts[0].keys.sale_id
        by_sku = {d.keys.sku: d for d in drifts}
        try:
            done, left = await rebuild_lost(self.pool, self.client, sale_id, list(by_sku),
                                            self.repair)  # fmt: skip
        except Exception as exc:  # each is rebuilt alone next, and reported so
            if is_outage(exc):
                raise
            log.warning(
                "reconcile: %s: %d lost SKUs could not be rebuilt together (%s); "
                "rebuilding them one by one",
                sale_id,
                len(drifts),
                describe(exc),
            )
            return list(drifts)
        for sku, rebuilt in done.items():
            self._report(by_sku[sku], rebuilt, report)
        return [by_sku[sku] for sku in left]

    async def _recount(self, keys: SkuKeys, report: PassReport) -> None:
        repair = await recount_sold(self.pool, keys.sale_id, keys.sku)
        if repair is not None:
            report.repairs.append(repair)

    async def rebuild(self, drift: SkuDrift, report: PassReport) -> None:
        """Rebuild the SKU from Postgres (:func:`reconciler.rebuild.rebuild_sku`)."""
        # Counted ahead of Postgres with nothing in flight: the SOLD holds Postgres has no
        # order for are not sold as far as the truth is concerned.
        done = await rebuild_sku(self.pool, self.client, drift.keys, repair=self.repair,
                                 release_unordered_sold=drift.reason == "sold_ahead")  # fmt: skip
        self._report(drift, done, report)

    @staticmethod
    def _report(drift: SkuDrift, done: SkuRebuild, report: PassReport) -> None:
        report.repairs.append(Repair(
            drift.keys.sale_id, drift.keys.sku, "rebuild_sku", None,
            {"reason": drift.reason, "redis": drift.redis, "postgres": drift.postgres},
            {"redis": _counts(done.after), "holds_written": done.written,
             "holds_released": done.released},
        ))  # fmt: skip

    async def write_statuses(self, statuses: Sequence[Repair], report: PassReport) -> None:
        """Copy Postgres's sale status into the SKUs whose copy differs, as Postgres has it
        when it is written, holding the sale's row (``SALE_HELD``). The status the pass
        read at its start could be older than the one in Redis: a sale paused between the
        two reads had its SKUs written back active, and they sold until the next pass."""
        by_sale: dict[str, list[Repair]] = {}
        for repair in statuses:
            by_sale.setdefault(repair.sale_id, []).append(repair)
        for sale, repairs in by_sale.items():
            await isolated(report, f"{sale}: write the status of {len(repairs)} SKUs",
                           partial(self._write_status, sale, repairs, report))  # fmt: skip

    async def _write_status(self, sale: str, repairs: Sequence[Repair],
                            report: PassReport) -> None:  # fmt: skip
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(SALE_HELD, sale)
            if row is None:
                return
            status = row["status"]
            metas = [keys.meta for repair in repairs for keys in bucket_keys(
                sale, repair.sku or "", self._counts.get((sale, repair.sku or ""), 1))]  # fmt: skip
            for part in in_parts(metas):  # pipelined: the row is held meanwhile
                await self.scripts.set_fields_many([(meta, {"status": status}) for meta in part])
        report.repairs += [replace(repair, after={"status": status}) for repair in repairs
                           if repair.before["status"] != status]  # fmt: skip


def _counts(counts: StockCounts) -> dict[str, int]:
    return {n: getattr(counts, n) for n in STOCK_FIELDS}
