"""A sale's settings and state: pause / resume / end, the admission rate, the sale file's
fields and a SKU's title, price, currency, per-buyer limit and hold time.

Postgres first (it is the truth), then the sale's Redis hashes, while the sale's row is still
locked: changes at once reach Redis in the order Postgres took them (written after the commit,
a pause and a resume could land in Redis the other way round), and a preload, which holds the
row too, sees none halfway. Every Redis write is absolute and idempotent, so a retry after a
failure converges; one that fails rolls Postgres back, and the reconciler puts back the SKUs'
status it had.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from allocator.sale_reads import SaleReads, in_parts
from flashsale.errors import Conflict, InvalidInput
from flashsale.keys import SaleKeys, bucket_keys
from flashsale.sales import (
    STATUS_BY_ACTION,
    fetch_skus,
    sale_hash,
    sale_json,
    sale_state,
    sku_meta,
    unknown_sku,
)
from flashsale.salespec import LATEST, parse_sale, parse_sku, timestamp


async def set_status(sales: SaleReads, sale_id: str, action: str, *,
                     with_skus: bool = True) -> dict[str, Any]:  # fmt: skip
    """pause, resume or end a sale. Idempotent; an ended sale stays ended. Returns the sale,
    with its SKUs unless ``with_skus`` is False."""
    target = STATUS_BY_ACTION[action]
    async with sales.pool.acquire() as conn, conn.transaction():
        sale = await sales.sale_row(conn, sale_id, lock=True)
        if sale_state(sale) == "ended" and target != "ended":  # by `sale end` or the clock
            raise Conflict(f"sale {sale_id} has ended and cannot {action}", code="sale_ended")
        # Only a change of status is one: an end again keeps when the sale ended (its
        # updated_at, which SALE_END and the reconciler's window over the sale read).
        await conn.execute("UPDATE sales SET status = $2, updated_at = now()"
                           " WHERE id = $1 AND status <> $2", sale_id, target)  # fmt: skip
        skus = await fetch_skus(conn, sale_id)
        # Redis under the sale's lock (the module says why); every step is idempotent.
        await sales.scripts.set_status(SaleKeys(sale_id), target)
        for part in in_parts(skus):
            await sales.scripts.set_fields_many([
                (keys.meta, {"status": target})
                for sku in part for keys in bucket_keys(sale_id, sku["sku"], sku["buckets"])
            ])  # fmt: skip
    return await sales.get(sale_id) if with_skus else sale_json(await sales.row(sale_id))


async def delete(sales: SaleReads, sale_id: str) -> dict[str, Any]:
    """Delete a sale that was never preloaded (made by mistake, a rehearsal): its rows are all
    there is of it, as nothing reaches Redis, a buyer or an order before a preload. One
    preloaded, or with a preload that stopped part way (some of its SKUs in Redis), keeps
    its record for its audit: Conflict, naming ``sale end``. Returns what was deleted."""
    async with sales.pool.acquire() as conn, conn.transaction():
        sale = await sales.sale_row(conn, sale_id, lock=True)  # a preload waits, or is waited on
        skus = await fetch_skus(conn, sale_id)
        buckets = [keys for sku in skus
                   for keys in bucket_keys(sale_id, sku["sku"], sku["buckets"])]  # fmt: skip
        in_redis = bool(await sales.redis.exists(SaleKeys(sale_id).sale))
        for part in in_parts(buckets):  # a preload that stopped part way left some SKUs
            in_redis = in_redis or any(c is not None for c in await sales.scripts.stock(part))
        if sale["preloaded_at"] is not None or in_redis:
            raise Conflict(f"sale {sale_id} was preloaded: it keeps its record, for its audit; "
                           f"end it instead (`flashsale sale end {sale_id}`)",
                           code="sale_preloaded")  # fmt: skip
        await conn.execute("DELETE FROM sales WHERE id = $1", sale_id)  # its SKUs cascade
    return {"id": sale_id, "name": sale["name"], "skus": len(skus)}


async def set_admission_rate(sales: SaleReads, sale_id: str, rate: Any) -> dict[str, Any]:
    """Change how many buyers per second the pump admits, at any time before the sale
    ends: the pump reads the rate each step, and the waiting room's ETAs follow it."""
    return await update(sales, sale_id, {"admission_rate": rate}, with_skus=False)


async def update(sales: SaleReads, sale_id: str, changes: Mapping[str, Any], *,
                 with_skus: bool = True) -> dict[str, Any]:  # fmt: skip
    """Change a sale's settings (the sale file's fields but ``skus``). Before the start
    anything can change; once it started only ``LIVE_EDITABLE`` can (an end still to come, a higher
    queue cap, the proof of work asked of the next joins); an ended sale cannot. Validated
    as a whole, like a new sale; Postgres first, then the sale's Redis hashes. Returns the
    sale, with its SKUs unless ``with_skus`` is False (a change of rate mid-sale need not
    read 200,000 of them)."""
    _only(changes, EDITABLE, "unknown field")
    async with sales.pool.acquire() as conn, conn.transaction():
        sale = await sales.sale_row(conn, sale_id, lock=True)
        now = datetime.now(UTC)
        state = sale_state(sale, now)
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
            try:
                merged["ends_at"] = (opens + (sale["ends_at"] - sale["starts_at"])).isoformat()
            except OverflowError:
                raise InvalidInput("starts_at", "would move the sale's end past "
                                   f"{LATEST:%Y-%m-%d}") from None  # fmt: skip
        spec = parse_sale(merged, now=now, changed=changes.keys())
        if state != "scheduled":
            if spec.max_queue < sale["max_queue"]:
                raise Conflict("max_queue can only rise once the sale has started: it is "
                               f"{sale['max_queue']:,}, got {spec.max_queue:,}",
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
        # Each SKU's hash holds the window (the reserve script checks it): written when a
        # change names it (a retry too, so that it converges after a failure below), and only
        # then, as it is one script call per SKU and bucket.
        moves = "starts_at" in changes or "ends_at" in changes
        skus = await fetch_skus(conn, sale_id) if moves else []
        # Redis under the sale's lock (a sale not preloaded yet has nothing there); every
        # write is idempotent, so a retry after a failure converges.
        fields = sale_hash(row, skus)  # its `skus` field is not written here
        await sales.scripts.set_fields(
            SaleKeys(sale_id).sale, {k: fields[k] for k in SALE_HASH_EDITABLE}
        )
        if moves:
            window = {k: fields[k] for k in ("starts_at_ms", "ends_at_ms")}
            for part in in_parts(skus):
                await sales.scripts.set_fields_many([
                    (keys.meta, window)
                    for sku in part for keys in bucket_keys(sale_id, sku["sku"], sku["buckets"])
                ])  # fmt: skip
    return await sales.get(sale_id) if with_skus else sale_json(row)


# A SKU's fields a change may name: the title any time before the end, the others before the
# start (a buyer never pays another price, nor meets another limit or hold time, than those
# in force when the sale opened).
SKU_EDITABLE = ("title", "price", "currency", "per_buyer_limit", "hold_ttl_seconds")
SKU_LIVE_EDITABLE = ("title",)


async def update_sku(sales: SaleReads, sale_id: str, sku: str, changes: Mapping[str, Any], *,
                     with_skus: bool = True) -> dict[str, Any]:  # fmt: skip
    """Change a SKU's ``title`` (any time before the end), or its ``price``, ``currency``,
    ``per_buyer_limit`` or ``hold_ttl_seconds`` (before the start). Returns the sale with its
    SKUs, or with the changed one alone unless ``with_skus``."""
    _only(changes, SKU_EDITABLE, f"unknown field (can change: {', '.join(SKU_EDITABLE)})")
    # A SKU's file reads an empty field as left out, so as its default; a change has no
    # default to go back to: a null limit became 1, an empty title the SKU id.
    empty = next((name for name, value in changes.items() if value in (None, "")), None)
    if empty is not None:
        raise InvalidInput(empty, "is empty: give the new value")
    async with sales.pool.acquire() as conn, conn.transaction():
        sale = await sales.sale_row(conn, sale_id, lock=True)
        row = await conn.fetchrow(
            "SELECT * FROM sale_skus WHERE sale_id = $1 AND sku = $2", sale_id, sku
        )
        if row is None:
            raise await unknown_sku(conn, sale_id, sku)
        state = sale_state(sale)
        if state == "ended":
            raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
        fixed = sorted(set(changes) - set(SKU_LIVE_EDITABLE))
        if fixed and state != "scheduled":
            raise Conflict(f"{fixed[0]} cannot change once the sale has started (it can: "
                           f"{', '.join(SKU_LIVE_EDITABLE)})", code="sale_started")  # fmt: skip
        merged = {"sku": sku, "stock": row["stock_total"],
                  **{field: row[field] for field in SKU_EDITABLE}, **changes}  # fmt: skip
        spec = parse_sku(merged, "", changed=changes.keys())
        updated = await conn.fetchrow(
            "UPDATE sale_skus SET title = $3, price = $4, currency = $5, per_buyer_limit = $6,"
            " hold_ttl_seconds = $7 WHERE sale_id = $1 AND sku = $2 RETURNING *",
            sale_id, sku, spec.title, spec.price, spec.currency, spec.per_buyer_limit,
            spec.hold_ttl_seconds,
        )  # fmt: skip
        meta = sku_meta(sale, updated)  # the scripts' copy; the title is Postgres's alone
        written = {k: meta[k] for k in ("price", "currency", "per_buyer_limit", "hold_ttl_ms")}
        for keys in bucket_keys(sale_id, sku, updated["buckets"]):
            await sales.scripts.set_fields(keys.meta, written)
    return await sales.get(sale_id) if with_skus else sale_json(sale, [updated])


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
LIVE_EDITABLE = (  # safe once buyers are in: none changes the rules for those in line
    "name", "ends_at", "admission_rate", "max_queue", "join_challenge", "join_challenge_max",
)  # fmt: skip
SALE_HASH_EDITABLE = (
    "name", "starts_at_ms", "ends_at_ms", "admission_rate", "max_queue", "window_ms", "capacity",
    "challenge", "challenge_max",
)  # fmt: skip
