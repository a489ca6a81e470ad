"""What a sale looks like: the sale and its SKUs, the sale list, its orders, its stock.

The read side of :class:`allocator.sale_admin.SaleAdmin`, and all the gateway's catalogue needs:
Postgres for the sale, its SKUs and orders; Redis (through the sale scripts) for live stock,
summed over a SKU's stock buckets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from allocator.queue_scripts import QueueScripts
from allocator.sale_scripts import SaleScripts, StockCounts, summed
from allocator.stock_buckets import BucketScripts
from flashsale.clients import COPY_TIMEOUT_S, RedisClient
from flashsale.errors import InvalidInput, NotFound, shown
from flashsale.keys import ID_PATTERN, SaleKeys, bucket_keys
from flashsale.outages import describe
from flashsale.sales import (
    SALE_STATE,
    archive_due,
    fetch_sku,
    fetch_skus,
    sale_json,
    unknown_sale,
    unknown_sku,
)
from flashsale.salespec import integer, text
from flashsale.settings import ARCHIVE_AFTER_S
from flashsale.timefmt import iso

MAX_PAGE = 1000
MAX_ORDER_ID = 300  # sale id ~ SKU ~ reservation id
T = TypeVar("T")
# SKUs an operation over a whole sale (status, preload, pause) reads or writes at a time, the
# event loop free for other requests between parts (a round trip each): a sale may have
# 200,000, and its admin calls share the gateway processes with its buyers.
SKUS_PER_PART = 5_000

SALE = "SELECT * FROM sales WHERE id = $1"
SALE_LOCKED = "SELECT * FROM sales WHERE id = $1 FOR UPDATE"
# The sale's confirmed units by when they were confirmed (an order's last change), summed in
# at most $2 steps of equal length between the first confirmation and the last: each step's
# last confirmation time and its units.
SOLD_OVER_TIME = """
WITH confirmed AS (
    SELECT extract(epoch FROM updated_at)::float8 AS at, quantity FROM orders
    WHERE sale_id = $1 AND state = 'CONFIRMED'
), span AS (
    SELECT min(at) AS first, greatest((max(at) - min(at)) / $2, 1e-3) AS step FROM confirmed
)
SELECT max(c.at) AS at, sum(c.quantity)::bigint AS units
FROM confirmed c, span s GROUP BY floor((c.at - s.first) / s.step) ORDER BY 1
"""
SALE_STATUSES = ("active", "paused", "ended")
SALE_STATES = ("scheduled", "live", "paused", "ended")
# Sales, newest first, by status and by state (the status and the clock: past its end a sale
# is ended whatever its status).
LIST_SALES = (
    "SELECT * FROM sales WHERE ($1::text IS NULL OR status = $1)"  # noqa: S608 - constants
    f" AND ($4::text IS NULL OR $4 = {SALE_STATE})"
    " ORDER BY created_at DESC, id LIMIT $2 OFFSET $3"
)
ORDER_STATES = ("PENDING", "PAYING", "CONFIRMED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED")
# An order as the admin API lists and exports it: never the payment method token.
# Oldest first, by created_at (when the workers recorded the order; ties by id): a reservation
# id is a process's prefix and a counter, which tells a reader nothing of who bought first.
# A page goes on after the order ``after`` names, as before.
ORDERS_PAGE = (
    "SELECT id, sku, buyer_id, quantity, amount, currency, state, created_at, updated_at"
    " FROM orders WHERE sale_id = $1 AND ($2::text IS NULL OR state = $2)"
    " AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4::text))"
    " ORDER BY created_at, id LIMIT $5"
)
PLACED = "SELECT created_at FROM orders WHERE id = $1 AND sale_id = $2"
# The buyer id is the storefront's text (any printable ASCII): one that a spreadsheet would
# run as a formula (=, +, - or @ first) is exported behind an apostrophe, as OWASP advises
# against CSV injection. No other column can start so (ids and SKUs start alphanumeric).
# Its times as the API writes them (ISO 8601, UTC, Z), not in the server's TimeZone.
ORDERS_EXPORT = (
    "SELECT id, sku, CASE WHEN left(buyer_id, 1) IN ('=', '+', '-', '@')"
    " THEN '''' || buyer_id ELSE buyer_id END AS buyer_id,"
    " quantity, amount, currency, state,"
    """ to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS created_at,"""
    """ to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS updated_at"""
    " FROM orders WHERE sale_id = $1 AND ($2::text IS NULL OR state = $2)"
    " ORDER BY orders.created_at, id"
)


def page_size(value: Any) -> int:
    return integer(value, "limit", minimum=1, maximum=MAX_PAGE,
                   what=f"an integer from 1 to {MAX_PAGE}")  # fmt: skip


def offset_of(value: Any) -> int:
    return integer(value, "offset", minimum=0, maximum=10**9, what="an integer >= 0")


def one_of(value: str | None, allowed: Sequence[str], field: str) -> str | None:
    """A filter's value as ``allowed`` spells it, whatever its case."""
    if value is None:
        return None
    spelt = {name.casefold(): name for name in allowed}.get(value.casefold())
    if spelt is None:
        raise InvalidInput(field, f"must be one of {', '.join(allowed)}, got {shown(value)}")
    return spelt


def order_state(value: str | None) -> str | None:
    return one_of(value, ORDER_STATES, "state")


def in_parts(skus: Sequence[T]) -> Iterator[Sequence[T]]:
    """``skus`` SKUS_PER_PART at a time."""
    for start in range(0, len(skus), SKUS_PER_PART):
        yield skus[start : start + SKUS_PER_PART]


@dataclass
class SaleReads:
    """Reads of sales over one Postgres pool and one Redis client."""

    pool: asyncpg.Pool
    redis: RedisClient
    scripts: SaleScripts
    # FLASHSALE_ARCHIVE_AFTER, for when an ended sale is archived (None: never by itself)
    archive_after_s: float | None = ARCHIVE_AFTER_S

    def __post_init__(self) -> None:
        self.transfers = BucketScripts(self.redis)  # a bucketed SKU's buckets, its stock grown

    async def sale_row(self, conn: asyncpg.Connection, sale_id: str, *, lock: bool = False,
                       named: bool = True) -> asyncpg.Record:  # fmt: skip
        """The sale's row (``lock``: FOR UPDATE, for the transaction); NotFound otherwise,
        naming the sale probably meant (``named``: an operator's; never a buyer's, whom it
        would tell of other sales). A change of the sale holds it while it writes Redis
        too, so that changes reach Redis in the order Postgres took them."""
        row = None
        if isinstance(sale_id, str) and ID_PATTERN.match(sale_id):
            row = await conn.fetchrow(SALE_LOCKED if lock else SALE, sale_id)
        if row is None:
            if named:
                raise await unknown_sale(conn, sale_id)  # a name typed for the id, say
            raise NotFound(f"unknown sale {shown(sale_id)}", code="unknown_sale")
        return row

    async def row(self, sale_id: str, *, named: bool = True) -> asyncpg.Record:
        """The sale's row alone, without its SKUs. Raises NotFound (``named``: as
        :meth:`sale_row`)."""
        async with self.pool.acquire() as conn:
            return await self.sale_row(conn, sale_id, named=named)

    async def get(self, sale_id: str) -> dict[str, Any]:
        """The sale as JSON-ready data, with its SKUs. Raises NotFound."""
        async with self.pool.acquire() as conn:
            sale = await self.sale_row(conn, sale_id)
            skus = await fetch_skus(conn, sale_id)
        return sale_json(sale, skus)

    async def sold_over_time(self, sale_id: str, points: int) -> list[tuple[float, int]]:
        """(unix seconds, units confirmed by then), from the sale's start (0 units) to its last
        confirmed order, in at most ``points`` + 1 points. Raises NotFound."""
        async with self.pool.acquire() as conn:
            sale = await self.sale_row(conn, sale_id)
            rows = await conn.fetch(SOLD_OVER_TIME, sale_id, points)
        starts = sale["starts_at"]  # to the millisecond, as every answer gives its start
        curve, units = [(starts.replace(microsecond=starts.microsecond // 1000 * 1000)
                         .timestamp(), 0)], 0  # fmt: skip
        for row in rows:
            units += row["units"]
            curve.append((row["at"], units))
        return curve

    async def list_sales(self, *, status: str | None = None, state: str | None = None,
                         limit: int | str = MAX_PAGE,
                         offset: int | str = 0) -> dict[str, Any]:  # fmt: skip
        """A page of sales, newest first (``sales``), and the ``next_offset`` of the page
        after it (None on the last); ``status`` (active, paused, ended: as pause, resume and
        end set it) and ``state`` (scheduled, live, paused, ended: the status and the clock,
        as the list shows it; a sale past its end is ended whatever its status) filter."""
        status = one_of(status, SALE_STATUSES, "status")
        state = one_of(state, SALE_STATES, "state")
        size, skipped = page_size(limit), offset_of(offset)
        async with self.pool.acquire() as conn:  # one more: whether a next page has any
            rows = await conn.fetch(LIST_SALES, status, size + 1, skipped, state)
        more = len(rows) > size
        return {"sales": [sale_json(row) for row in rows[:size]],
                "next_offset": skipped + size if more else None}  # fmt: skip

    async def orders(self, sale_id: str, *, state: str | None = None, limit: int | str = MAX_PAGE,
                     after: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """A page of the sale's orders, oldest first (by ``created_at``), after the order whose
        id is ``after``; ``state`` filters."""
        state = order_state(state)
        if after:  # an order id as a text Postgres can compare: no NUL, nothing of kilobytes
            after = text(after, "after", max_len=MAX_ORDER_ID)
        async with self.pool.acquire() as conn:
            await self.sale_row(conn, sale_id)  # NotFound for an unknown sale
            placed = await conn.fetchval(PLACED, after, sale_id) if after else None
            if after and placed is None:
                raise InvalidInput("after", f"no order {shown(after)} in sale {sale_id}: give the "
                                   "id of an order of a page read before (its `next`)")  # fmt: skip
            rows = await conn.fetch(ORDERS_PAGE, sale_id, state, placed, after, page_size(limit))
        return [{**dict(r), "created_at": iso(r["created_at"]), "updated_at": iso(r["updated_at"])}
                for r in rows]  # fmt: skip

    async def export_orders(self, sale_id: str, sink: Callable[[bytes], Awaitable[Any]], *,
                            state: str | None = None) -> None:  # fmt: skip
        """Every order of the sale as CSV with a header, streamed to ``sink`` by Postgres's
        ``COPY``: no row is held in memory. When ``sink`` fails (its reader went away: a
        closed pipe, a client that hung up) the rest of the COPY is read and dropped, and
        the failure raised after it. asyncpg answers a failing sink by cancelling the COPY,
        and a cancel that arrives after the COPY ended waits for ever for its
        acknowledgement, holding the connection."""
        state = order_state(state)
        failed: list[Exception] = []

        async def guarded(chunk: bytes) -> None:
            if not failed:
                try:
                    await sink(chunk)
                except Exception as exc:  # noqa: BLE001 - raised once the COPY is done
                    failed.append(exc)

        async with self.pool.acquire() as conn:
            await self.sale_row(conn, sale_id)
            await conn.copy_from_query(ORDERS_EXPORT, sale_id, state, output=guarded,
                                       format="csv", header=True,
                                       timeout=COPY_TIMEOUT_S)  # fmt: skip
        if failed:
            raise failed[0]

    async def status(self, sale_id: str, only: str | None = None) -> dict[str, Any]:
        """Per SKU (or of the SKU ``only``): stock_total, available, held (active + paying), sold
        (Redis); confirmed and the orders by state (Postgres); the confirmed orders' revenue
        by currency, in minor units; and the waiting room (``QueueView.summary``)."""
        async with self.pool.acquire() as conn:
            sale = await self.sale_row(conn, sale_id)
            if only is None:
                skus = await fetch_skus(conn, sale_id)
            else:
                row = await fetch_sku(conn, sale_id, only)
                if row is None:
                    raise await unknown_sku(conn, sale_id, only)
                skus = [row]
            counted = await conn.fetch(
                "SELECT sku, state, currency, count(*) AS n, sum(amount) AS amount FROM orders"
                " WHERE sale_id = $1 AND ($2::text IS NULL OR sku = $2)"
                " GROUP BY sku, state, currency", sale_id, only,
            )  # fmt: skip
        orders: dict[str, dict[str, int]] = {}
        revenue: dict[str, int] = {}  # confirmed orders' amounts by currency, minor units
        for r in counted:
            by_state = orders.setdefault(r["sku"], {})
            by_state[r["state"]] = by_state.get(r["state"], 0) + int(r["n"])
            if r["state"] == "CONFIRMED":
                revenue[r["currency"]] = revenue.get(r["currency"], 0) + int(r["amount"])
        rows, cleared = [], sale["redis_cleared_at"] is not None
        async for sku, per_bucket, moving in self._counted(sale_id, skus):
            count = summed(per_bucket)
            row = {
                "sku": sku["sku"],
                "title": sku["title"],
                "stock_total": sku["stock_total"],
                "available": None if count is None else count.available + moving,
                "held": None if count is None else count.held,
                "sold": None if count is None else count.sold,
                "active": None if count is None else count.active,
                "paying": None if count is None else count.paying,
                "confirmed": sku["sold"],
                "orders": orders.get(sku["sku"], {}),
                "preloaded": count is not None,
                # preloaded once, and Redis has it no more (the reconciler rebuilds it),
                # but for a sale whose Redis state was deleted on purpose
                "lost": count is None and sku["preloaded_at"] is not None and not cleared,
                "buckets": sku["buckets"],
            }
            if sku["buckets"] > 1:
                row["in_transit"] = moving
                row["by_bucket"] = [
                    None if c is None else {"bucket": b, "total": c.total,
                                            "available": c.available, "held": c.held,
                                            "sold": c.sold}
                    for b, c in enumerate(per_bucket)
                ]  # fmt: skip
            rows.append(row)
        room = await QueueScripts(self.redis).snapshot(SaleKeys(sale_id), redis_time=True)
        return {"sale": sale_json(sale), "skus": rows, "revenue": revenue,
                "queue": room.view.summary(room.redis_ms, sale["max_queue"]),
                "archive_due_at": archive_due(sale, self.archive_after_s)}  # fmt: skip

    async def with_stock(
        self, sale_id: str
    ) -> tuple[dict[str, Any], dict[str, tuple[int, int] | None]]:
        """The sale as :meth:`get` gives it, and each SKU's (available, held) units in Redis
        (None before its preload): what the public sale summary shows. Once the sale was
        preloaded, a SKU added since is left out until its own preload: the allocators do not
        know it yet (a reservation of it is 404 ``unknown_sku``). Raises NotFound, naming no
        other sale (a buyer's)."""
        async with self.pool.acquire() as conn:
            sale = await self.sale_row(conn, sale_id, named=False)
            skus = await fetch_skus(conn, sale_id)
        if sale["preloaded_at"] is not None:
            skus = [sku for sku in skus if sku["preloaded_at"] is not None]
        stock: dict[str, tuple[int, int] | None] = {}
        async for sku, per_bucket, moving in self._counted(sale_id, skus):
            count = summed(per_bucket)
            stock[sku["sku"]] = None if count is None else (count.available + moving, count.held)
        return sale_json(sale, skus), stock

    async def _counted(self, sale_id: str, skus: Sequence[asyncpg.Record]) -> AsyncIterator[
            tuple[asyncpg.Record, list[StockCounts | None], int]]:  # fmt: skip
        """Each SKU with its counters per stock bucket and its units on their way from one
        bucket to another, read a part at a time (``in_parts``)."""
        for part in in_parts(skus):
            for sku, (counts, moving) in zip(part, await self._buckets(sale_id, part),
                                             strict=True):  # fmt: skip
                yield sku, counts, moving

    async def _buckets(self, sale_id: str, skus: Sequence[asyncpg.Record]) -> list[
            tuple[list[StockCounts | None], int]]:  # fmt: skip
        """Each SKU's counters per stock bucket, and its units in transit, in one round trip.
        A SKU in stock buckets is read with the buckets' transfer journals, as of one moment
        (:meth:`~allocator.stock_buckets.BucketScripts.snapshot`): units lent and not yet
        credited are in no bucket's counters (a SKU whose free units were all on their way
        read as sold out), and the buckets, in other slots (on a cluster, other nodes), are
        each read at their own moment: a transfer made whole between two of those reads
        would be in neither."""
        groups = [bucket_keys(sale_id, sku["sku"], sku["buckets"]) for sku in skus]
        spread = [g for g in groups if len(g) > 1]
        single = [g[0] for g in groups if len(g) == 1]
        flat = await self.scripts.stock(single) if single else []
        cuts = iter(await self.transfers.snapshots(spread) if spread else [])
        out: list[tuple[list[StockCounts | None], int]] = []
        one = 0  # where the next SKU starts in flat (re-slicing is quadratic)
        for group in groups:
            if len(group) == 1:
                out.append(([flat[one]], 0))
                one += 1
            else:
                cut = next(cuts)
                out.append(([b.counts for b in cut.buckets], cut.in_transfer))
        return out


def without_counts(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """The SKUs of a status (:meth:`SaleReads.status`'s ``skus``) Redis has no counts of, by
    why, two different things to do: ``not_preloaded`` (the sale's preload is to make, or
    one since they were added) and ``lost`` (preloaded, then lost by Redis: the reconciler
    rebuilds them from Postgres)."""
    uncounted = [row for row in rows if row["available"] is None]
    return {"not_preloaded": [row["sku"] for row in uncounted if not row.get("lost")],
            "lost": [row["sku"] for row in uncounted if row.get("lost")]}  # fmt: skip


def added_in_postgres(row: asyncpg.Record, added: int, exc: BaseException) -> dict[str, Any]:
    """The answer to units added in Postgres that Redis could not take then (an outage): they
    are added, and a second add would add them again. The reconciler copies the new total
    to Redis once it is back (a SKU whose total differs is rebuilt from Postgres)."""
    why = describe(exc).rstrip(".")
    return {"sku": row["sku"], "added": added, "stock_total": row["stock_total"],
            "redis": "pending",
            "message": f"{added} units added to {row['sku']} in Postgres (stock_total "
                       f"{row['stock_total']}), not copied to Redis yet: {why}. Buyers get "
                       "them once the reconciler has copied the new total, when Redis is back "
                       "(`flashsale reconcile --once` does it then): do not add them "
                       "again"}  # fmt: skip
