"""Rebuilding Redis from Postgres: a SKU's holds and counters, a sale's waiting room.

**A SKU** (:func:`rebuild_sku`). Postgres wins. The SKU is first closed (reservations answer
``unavailable``), then every order in Postgres gets the hold its state implies, where Redis
has none or a contradicting one:

================  =========================================================================
order in Postgres  hold written in Redis
================  =========================================================================
CONFIRMED          SOLD
PAYING             PAYING (an ACTIVE hold moves to PAYING; SOLD and RELEASED are newer news
                   the saga still has to follow, and are kept)
PENDING            ACTIVE with a fresh deadline, and its ``reservation.created`` is appended
                   to the outbox again so the saga charges it (the worker had found no hold)
EXPIRED, ...       RELEASED with the order's cause
================  =========================================================================

Holds Postgres has no order for (granted, not yet through the pipeline) are kept as they are.
Redis is read before Postgres, and every write is compare-and-set against what was read, so a
hold that moved meanwhile is left to the next pass. Then one atomic script recounts available
/ active / paying / sold and the per-buyer counts from the holds themselves, writes the
configuration and reopens the SKU. If the holds need more units than the total (Redis granted
units Postgres meanwhile sold), the newest ACTIVE holds Postgres knows nothing of are
released (cause ``reconciled``) first: never an oversell.

**Lost SKUs of a sale** (:func:`rebuild_lost`), each in one stock bucket, go through the same
steps together, a few hundred at a time: their rows and their orders in one query each, their
holds read, and the SKUs closed and recounted, in pipelines. One that needs more (holds to
write, holds that cannot be read, more holds than stock) is left closed for :func:`rebuild_sku`.

**A waiting room** (:func:`restore_queue`): the queue counters go back to at least the
highest values gateways and pumps checkpointed (:mod:`flashsale.queue_marks`), the admission
claims come back from the orders, and the room reopens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import asyncpg

from allocator.hold_scripts import HoldScripts
from allocator.redis_calls import read_packed
from allocator.repair_scripts import HoldWrite, RepairScripts
from allocator.sale_scripts import StockCounts
from flashsale.clients import RedisClient
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.orders import STATE_CAUSE
from flashsale.queue_marks import Mark, highest
from flashsale.records import ClaimMember, HoldRecord, HoldState, IdemAnswer, ReserveResult, text
from flashsale.sales import fetch_sale, fetch_sku, sku_meta
from flashsale.wording import counted

log = logging.getLogger("flashsale.reconciler")

RECONCILED = "reconciled"  # cause of holds released because Postgres sold their units

_SKU_ORDERS = """
SELECT id, buyer_id, quantity, state, admission_id, payment_token, idempotency_key,
       (extract(epoch FROM created_at) * 1000)::bigint AS created_ms
FROM orders WHERE sale_id = $1 AND sku = $2 AND order_bucket(id) = $3
"""


@dataclass(frozen=True, slots=True)
class SkuRebuild:
    """What a rebuild did: counters before (None: Redis had none) and after, holds written,
    holds released to make room."""

    before: StockCounts | None
    after: StockCounts
    written: int
    released: list[str]


def plan_holds(
    orders: Sequence[asyncpg.Record],
    holds: dict[str, bytes],
    now_ms: int,
    ttl_ms: int,
    *,
    release_unordered_sold: bool = False,
) -> list[HoldWrite]:
    """The hold writes that make Redis agree with the orders (see the module's table). With
    ``release_unordered_sold`` (the SKU has drained), SOLD holds Postgres has no order for
    are released too: the worker writes an order before any charge, so Postgres does not
    count them sold."""
    writes: list[HoldWrite] = []
    if release_unordered_sold:
        ordered = {o["id"] for o in orders}
        for held_id, held in holds.items():
            record = _parse(held)
            if held_id not in ordered and record is not None and record.state == "SOLD":
                released = record.moved("RELEASED", RECONCILED)
                writes.append(HoldWrite(held_id, released.encode(), expected=text(held)))
    for order in orders:
        rid, state = order["id"], order["state"]
        raw = holds.get(rid)
        current = None if raw is None else _parse(raw)
        if current is None:  # no hold, or one that cannot be read: the order's, in its place
            write = _hold_for(order, now_ms, ttl_ms)
            writes.append(write if raw is None else replace(write, expected=text(raw)))
            continue
        wanted: HoldState | None = None
        if state == "CONFIRMED" and current.state != "SOLD":
            wanted = "SOLD"
        elif state == "PAYING" and current.state == "ACTIVE":
            wanted = "PAYING"
        elif state in STATE_CAUSE and current.state != "RELEASED":
            wanted = "RELEASED"
        if wanted is not None:
            moved = current.moved(wanted, STATE_CAUSE[state] if wanted == "RELEASED" else None)
            writes.append(HoldWrite(rid, moved.encode(), expected=text(raw)))
    return writes


def _hold_for(order: asyncpg.Record, now_ms: int, ttl_ms: int) -> HoldWrite:
    """The hold an order implies where Redis has none, with the buyer's remembered answer."""
    rid, state, key = order["id"], order["state"], order["idempotency_key"]
    hold_state: HoldState = {"CONFIRMED": "SOLD", "PAYING": "PAYING", "PENDING": "ACTIVE"}.get(
        state, "RELEASED"
    )  # type: ignore[assignment]
    deadline = now_ms + ttl_ms if hold_state == "ACTIVE" else order["created_ms"] + ttl_ms
    hold = HoldRecord(hold_state, order["quantity"], deadline, order["payment_token"],
                      order["admission_id"], order["created_ms"], STATE_CAUSE.get(state, ""),
                      order["buyer_id"], key)  # fmt: skip
    # The buyer's remembered reserve answer, as lua/reserve.lua writes it.
    answer = IdemAnswer(hold.quantity, hold.payment_ref,
                        ReserveResult("reserved", rid, deadline))  # fmt: skip
    return HoldWrite(rid, hold.encode(), None, hold.idem_field if key else "",
                     answer.encode() if key else "", redrive=hold_state == "ACTIVE")  # fmt: skip


def _parse(raw: bytes) -> HoldRecord | None:
    try:
        return HoldRecord.parse(raw)
    except ValueError:
        return None


class MalformedHolds(ValueError):
    """Hold records that cannot be read and that no order explains: the SKU cannot be recounted
    and stays closed until a person looks."""


async def _hold_map(client: RedisClient, keys: SkuKeys) -> dict[str, bytes]:
    raw = await client.hgetall(keys.holds)
    return {text(k): (v if isinstance(v, bytes) else v.encode()) for k, v in raw.items()}


async def rebuild_sku(
    pool: asyncpg.Pool,
    client: RedisClient,
    keys: SkuKeys,
    *,
    attempts: int = 3,
    release_unordered_sold: bool = False,
    total: int | str | None = None,
    meta: dict[str, str] | None = None,
    begun: bool = False,
    repair: RepairScripts | None = None,
) -> SkuRebuild:
    """Rebuild one SKU's Redis state from Postgres (see the module docstring). The SKU answers
    ``unavailable`` from the first step until the last; an interrupted rebuild leaves it
    closed and the next pass finishes it. For one bucket of a SKU split into stock buckets,
    ``total`` is the bucket's ('' keeps it, '+N' is what its holds commit plus N), ``meta``
    adds to the configuration written, and ``begun`` says the bucket is closed already.
    ``repair``: the scripts on ``client``, made once by a caller that rebuilds many SKUs."""
    repair = repair or RepairScripts(client)
    async with pool.acquire() as conn:
        sale = await fetch_sale(conn, keys.sale_id)
        sku = await fetch_sku(conn, keys.sale_id, keys.sku)
    if sale is None or sku is None:
        raise LookupError(f"no SKU {keys.sku} in sale {keys.sale_id}")
    ttl_ms = sku["hold_ttl_seconds"] * 1000
    header = (keys.sale_id, keys.sku, int(sku["price"]), str(sku["currency"]).strip())
    if not begun:
        await repair.begin(keys)
    written = 0
    for _ in range(attempts):
        # Redis before Postgres: a hold that is SOLD (or PAYING) when read has had its order
        # row since before then, so an order read afterwards cannot be missed.
        holds = await _hold_map(client, keys)
        orders = await pool.fetch(_SKU_ORDERS, keys.sale_id, keys.sku, keys.bucket)
        writes = plan_holds(orders, holds, int(time.time() * 1000), ttl_ms,
                            release_unordered_sold=release_unordered_sold)  # fmt: skip
        if not writes:
            break
        count, skipped = await repair.write_holds(keys, header, writes)
        written += count
        if not skipped:
            break
    # The holds as last read, unless this rebuild wrote since (the scripts that move holds
    # meanwhile write none that cannot be read).
    if written:
        holds = await _hold_map(client, keys)
    malformed = [rid for rid, raw in holds.items() if _parse(raw) is None]
    if malformed:
        raise MalformedHolds(
            f"{keys.sale_id}/{keys.sku}: malformed hold records with no order: {malformed[:10]}; "
            "the SKU stays closed (unavailable) until they are repaired or removed"
        )
    released: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        sale = await conn.fetchrow(SALE_HELD, keys.sale_id)  # see SALE_HELD
        sku = await fetch_sku(conn, keys.sale_id, keys.sku)
        if sale is None or sku is None:
            raise LookupError(f"no SKU {keys.sku} in sale {keys.sale_id}")
        config = {**sku_meta(sale, sku), **(meta or {})}
        wanted = sku["stock_total"] if total is None else total
        result = await repair.finish(keys, wanted, config)
        if not result.ok:
            released = await _make_room(pool, client, HoldScripts(client), keys,
                                        result.overcommitted)  # fmt: skip
            result = await repair.finish(keys, wanted, config)
    if not result.ok or result.after is None:
        raise RuntimeError(
            f"{keys.sale_id}/{keys.sku}: holds need {counted(result.overcommitted, 'unit')} more "
            "than the stock even after releasing every ACTIVE hold Postgres has no order for"
        )
    return SkuRebuild(result.before, result.after, written, released)


_LOST_ROWS = "SELECT * FROM sale_skus WHERE sale_id = $1 AND sku = ANY($2::text[])"
# The sale as it is when a rebuilt SKU reopens, held until then: a change of the sale writes
# Redis under FOR UPDATE (allocator.sale_settings), so a pause while a SKU was rebuilt is in
# the configuration it reopens with. Written as read at the rebuild's start, that SKU
# reopened active in a paused sale, and sold until the next pass.
SALE_HELD = "SELECT * FROM sales WHERE id = $1 FOR SHARE"
_LOST_ORDERS = """
SELECT sku, id, buyer_id, quantity, state, admission_id, payment_token, idempotency_key,
       (extract(epoch FROM created_at) * 1000)::bigint AS created_ms
FROM orders WHERE sale_id = $1 AND sku = ANY($2::text[]) AND order_bucket(id) = 0
"""


async def rebuild_lost(
    pool: asyncpg.Pool, client: RedisClient, sale_id: str, skus: Sequence[str],
    repair: RepairScripts,
) -> tuple[dict[str, SkuRebuild], list[str]]:  # fmt: skip
    """Rebuild SKUs of one sale, each in one stock bucket, whose Redis state was lost,
    together: one read of their rows, of their holds and of their orders, and their scripts
    pipelined, in the steps of :func:`rebuild_sku`. A SKU with holds to write, holds that
    cannot be read or more holds than stock is left, closed, to :func:`rebuild_sku` (a lost
    SKU that was never reserved has none). Returns (the rebuilt by SKU, the SKUs left)."""
    async with pool.acquire() as conn:
        sale = await fetch_sale(conn, sale_id)
        rows = {r["sku"]: r for r in await conn.fetch(_LOST_ROWS, sale_id, list(skus))}
    if sale is None:
        return {}, list(skus)  # rebuild_sku says what is missing
    present = [sku for sku in skus if sku in rows]
    left = [sku for sku in skus if sku not in rows]
    keys = {sku: SkuKeys(sale_id, sku) for sku in present}
    await repair.begin_many(list(keys.values()))
    # Redis before Postgres, as in rebuild_sku.
    replies = await read_packed(client, [("HGETALL", keys[sku].holds) for sku in present])
    orders: dict[str, list[asyncpg.Record]] = {}
    for order in await pool.fetch(_LOST_ORDERS, sale_id, present):
        orders.setdefault(order["sku"], []).append(order)
    now_ms = int(time.time() * 1000)
    finishing = []
    for sku, flat in zip(present, replies, strict=True):
        holds = {text(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}
        ttl_ms = rows[sku]["hold_ttl_seconds"] * 1000
        if plan_holds(orders.get(sku, []), holds, now_ms, ttl_ms) or any(
            _parse(raw) is None for raw in holds.values()
        ):
            left.append(sku)
        else:
            finishing.append(sku)
    async with pool.acquire() as conn, conn.transaction():
        sale = await conn.fetchrow(SALE_HELD, sale_id)  # see SALE_HELD
        rows = {r["sku"]: r for r in await conn.fetch(_LOST_ROWS, sale_id, finishing)}
        left += [sku for sku in finishing if sale is None or sku not in rows]
        finishing = [sku for sku in finishing if sale is not None and sku in rows]
        results = await repair.finish_many([
            (keys[sku], rows[sku]["stock_total"], sku_meta(sale, rows[sku])) for sku in finishing
        ])  # fmt: skip
    done: dict[str, SkuRebuild] = {}
    for sku, result in zip(finishing, results, strict=True):
        if result.ok and result.after is not None:
            done[sku] = SkuRebuild(result.before, result.after, 0, [])
        else:
            left.append(sku)
    return done, left


async def _make_room(
    pool: asyncpg.Pool, client: RedisClient, scripts: HoldScripts, keys: SkuKeys, units: int
) -> list[str]:
    """Release the newest ACTIVE holds Postgres has no order for, until ``units`` are free.
    Redis is read first, and only holds still ACTIVE are released: one that a worker has
    begun paying for meanwhile is left alone."""
    holds = await _hold_map(client, keys)
    known = {r["id"] for r in await pool.fetch(_SKU_ORDERS, keys.sale_id, keys.sku, keys.bucket)}
    candidates = []
    for rid, raw in holds.items():
        hold = HoldRecord.parse(raw)
        if hold.state == "ACTIVE" and rid not in known:
            candidates.append((hold.created_ms, rid, hold.quantity))
    chosen: list[str] = []
    for _, rid, qty in sorted(candidates, reverse=True):
        if units <= 0:
            break
        chosen.append(rid)
        units -= qty
    results = await scripts.transition("release", [(keys, rid) for rid in chosen],
                                       cause=RECONCILED, active_only=True)  # fmt: skip
    released = [rid for rid, r in zip(chosen, results, strict=True) if r.ok]
    log.warning("%s/%s: released %d ACTIVE holds Postgres sold the units of: %s",
                keys.sale_id, keys.sku, len(released), released[:10])  # fmt: skip
    return released


# -- the waiting room -----------------------------------------------------------------------

_CLAIMS = """
SELECT admission_id, idempotency_key, sku, quantity, payment_token FROM orders
WHERE sale_id = $1 AND admission_id ~ '^[0-9]+$' AND idempotency_key <> ''
"""


async def restore_queue(
    pool: asyncpg.Pool, client: RedisClient, sale_id: str
) -> tuple[Mark, tuple[int, int, int | None]]:
    """Reopen a sale's waiting room at no less than the checkpointed marks, with the claims
    of its orders; (the marks used, (tail, serving, cutoff) as restored)."""
    mark = await highest(pool, sale_id)
    claims = [
        ClaimMember.of(int(r["admission_id"]), r["idempotency_key"], r["sku"], r["quantity"],
                       r["payment_token"]).encode()
        for r in await pool.fetch(_CLAIMS, sale_id)
    ]  # fmt: skip
    restored = await RepairScripts(client).restore_queue(
        SaleKeys(sale_id), tail=mark.tail, serving=mark.serving, pre=mark.pre,
        cutoff=mark.cutoff, sealed=mark.sealed, shuffled=mark.shuffled,
        sold_out=mark.sold_out, claims=claims,
    )  # fmt: skip
    return mark, restored
