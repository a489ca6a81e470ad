"""A sale as Postgres holds it: its rows, its public JSON shape, the state a buyer sees, and
the configuration Redis gets from it (the SKU ``meta`` hashes and the sale hash).

Sale administration (create, preload, status, pause...) is :mod:`allocator.sale_admin`: it
writes Postgres first and then brings Redis in line through the scripts.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg

from flashsale.errors import NotFound, shown
from flashsale.shuffle import SHUFFLE_ALGORITHM, seed_commitment
from flashsale.timefmt import iso, iso_ms, unix_ms

STATUS_BY_ACTION = {"pause": "paused", "resume": "active", "end": "ended"}
# SQL, of the sale ``s``: when it ends, or ended (an ended sale ended when it was ended); and
# until when a hold of its SKUs can live, its SKUs' longest hold TTL later (one probe of the
# index sale_skus_hold_ttl). The periodic queries over the sales in play filter sales by it,
# then read those sales' SKUs only.
SALE_END = "CASE WHEN s.status = 'ended' THEN least(s.ends_at, s.updated_at) ELSE s.ends_at END"
HOLDS_END = (
    f"{SALE_END} + make_interval(secs => (SELECT max(t.hold_ttl_seconds)"  # noqa: S608
    " FROM sale_skus t WHERE t.sale_id = s.id))"
)
# SQL, of a row of ``sales``: its state, by the rule of :func:`sale_state`.
SALE_STATE = (
    "CASE WHEN status = 'ended' OR ends_at <= now() THEN 'ended'"
    " WHEN status = 'paused' THEN 'paused' WHEN now() < starts_at THEN 'scheduled'"
    " ELSE 'live' END"
)


async def fetch_in_play(pool: asyncpg.Pool, sql: str, *args: Any) -> list[asyncpg.Record]:
    """The rows of a periodic query over the sales in play (``HOLDS_END``), with Postgres's
    JIT compilation off for it: the planner prices such a query by every SKU a sale might
    have, far above what it reads, and compiling it took 250 ms of Postgres CPU each time
    (``SET LOCAL``: it holds through a transaction pooler too)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL jit = off")
        return list(await conn.fetch(sql, *args))


Db: TypeAlias = "asyncpg.Pool | asyncpg.Connection"  # either can fetch
SKUS_NAMED = 5  # the SKUs a refusal of an unknown one names
CUT_ID_MIN = 9  # an id cut short is looked for from "sale-" and 4 of its 12 hex digits on


def new_sale_id() -> str:
    return f"sale-{secrets.token_hex(6)}"


async def fetch_sale(db: Db, sale_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow("SELECT * FROM sales WHERE id = $1", sale_id)
    return row


async def fetch_skus(db: Db, sale_id: str) -> list[asyncpg.Record]:
    """The sale's SKU rows, in the order they were given (a sale made before that was kept:
    by SKU)."""
    return list(await db.fetch("SELECT * FROM sale_skus WHERE sale_id = $1"
                               " ORDER BY position NULLS FIRST, sku", sale_id))  # fmt: skip


async def fetch_sku(db: Db, sale_id: str, sku: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT * FROM sale_skus WHERE sale_id = $1 AND sku = $2", sale_id, sku
    )
    return row


async def unknown_sale(db: Db, sale_id: object) -> NotFound:
    """The refusal of ``sale_id``, which names no sale: naming the sales it is the start of
    the id of (copied a character short), or the name of (the name typed for the id)."""
    said = f"unknown sale {shown(sale_id)}"
    if not isinstance(sale_id, str) or not sale_id or len(sale_id) > 200:
        return NotFound(said, code="unknown_sale")
    rows = await db.fetch(
        "SELECT id, name FROM sales WHERE (starts_with(id, $1) AND length($1) >= $2)"
        " OR lower(name) = lower($1) ORDER BY created_at DESC LIMIT 3",
        sale_id, CUT_ID_MIN)  # fmt: skip
    if rows:
        meant = " or ".join(f'{r["id"]}, "{r["name"]}"' for r in rows)
        said += f" (did you mean {meant}?)"
    return NotFound(said, code="unknown_sale")


async def unknown_sku(db: Db, sale_id: str, sku: str) -> NotFound:
    """The refusal of ``sku``, which the sale lacks: naming the SKU it is in another case
    (a shop's lower case), else the sale's first SKUs (an operator's typo named nothing)."""
    rows = await db.fetch(
        "SELECT sku, lower(sku) = lower($2) AS alike, count(*) OVER () AS n FROM sale_skus"
        " WHERE sale_id = $1 ORDER BY lower(sku) = lower($2) DESC, position NULLS FIRST, sku"
        " LIMIT $3", sale_id, sku, SKUS_NAMED)  # fmt: skip
    said = f"unknown SKU {shown(sku)} in sale {sale_id}"
    if rows and rows[0]["alike"]:
        said += f" (did you mean {rows[0]['sku']}?)"
    elif rows:
        more = rows[0]["n"] - len(rows)
        said += f": its SKUs are {', '.join(r['sku'] for r in rows)}"
        said += f" and {more:,} more" if more else ""
    return NotFound(said, code="unknown_sku")


def sale_state(sale: asyncpg.Record, now: datetime | None = None) -> str:
    """What a buyer sees of a sale row: scheduled, live, paused or ended (its status plus the
    clock, ``now`` by default). ``SALE_STATE`` is the same rule in SQL."""
    now = now or datetime.now(UTC)
    if sale["status"] == "ended" or now >= sale["ends_at"]:
        return "ended"
    if sale["status"] == "paused":
        return "paused"
    return "scheduled" if now < sale["starts_at"] else "live"


def ended_at(sale: asyncpg.Record, now: datetime) -> datetime | None:
    """When the sale ended: when an operator ended it (its last change) if before its
    ``ends_at``, else at that; None while it has not. ``SALE_END`` is the same rule in SQL."""
    ends: datetime = sale["ends_at"]
    changed: datetime = sale["updated_at"]
    if sale["status"] == "ended":
        return min(ends, changed)
    return ends if now >= ends else None


def archive_due(sale: asyncpg.Record, after_s: float | None) -> str | None:
    """When the reconciler archives the sale, ``after_s`` (``FLASHSALE_ARCHIVE_AFTER``) after
    its end, as the archive's ``DUE`` rule has it; None before its end, once archived, with
    no ``after_s`` (never), or once its Redis state was deleted (the archive takes no such
    sale: its audit needs that state)."""
    ended = ended_at(sale, datetime.now(UTC))
    gone = sale["archived_at"] is not None or sale.get("redis_cleared_at") is not None
    if after_s is None or ended is None or gone:
        return None
    return iso_ms(int((ended.timestamp() + after_s) * 1000))


def commitment_of(sale: asyncpg.Record) -> str:
    """The seed commitment the sale published before its start, as recorded then."""
    return str(sale["shuffle_commitment"] or seed_commitment(sale["shuffle_seed"]))


def sku_meta(sale: asyncpg.Record, sku: asyncpg.Record) -> dict[str, str]:
    """A SKU's Redis configuration (its ``meta`` hash) from its Postgres rows."""
    return {
        "sale_id": sale["id"],
        "sku": sku["sku"],
        "price": str(sku["price"]),
        "currency": sku["currency"],
        "per_buyer_limit": str(sku["per_buyer_limit"]),
        "hold_ttl_ms": str(sku["hold_ttl_seconds"] * 1000),
        "starts_at_ms": unix_ms(sale["starts_at"]),
        "ends_at_ms": unix_ms(sale["ends_at"]),
        "status": sale["status"],
        "buckets": str(sku["buckets"]),
    }


def sale_hash(sale: asyncpg.Record, skus: Sequence[asyncpg.Record]) -> dict[str, str]:
    """The sale's Redis configuration (its ``sale`` hash) from its Postgres rows: ``skus``
    are the SKUs it lists (a preload's, or those preloaded: :func:`preloaded`)."""
    return {
        "id": sale["id"],
        "name": sale["name"],
        "status": sale["status"],
        "starts_at_ms": unix_ms(sale["starts_at"]),
        "ends_at_ms": unix_ms(sale["ends_at"]),
        "admission_rate": str(sale["admission_rate"]),
        "max_queue": str(sale["max_queue"]),
        "window_ms": str(sale["admission_window_seconds"] * 1000),
        "capacity": str(sale["admission_capacity"]),
        "challenge": str(sale["join_challenge"]),
        "challenge_max": str(sale["join_challenge_max"]),
        "seed_hash": commitment_of(sale),
        "skus": ",".join(s["sku"] for s in skus),
        # the version of the sale's set of SKUs the list was written from (reconciler.skus)
        "skus_version": str(sale["skus_version"]),
    }


SKUS_VERSION = "SELECT skus_version FROM sales WHERE id = $1"


def preloaded(skus: Sequence[asyncpg.Record]) -> list[asyncpg.Record]:
    """The SKUs a sale's hash lists, of its rows: those preloaded (one imported since the
    last preload cannot be reserved yet; the gateway answers 404 for it)."""
    return [s for s in skus if s["preloaded_at"] is not None]


def sale_json(sale: asyncpg.Record, skus: Sequence[asyncpg.Record] | None = None) -> dict[str, Any]:
    """The public JSON shape of a sale; ``skus`` is included when given (even if empty)."""
    now = datetime.now(UTC)
    data: dict[str, Any] = {
        "id": sale["id"],
        "name": sale["name"],
        "starts_at": iso(sale["starts_at"]),
        "ends_at": iso(sale["ends_at"]),
        "admission_rate": sale["admission_rate"],
        "max_queue": sale["max_queue"],
        "admission_window_seconds": sale["admission_window_seconds"],
        "admission_capacity": sale["admission_capacity"],
        "join_challenge": sale["join_challenge"],
        "join_challenge_max": sale["join_challenge_max"],
        "status": sale["status"],
        "state": sale_state(sale, now),
        "preloaded_at": iso(sale["preloaded_at"]),
        "ended_at": iso(ended_at(sale, now)),
        "archived_at": iso(sale["archived_at"]),
        # deleted on purpose: by its archive, or by a benchmark keeping a sale it ordered from
        "redis_cleared_at": iso(sale.get("redis_cleared_at")),
        # The seed is revealed only once the pre-queue is closed (the sale has started).
        "shuffle": {
            "algorithm": SHUFFLE_ALGORITHM,
            "commitment": commitment_of(sale),
            "seed": sale["shuffle_seed"] if now >= sale["starts_at"] else None,
        },
    }
    if skus is not None:
        data["skus"] = [
            {
                "sku": s["sku"],
                "title": s["title"],
                "stock": s["stock_total"],
                "price": s["price"],
                "currency": s["currency"].strip(),
                "per_buyer_limit": s["per_buyer_limit"],
                "hold_ttl_seconds": s["hold_ttl_seconds"],
                "buckets": s["buckets"],
            }
            for s in skus
        ]
    return data
