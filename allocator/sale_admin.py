"""Sale administration: create, import, preload, status, add stock, pause / resume / end.

One set of operations behind both the ``flashsale sale`` CLI and the admin HTTP API. Postgres
is written first (it is the truth); Redis is then brought in line through the sale scripts,
with operations that are idempotent, so re-running a command after a partial failure converges.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from allocator.sale_scripts import PreloadResult, SaleScripts, summed
from allocator.stock_buckets import BucketScripts
from flashsale.clients import RedisClient
from flashsale.errors import Conflict, InvalidInput, NotFound
from flashsale.keys import ID_PATTERN, SaleKeys, SkuKeys, bucket_keys
from flashsale.sales import (
    STATUS_BY_ACTION,
    fetch_skus,
    new_sale_id,
    sale_hash,
    sale_json,
    sale_state,
    sku_meta,
)
from flashsale.salespec import (
    MAX_STOCK,
    SaleSpec,
    SkuSpec,
    identifier,
    integer,
    parse_sale,
    parse_sku,
    timestamp,
)
from flashsale.shuffle import seed_commitment
from flashsale.timefmt import iso

MAX_PAGE = 1000
SALE = "SELECT * FROM sales WHERE id = $1"
SALE_LOCKED = "SELECT * FROM sales WHERE id = $1 FOR UPDATE"
SALE_STATUSES = ("active", "paused", "ended")
ORDER_STATES = ("PENDING", "PAYING", "CONFIRMED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED")
# An order as the admin API lists and exports it: never the payment method token.
ORDERS_PAGE = (
    "SELECT id, sku, buyer_id, quantity, amount, currency, state, created_at, updated_at"
    " FROM orders WHERE sale_id = $1 AND ($2::text IS NULL OR state = $2)"
    " AND ($3::text IS NULL OR id > $3) ORDER BY id LIMIT $4"
)
ORDERS_EXPORT = (
    "SELECT id, sku, buyer_id, quantity, amount, currency, state, created_at, updated_at"
    " FROM orders WHERE sale_id = $1 AND ($2::text IS NULL OR state = $2) ORDER BY id"
)


def page_size(value: Any) -> int:
    return integer(value, "limit", minimum=1, maximum=MAX_PAGE,
                   what=f"an integer from 1 to {MAX_PAGE}")  # fmt: skip


def offset_of(value: Any) -> int:
    return integer(value, "offset", minimum=0, maximum=10**9, what="an integer >= 0")


def order_state(value: str | None) -> str | None:
    if value is not None and value.upper() not in ORDER_STATES:
        raise InvalidInput("state", f"must be one of {', '.join(ORDER_STATES)}")
    return None if value is None else value.upper()


@dataclass
class SaleAdmin:
    """Merchandiser operations over one Postgres pool and one Redis client."""

    pool: asyncpg.Pool
    redis: RedisClient
    scripts: SaleScripts

    def __post_init__(self) -> None:
        self.transfers = BucketScripts(self.redis)

    @classmethod
    def build(cls, pool: asyncpg.Pool, client: RedisClient) -> SaleAdmin:
        return cls(pool, client, SaleScripts(client))

    # -- reads ---------------------------------------------------------------------------

    async def _sale_row(self, conn: asyncpg.Connection, sale_id: str, *,
                        lock: bool = False) -> asyncpg.Record:  # fmt: skip
        """The sale's row (``lock``: FOR UPDATE, for the transaction); NotFound otherwise."""
        if not isinstance(sale_id, str) or not ID_PATTERN.match(sale_id):
            raise NotFound(f"unknown sale {sale_id!r}", code="unknown_sale")
        row = await conn.fetchrow(SALE_LOCKED if lock else SALE, sale_id)
        if row is None:
            raise NotFound(f"unknown sale {sale_id!r}", code="unknown_sale")
        return row

    async def get(self, sale_id: str) -> dict[str, Any]:
        """The sale as JSON-ready data, with its SKUs. Raises NotFound."""
        async with self.pool.acquire() as conn:
            sale = await self._sale_row(conn, sale_id)
            skus = await fetch_skus(conn, sale_id)
        return sale_json(sale, skus)

    async def list_sales(self, *, status: str | None = None, limit: int | str = MAX_PAGE,
                         offset: int | str = 0) -> list[dict[str, Any]]:  # fmt: skip
        """Sales, newest first; ``status`` (active, paused, ended) filters."""
        if status is not None and status not in SALE_STATUSES:
            raise InvalidInput("status", f"must be one of {', '.join(SALE_STATUSES)}")
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM sales WHERE ($1::text IS NULL OR status = $1)"
                " ORDER BY created_at DESC, id LIMIT $2 OFFSET $3",
                status, page_size(limit), offset_of(offset),
            )  # fmt: skip
        return [sale_json(row) for row in rows]

    async def orders(self, sale_id: str, *, state: str | None = None, limit: int | str = MAX_PAGE,
                     after: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """A page of the sale's orders by id, after the order id ``after``; ``state`` filters."""
        state = order_state(state)
        async with self.pool.acquire() as conn:
            await self._sale_row(conn, sale_id)  # NotFound for an unknown sale
            rows = await conn.fetch(ORDERS_PAGE, sale_id, state, after, page_size(limit))
        return [{**dict(r), "created_at": iso(r["created_at"]), "updated_at": iso(r["updated_at"])}
                for r in rows]  # fmt: skip

    async def export_orders(self, sale_id: str, sink: Callable[[bytes], Awaitable[Any]], *,
                            state: str | None = None) -> None:  # fmt: skip
        """Every order of the sale as CSV with a header, streamed to ``sink`` by Postgres's
        ``COPY``: no row is held in memory."""
        state = order_state(state)
        async with self.pool.acquire() as conn:
            await self._sale_row(conn, sale_id)
            await conn.copy_from_query(ORDERS_EXPORT, sale_id, state, output=sink,
                                       format="csv", header=True)  # fmt: skip

    # -- create / import -----------------------------------------------------------------

    async def create(self, spec: SaleSpec, *, key: str | None = None,
                     fingerprint: str = "") -> dict[str, Any]:  # fmt: skip
        """Insert the sale and its SKUs in one transaction; returns the created sale. With an
        idempotency ``key``, a create that already ran with it returns that sale (marked
        ``"replayed": true``) when ``fingerprint`` (what was asked) matches, and is refused
        (422 ``idempotency_mismatch``) when it does not."""
        sale_id, seed = new_sale_id(), secrets.token_hex(32)
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO sales (id, name, starts_at, ends_at, admission_rate, max_queue,"
                " admission_window_seconds, admission_capacity, shuffle_seed, shuffle_commitment,"
                " join_challenge, join_challenge_max, create_key, create_fingerprint)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                " ON CONFLICT (create_key) WHERE create_key IS NOT NULL DO NOTHING RETURNING id",
                sale_id, spec.name, spec.starts_at, spec.ends_at, spec.admission_rate,
                spec.max_queue, spec.admission_window_seconds, spec.admission_capacity,
                seed, seed_commitment(seed), spec.join_challenge, spec.join_challenge_max,
                key, fingerprint if key else None,
            )  # fmt: skip
            if inserted is None:  # this key created a sale already
                earlier = await conn.fetchrow(
                    "SELECT id, create_fingerprint FROM sales WHERE create_key = $1", key
                )
                if earlier["create_fingerprint"] != fingerprint:
                    raise InvalidInput("Idempotency-Key", "this key created another sale",
                                       code="idempotency_mismatch")  # fmt: skip
                return {**await self.get(earlier["id"]), "replayed": True}
            await _insert_skus(conn, sale_id, spec.skus)
        return await self.get(sale_id)

    async def import_skus(self, sale_id: str, skus: Sequence[SkuSpec]) -> dict[str, Any]:
        """Add SKUs (already validated as a whole) to a sale; all or nothing."""
        async with self.pool.acquire() as conn, conn.transaction():
            sale = await self._sale_row(conn, sale_id)
            if sale["status"] == "ended":
                raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
            existing = {row["sku"] for row in await fetch_skus(conn, sale_id)}
            for index, spec in enumerate(skus):
                if spec.sku in existing:
                    raise InvalidInput(
                        f"row {index + 2}.sku", f"SKU {spec.sku!r} already exists in {sale_id}"
                    )
            await _insert_skus(conn, sale_id, skus)
        return await self.get(sale_id)

    # -- preload -------------------------------------------------------------------------

    async def preload(self, sale_id: str, *, force: bool = False) -> list[PreloadResult]:
        """Copy configuration and stock into Redis, atomically per SKU.

        Unchanged SKUs are left alone. A SKU with held or sold units is refused unless
        ``force``; even then held and sold units are kept. Raises Conflict when any SKU
        was refused (the others are still brought in line).
        """
        async with self.pool.acquire() as conn:
            sale = await self._sale_row(conn, sale_id)
            skus = await fetch_skus(conn, sale_id)
        if sale["status"] == "ended":
            raise Conflict(f"sale {sale_id} has ended; nothing to preload", code="sale_ended")
        if not skus:
            raise Conflict(
                f"sale {sale_id} has no SKUs; add some with `flashsale sale import`",
                code="no_skus",
            )
        results = [await self._sync_sku(sale, sku, force=force) for sku in skus]
        await self.scripts.put_sale(
            SaleKeys(sale_id), sale_hash(sale, skus), open_queue=sale["preloaded_at"] is None
        )
        loaded = [r.sku for r in results if not r.outcome.startswith("refused")]
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE sale_skus SET preloaded_at = coalesce(preloaded_at, now())"
                " WHERE sale_id = $1 AND sku = ANY($2::text[])", sale_id, loaded,
            )  # fmt: skip
        lost = [r.sku for r in results if r.outcome == "refused_lost"]
        if lost:
            raise Conflict(
                f"Redis no longer holds {', '.join(lost)} of sale {sale_id} (or is rebuilding "
                "it): run `flashsale reconcile --once` to rebuild it from Postgres",
                code="rebuild_needed",
            )  # fmt: skip
        refused = [r for r in results if r.outcome.startswith("refused")]
        if refused:
            detail = "; ".join(
                f"{r.sku}: {r.counts.held} held and {r.counts.sold} sold units"
                + (" exceed the new stock" if r.outcome == "refused_below_committed" else "")
                for r in refused
            )
            hint = "" if force else " (re-run with --force; held and sold units are kept)"
            raise Conflict(f"preload refused for {detail}{hint}", code="preload_refused")
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE sales SET preloaded_at = now(), updated_at = now() WHERE id = $1", sale_id
            )
        return results

    async def _sync_sku(
        self, sale: asyncpg.Record, sku: asyncpg.Record, *, force: bool
    ) -> PreloadResult:
        meta, total, first = sku_meta(sale, sku), sku["stock_total"], sku["preloaded_at"] is None
        if sku["buckets"] == 1:
            return await self.scripts.preload(SkuKeys(sale["id"], sku["sku"]), total=total,
                                              meta=meta, force=force, first=first)  # fmt: skip
        return await self._sync_buckets(sale["id"], sku, meta, force=force, first=first)

    async def _sync_buckets(self, sale_id: str, sku: asyncpg.Record, meta: dict[str, str], *,
                            force: bool, first: bool) -> PreloadResult:  # fmt: skip
        """A SKU split into stock buckets. The first preload spreads the stock evenly and
        records the SKU's total on bucket 0; later ones write the configuration only (the
        buckets' stock moves by transfers) and raise the total on bucket 0
        (``lua/grow.lua``), from where dry buckets borrow the new units."""
        total, count = sku["stock_total"], sku["buckets"]
        keys = bucket_keys(sale_id, sku["sku"], count)
        results = []
        for k in keys:
            share = total // count + (1 if k.bucket < total % count else 0)
            config = {**meta, "stock_total": str(total)} if first and k.bucket == 0 else meta
            results.append(
                await self.scripts.preload(
                    k, total=share if first else None, meta=config, force=force, first=first
                )
            )
        outcomes = [r.outcome for r in results]
        if not first and "refused_lost" not in outcomes:
            grown, _ = await self.transfers.grow(keys, total)
            if grown == "unavailable":
                outcomes.append("refused_lost")
            elif grown == "grown":
                outcomes.append("loaded")
        counts = summed(await self.scripts.stock(keys)) or summed([r.counts for r in results])
        assert counts is not None
        for worst in ("refused_lost", "refused_below_committed", "refused_committed", "loaded"):
            if worst in outcomes:
                return PreloadResult(sku["sku"], worst, counts)
        return PreloadResult(sku["sku"], "unchanged", counts)

    # -- status --------------------------------------------------------------------------

    async def status(self, sale_id: str) -> dict[str, Any]:
        """Per SKU: stock_total, available, held (active + paying), sold (Redis); confirmed
        and the orders by state (Postgres)."""
        async with self.pool.acquire() as conn:
            sale = await self._sale_row(conn, sale_id)
            skus = await fetch_skus(conn, sale_id)
            counted = await conn.fetch(
                "SELECT sku, state, count(*) AS n FROM orders WHERE sale_id = $1"
                " GROUP BY sku, state", sale_id,
            )  # fmt: skip
        orders: dict[str, dict[str, int]] = {}
        for r in counted:
            orders.setdefault(r["sku"], {})[r["state"]] = int(r["n"])
        groups = [bucket_keys(sale_id, sku["sku"], sku["buckets"]) for sku in skus]
        flat = await self.scripts.stock([k for group in groups for k in group])
        rows = []
        for sku, group in zip(skus, groups, strict=True):
            per_bucket, flat = flat[: len(group)], flat[len(group) :]
            count = summed(per_bucket)
            row = {
                "sku": sku["sku"],
                "title": sku["title"],
                "stock_total": sku["stock_total"],
                "available": None if count is None else count.available,
                "held": None if count is None else count.held,
                "sold": None if count is None else count.sold,
                "active": None if count is None else count.active,
                "paying": None if count is None else count.paying,
                "confirmed": sku["sold"],
                "orders": orders.get(sku["sku"], {}),
                "preloaded": count is not None,
                "buckets": sku["buckets"],
            }
            if sku["buckets"] > 1:
                row["by_bucket"] = [
                    None if c is None else {"bucket": b, "total": c.total,
                                            "available": c.available, "held": c.held,
                                            "sold": c.sold}
                    for b, c in enumerate(per_bucket)
                ]  # fmt: skip
            rows.append(row)
        return {"sale": sale_json(sale), "skus": rows}

    # -- stock and lifecycle -------------------------------------------------------------

    async def add_stock(self, sale_id: str, sku: Any, add: Any) -> dict[str, Any]:
        """Raise a SKU's stock by ``add`` units in Postgres, then in Redis if preloaded."""
        units = integer(add, "add", minimum=1, maximum=MAX_STOCK, what="a positive integer")
        return await self._move_total(sale_id, sku, units, "add")

    async def lower_stock(self, sale_id: str, sku: Any, remove: Any) -> dict[str, Any]:
        """Lower a SKU's stock by ``remove`` units, never below what is held and sold."""
        units = integer(remove, "remove", minimum=1, maximum=MAX_STOCK, what="a positive integer")
        return await self._move_total(sale_id, sku, -units, "remove")

    async def _move_total(self, sale_id: str, sku: Any, delta: int, field: str
                          ) -> dict[str, Any]:  # fmt: skip
        """Change a SKU's total by ``delta`` so that Redis never holds more than Postgres: a
        rise is copied to Redis after Postgres committed it; a fall is made in Redis (which
        refuses to go below held + sold, ``lua/preload.lua``) inside the Postgres
        transaction, so a refusal rolls Postgres back. Should a commit fail after Redis
        fell, Redis holds less than Postgres and the reconciler brings it back: units unsold
        for a moment, none oversold."""
        sku = identifier(sku, "sku")
        async with self.pool.acquire() as conn, conn.transaction():
            sale, row = await self._sku_for_update(conn, sale_id, sku)
            total = row["stock_total"] + delta
            if total > MAX_STOCK:
                raise InvalidInput(field, f"stock would exceed {MAX_STOCK}")
            if delta < 0 and row["buckets"] > 1:
                raise Conflict(f"{sku} is split into stock buckets, whose stock only grows",
                               code="bucketed_sku")  # fmt: skip
            if total < max(1, row["sold"]):
                raise InvalidInput(field, f"would leave {total} units; at least "
                                   f"max(1, sold = {row['sold']}) must stay (remove the SKU "
                                   "instead)")  # fmt: skip
            row = await conn.fetchrow(
                "UPDATE sale_skus SET stock_total = $3 WHERE sale_id = $1 AND sku = $2"
                " RETURNING *", sale_id, sku, total,
            )  # fmt: skip
            if delta < 0 and sale["preloaded_at"] is not None:
                await self._sync_total(sale, row)
        if delta > 0 and sale["preloaded_at"] is not None:
            await self._sync_total(sale, row)
        return await self.status(sale_id)

    async def _sync_total(self, sale: asyncpg.Record, row: asyncpg.Record) -> None:
        """Redis's total of the SKU set from ``row`` (absolute, idempotent, held and sold
        units kept); a refusal is a Conflict saying why."""
        sku = row["sku"]
        result = await self._sync_sku(sale, row, force=True)
        if result.outcome == "refused_below_committed":
            raise Conflict(f"{sku} has {result.counts.held} units held and {result.counts.sold} "
                           f"sold: its stock cannot go below "
                           f"{result.counts.held + result.counts.sold}",
                           code="below_committed")  # fmt: skip
        if result.outcome == "refused_lost":
            raise Conflict(f"Redis no longer holds {sku}: run `flashsale reconcile --once` to "
                           "rebuild it from Postgres", code="rebuild_needed")  # fmt: skip
        if result.outcome.startswith("refused"):
            raise Conflict(f"Redis refused the new stock of {sku}: {result.outcome}")

    async def remove_sku(self, sale_id: str, sku: Any) -> dict[str, Any]:
        """Take a SKU out of a sale, if nobody ever reserved it: no order in Postgres, no
        hold, sold unit or pending event in Redis (``lua/retire.lua``, per stock bucket).
        Postgres's row is deleted in a transaction that commits only once Redis retired the
        SKU; should that commit fail, the reconciler rebuilds the SKU from Postgres."""
        sku = identifier(sku, "sku")
        async with self.pool.acquire() as conn, conn.transaction():
            _, row = await self._sku_for_update(conn, sale_id, sku)
            if await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM orders WHERE sale_id = $1 AND sku = $2)",
                sale_id, sku,
            ):  # fmt: skip
                raise Conflict(f"{sku} has orders: it stays in the sale", code="sku_has_orders")
            await conn.execute("DELETE FROM sale_skus WHERE sale_id = $1 AND sku = $2",
                               sale_id, sku)  # fmt: skip
            for keys in bucket_keys(sale_id, sku, row["buckets"]):
                outcome = await self.scripts.retire(keys)
                if outcome.startswith("refused"):
                    raise Conflict(f"{sku} was reserved ({outcome}): it stays in the sale",
                                   code="sku_has_holds")  # fmt: skip
            left = await fetch_skus(conn, sale_id)
        await self.scripts.set_fields(SaleKeys(sale_id).sale,
                                      {"skus": ",".join(s["sku"] for s in left)})  # fmt: skip
        return await self.get(sale_id)

    async def _sku_for_update(self, conn: asyncpg.Connection, sale_id: str, sku: str
                              ) -> tuple[asyncpg.Record, asyncpg.Record]:  # fmt: skip
        """The sale (not ended) and its SKU's row, locked for the transaction."""
        sale = await self._sale_row(conn, sale_id)
        if sale["status"] == "ended":
            raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
        row = await conn.fetchrow(
            "SELECT * FROM sale_skus WHERE sale_id = $1 AND sku = $2 FOR UPDATE", sale_id, sku
        )
        if row is None:
            raise NotFound(f"unknown SKU {sku!r} in sale {sale_id}", code="unknown_sku")
        return sale, row

    async def set_status(self, sale_id: str, action: str) -> dict[str, Any]:
        """pause, resume or end a sale. Idempotent; an ended sale stays ended."""
        target = STATUS_BY_ACTION[action]
        async with self.pool.acquire() as conn, conn.transaction():
            sale = await self._sale_row(conn, sale_id, lock=True)
            if sale["status"] == "ended" and target != "ended":
                raise Conflict(f"sale {sale_id} has ended and cannot {action}", code="sale_ended")
            await conn.execute(
                "UPDATE sales SET status = $2, updated_at = now() WHERE id = $1", sale_id, target
            )
            skus = await fetch_skus(conn, sale_id)
        # Redis after Postgres; every step is idempotent, so a retry converges.
        await self.scripts.set_fields(SaleKeys(sale_id).sale, {"status": target})
        for sku in skus:
            for keys in bucket_keys(sale_id, sku["sku"], sku["buckets"]):
                await self.scripts.set_fields(keys.meta, {"status": target})
        return await self.get(sale_id)

    async def set_admission_rate(self, sale_id: str, rate: Any) -> dict[str, Any]:
        """Change how many buyers per second the pump admits, at any time before the sale
        ends: the pump reads the rate each step, and the waiting room's ETAs follow it."""
        return await self.update(sale_id, {"admission_rate": rate})

    async def update(self, sale_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change a sale's settings (the sale file's fields but ``skus``). Before the start
        anything can change; once it started only ``LIVE_EDITABLE`` can (a later end, a
        higher queue cap); an ended sale cannot. Validated as a whole, like a new sale;
        Postgres first, then the sale's Redis hashes."""
        _only(changes, EDITABLE, "unknown field")
        async with self.pool.acquire() as conn, conn.transaction():
            sale = await self._sale_row(conn, sale_id, lock=True)
            now = datetime.now(UTC)
            state = sale_state(sale["status"], sale["starts_at"], sale["ends_at"], now)
            if state == "ended":
                raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
            if state != "scheduled":
                for name in sorted(changes):
                    if name not in LIVE_EDITABLE:
                        raise Conflict(f"{name} cannot change once the sale has started (it "
                                       f"can: {', '.join(LIVE_EDITABLE)})",
                                       code="sale_started")  # fmt: skip
            current = sale_json(sale)
            merged = {**{k: current[k] for k in EDITABLE}, **changes}
            if "starts_at" in changes and "ends_at" not in changes:  # the window moves whole
                opens = timestamp(changes["starts_at"], "starts_at")
                merged["ends_at"] = (opens + (sale["ends_at"] - sale["starts_at"])).isoformat()
            spec = parse_sale(merged, now=now)
            if state != "scheduled":
                if spec.max_queue < sale["max_queue"]:
                    raise Conflict("max_queue can only rise once the sale has started",
                                   code="sale_started")  # fmt: skip
                if spec.ends_at <= now:
                    raise InvalidInput("ends_at", "must be in the future")
            elif spec.starts_at < now - timedelta(seconds=1) and "starts_at" in changes:
                raise InvalidInput("starts_at", "must not be in the past")
            row = await conn.fetchrow(
                "UPDATE sales SET name = $2, starts_at = $3, ends_at = $4, admission_rate = $5,"
                " max_queue = $6, admission_window_seconds = $7, admission_capacity = $8,"
                " join_challenge = $9, join_challenge_max = $10, updated_at = now()"
                " WHERE id = $1 RETURNING *",
                sale_id, spec.name, spec.starts_at, spec.ends_at, spec.admission_rate,
                spec.max_queue, spec.admission_window_seconds, spec.admission_capacity,
                spec.join_challenge, spec.join_challenge_max,
            )  # fmt: skip
            skus = await fetch_skus(conn, sale_id)
        # Redis after Postgres (a sale not preloaded yet has nothing there); every write is
        # idempotent, so a retry after a failure converges.
        fields = sale_hash(row, skus)
        await self.scripts.set_fields(
            SaleKeys(sale_id).sale, {k: fields[k] for k in SALE_HASH_EDITABLE}
        )
        for sku in skus:
            meta = sku_meta(row, sku)
            for keys in bucket_keys(sale_id, sku["sku"], sku["buckets"]):
                await self.scripts.set_fields(
                    keys.meta, {k: meta[k] for k in ("starts_at_ms", "ends_at_ms")}
                )
        return await self.get(sale_id)

    async def update_sku(self, sale_id: str, sku: str, changes: Mapping[str, Any]
                         ) -> dict[str, Any]:  # fmt: skip
        """Change a SKU's ``title`` (any time before the end) or ``price`` (before the start:
        a buyer never pays another price than the one shown when the sale opened)."""
        _only(changes, ("title", "price"), "unknown field (title and price can change)")
        async with self.pool.acquire() as conn, conn.transaction():
            sale = await self._sale_row(conn, sale_id, lock=True)
            row = await conn.fetchrow(
                "SELECT * FROM sale_skus WHERE sale_id = $1 AND sku = $2", sale_id, sku
            )
            if row is None:
                raise NotFound(f"unknown SKU {sku!r} in sale {sale_id}", code="unknown_sku")
            state = sale_state(sale["status"], sale["starts_at"], sale["ends_at"],
                               datetime.now(UTC))  # fmt: skip
            if state == "ended":
                raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
            if "price" in changes and state != "scheduled":
                raise Conflict("price cannot change once the sale has started",
                               code="sale_started")  # fmt: skip
            merged = {"sku": sku, "title": row["title"], "stock": row["stock_total"],
                      "price": row["price"], "currency": row["currency"], **changes}  # fmt: skip
            spec = parse_sku(merged, "")
            updated = await conn.fetchrow(
                "UPDATE sale_skus SET title = $3, price = $4 WHERE sale_id = $1 AND sku = $2"
                " RETURNING *", sale_id, sku, spec.title, spec.price,
            )  # fmt: skip
        meta = sku_meta(sale, updated)
        for keys in bucket_keys(sale_id, sku, updated["buckets"]):
            await self.scripts.set_fields(keys.meta, {"price": meta["price"]})
        return await self.get(sale_id)


def _only(changes: Mapping[str, Any], allowed: Sequence[str], unknown: str) -> None:
    """A change names at least one field, and only ``allowed`` ones (422 naming the first
    other; ``skus`` cannot change through a sale's settings)."""
    others = sorted(set(changes) - set(allowed))
    if others:
        why = "cannot be changed here" if others[0] == "skus" else unknown
        raise InvalidInput(others[0], why, code="unknown_field")
    if not changes:
        raise InvalidInput("body", "names no field to change")


EDITABLE = (
    "name", "starts_at", "ends_at", "admission_rate", "max_queue", "admission_window_seconds",
    "admission_capacity", "join_challenge", "join_challenge_max",
)  # fmt: skip
LIVE_EDITABLE = ("name", "ends_at", "admission_rate", "max_queue")  # safe once buyers are in
SALE_HASH_EDITABLE = (
    "name", "starts_at_ms", "ends_at_ms", "admission_rate", "max_queue", "window_ms", "capacity",
    "challenge", "challenge_max",
)  # fmt: skip


async def _insert_skus(conn: asyncpg.Connection, sale_id: str, skus: Sequence[SkuSpec]) -> None:
    if not skus:
        return
    await conn.executemany(
        "INSERT INTO sale_skus (sale_id, sku, title, stock_total, price, currency,"
        " per_buyer_limit, hold_ttl_seconds, buckets) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            (sale_id, s.sku, s.title, s.stock, s.price, s.currency, s.per_buyer_limit,
             s.hold_ttl_seconds, s.buckets)
            for s in skus
        ],
    )  # fmt: skip
