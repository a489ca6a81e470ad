"""Each gateway process's cached view of the sales it serves.

* **The public summary** (:func:`sale_summary`, from Postgres, remaining units from Redis,
  and whether a newcomer may still join from this process's waiting-room counters):
  read by every buyer in a spike, so each process keeps a copy, encoded once
  (:class:`gateway.documents.Document`), for ``INFO_TTL_S``, or ``READ_SHARE`` times as long
  as reading it took, up to ``MAX_INFO_TTL_S``: a sale of 20,000 SKUs takes about 0.35 s to
  read here, which twice a second would keep a process and its servers busy, and one of
  200,000 about 5 s. Remaining units may lag that long, which the page tolerates (it learns
  "sold out" from its status polls).
  While Postgres is down, the last summary is served as it was; while it hangs, too, once
  its read has been waited for ``STALE_AFTER_S``.
* **The SKUs and their per-buyer limits** (:func:`sku_limits`) that the reservation route
  checks a request against, from the copy preload put in Redis: reserving needs no Postgres
  at all, so buyers keep buying while it is down. Only a sale Redis does not know is looked
  up in Postgres (an unknown one is a 404). The copy lasts ``LIMITS_TTL_S``, or
  ``READ_SHARE`` times as long as reading it took, up to ``MAX_LIMITS_TTL_S`` (two reads a
  SKU: 0.8 s for 100,000 SKUs here). A SKU the copy does not know, in a copy older than
  ``LIMITS_TTL_S``, is read again first (a SKU just added).

When a copy is due, one read is made for it (:class:`flashsale.inflight.InFlight`): a
spike's requests find it due together. They wait for it, unless the copy took
``SLOW_READ_S`` or more to read (a sale of thousands of SKUs): then the copy is served, one
read older, while the next read runs beside, and no request waits for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar, cast

from aiohttp import web

from allocator.sale_scripts import SkuRule
from flashsale.errors import NotFound, shown
from flashsale.inflight import Copy
from flashsale.keys import ID_PATTERN, SaleKeys
from flashsale.outages import is_outage
from flashsale.sales import sale_state
from gateway.documents import Document, Summary
from gateway.state import CATALOG, CATALOG_READS, COUNTERS, SALES, SKU_LIMITS

INFO_TTL_S = 0.5
MAX_INFO_TTL_S = 60.0  # also the live page's (gateway.console)
READ_SHARE = 10  # a copy lasts at least this many times as long as its read took
LIMITS_TTL_S = 1.0
MAX_LIMITS_TTL_S = 10.0
SLOW_READ_S = 0.05  # a copy that took this long to read is served while the next is read
STALE_AFTER_S = 1.0  # how long a summary's due read is waited for while a copy is in hand

T = TypeVar("T")


async def ended_by_postgres(app: web.Application, sale_id: str) -> bool:
    """Whether Postgres says the sale ended (NotFound for an unknown sale): the answer where
    Redis lost the sale's state (its room, its SKU), since no restore would change it, and
    none comes for a sale the reconciler is done with."""
    return sale_state(await app[SALES].row(sale_id, named=False)) == "ended"


async def sale_summary(request: web.Request, sale_id: str) -> Summary:
    """The public view of a sale, as fresh as the module says. Raises NotFound. When it is
    due, one read is made, and every caller meanwhile waits for it (a spike's buyers all ask)
    unless the copy was slow to read: then the copy is served meanwhile."""
    if not ID_PATTERN.match(sale_id):
        raise NotFound(f"unknown sale {shown(sale_id)}", code="unknown_sale")
    app = request.app
    key, copy = ("summary", sale_id), app[CATALOG].get(sale_id)
    read = partial(_read_summary, app, sale_id)
    if copy is not None and _served(app, copy, key, read):
        return copy.value
    reading = app[CATALOG_READS].start(key, read)
    if copy is None:
        return cast(Summary, await asyncio.shield(reading))
    # A read that does not come back within STALE_AFTER_S leaves the copy in hand to answer
    # (the read goes on): while Postgres hung, every buyer opening the page waited for it.
    done, _ = await asyncio.wait([reading], timeout=STALE_AFTER_S)
    return cast(Summary, reading.result()) if done else copy.value


def _served(
    app: web.Application, copy: Copy[Any], key: tuple[str, str],
    read: Callable[[], Awaitable[Any]],
) -> bool:  # fmt: skip
    """Whether ``copy`` may answer now: it is fresh, or due but slow to read (``SLOW_READ_S``
    or more), and then the next read is started beside it."""
    if time.monotonic() < copy.expires:
        return True
    if copy.took < SLOW_READ_S:
        return False
    app[CATALOG_READS].start(key, read)
    return True


def copy_of(value: T, began: float, ttl_s: float, most_s: float) -> Copy[T]:
    """A copy read from ``began`` until now, kept ``ttl_s`` or ``READ_SHARE`` times as long as
    the read took, up to ``most_s``."""
    now = time.monotonic()
    took = now - began
    return Copy(now + min(most_s, max(ttl_s, READ_SHARE * took)), began, took, value)


async def _read_summary(app: web.Application, sale_id: str) -> Summary:
    cache = app[CATALOG]
    cached = cache.get(sale_id)
    began = time.monotonic()
    try:
        sale, stock = await app[SALES].with_stock(sale_id)
        closed = (await app[COUNTERS].get(sale_id)).view.closed_to_newcomers
    except Exception as exc:
        if cached is None or not is_outage(exc):
            raise
        return cached.value  # Postgres is down: the sale as last seen
    # In a thread: for 200,000 SKUs the build took the loop 0.4 s (the thread holds the GIL
    # for a switch interval at a time; zlib and the hash let go of it).
    summary = await asyncio.to_thread(summary_document, sale, stock, closed)
    if len(cache) > 1024:
        cache.clear()
    cache[sale_id] = copy_of(summary, began, INFO_TTL_S, MAX_INFO_TTL_S)
    return summary


def summary_document(
    sale: dict[str, Any], stock: Mapping[str, tuple[int, int] | None], closed: bool = False
) -> Summary:
    """The public summary of ``sale`` with each SKU's remaining units, encoded. A SKU is sold
    out when none remain and none are held: a held unit comes back if its hold expires, is
    cancelled or its payment fails, and the waiting room still queues buyers for it. The sale
    is sold out when each SKU is, or when ``closed``: a buyer joining now is told it is sold
    out, the units left being for the buyers already in line (or for nobody, once each of
    them has had a turn)."""
    skus = [
        {
            "sku": s["sku"],
            "title": s["title"],
            "price": s["price"],
            "currency": s["currency"],
            "per_buyer_limit": s["per_buyer_limit"],
            "buckets": s["buckets"],
            "remaining": None if (units := stock.get(s["sku"])) is None else units[0],
            "sold_out": units == (0, 0),
        }
        for s in sale["skus"]
    ]
    body = {
        "id": sale["id"],
        "name": sale["name"],
        "state": sale["state"],
        "starts_at": sale["starts_at"],
        "ends_at": sale["ends_at"],
        "admission_window_seconds": sale["admission_window_seconds"],
        "join_challenge": sale["join_challenge"],
        "join_challenge_max": sale["join_challenge_max"],
        "shuffle": sale["shuffle"],
        "sold_out": closed or (bool(skus) and all(s["sold_out"] for s in skus)),
        "sku_count": len(skus),
        "skus": skus,
    }
    return Summary(Document.of(body), {s["sku"]: i for i, s in enumerate(sale["skus"])})


async def sku_limits(
    request: web.Request, sale_id: str, sku: str | None = None
) -> dict[str, SkuRule]:
    """The sale's SKUs, their per-buyer limits and stock buckets, from Redis (from Postgres
    for a sale Redis does not know), as fresh as the module says; read again first when
    ``sku`` is not in a copy older than ``LIMITS_TTL_S``. Raises NotFound for an unknown
    sale."""
    if not ID_PATTERN.match(sale_id):
        raise NotFound(f"unknown sale {shown(sale_id)}", code="unknown_sale")
    app = request.app
    key, copy = ("limits", sale_id), app[SKU_LIMITS].get(sale_id)
    read = partial(_read_limits, app, sale_id)
    if (
        copy is not None
        and (sku is None or sku in copy.value or time.monotonic() - copy.read_at < LIMITS_TTL_S)
        and _served(app, copy, key, read)
    ):
        return copy.value
    limits = cast(dict[str, SkuRule] | None, await app[CATALOG_READS].once(key, read))
    if limits is None:  # not preloaded, or lost by Redis: Postgres knows whether it exists
        summary = await sale_summary(request, sale_id)
        skus = summary.document.data["skus"]
        return {s["sku"]: SkuRule(s["per_buyer_limit"], s["buckets"]) for s in skus}
    return limits


async def _read_limits(app: web.Application, sale_id: str) -> dict[str, SkuRule] | None:
    began = time.monotonic()
    limits = await app[SALES].scripts.sku_limits(SaleKeys(sale_id))
    if limits is not None:
        cache = app[SKU_LIMITS]
        if len(cache) > 1024:
            cache.clear()
        cache[sale_id] = copy_of(limits, began, LIMITS_TTL_S, MAX_LIMITS_TTL_S)
    return limits
