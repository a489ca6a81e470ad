"""Each gateway process's cached public view of the sales it serves.

Sale pages are read by every buyer in a spike, so a sale's summary is cached per process for
``INFO_TTL_S``: remaining units may lag that long, which the page tolerates (the reservation
path decides against live stock). The same summary gives the reservation route its SKUs and
per-buyer limits without a Postgres round trip per request.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from flashsale.errors import NotFound
from flashsale.keys import ID_PATTERN
from gateway.state import CATALOG, SALES

INFO_TTL_S = 0.5


async def sale_summary(request: web.Request, sale_id: str) -> dict[str, Any]:
    """The public view of a sale, at most ``INFO_TTL_S`` old. Raises NotFound."""
    if not ID_PATTERN.match(sale_id):
        raise NotFound(f"unknown sale {sale_id!r}", code="unknown_sale")
    cache = request.app[CATALOG]
    now = time.monotonic()
    cached = cache.get(sale_id)
    if cached is None or cached[0] <= now:
        sales = request.app[SALES]
        status = await sales.status(sale_id)
        sale = await sales.get(sale_id)
        remaining = {row["sku"]: row["available"] for row in status["skus"]}
        body = {
            "id": sale["id"],
            "name": sale["name"],
            "state": sale["state"],
            "starts_at": sale["starts_at"],
            "ends_at": sale["ends_at"],
            "admission_window_seconds": sale["admission_window_seconds"],
            "shuffle": sale["shuffle"],
            "skus": [
                {
                    "sku": s["sku"],
                    "title": s["title"],
                    "price": s["price"],
                    "currency": s["currency"],
                    "per_buyer_limit": s["per_buyer_limit"],
                    "remaining": remaining.get(s["sku"]),
                    "sold_out": remaining.get(s["sku"]) == 0,
                }
                for s in sale["skus"]
            ],
        }
        if len(cache) > 1024:
            cache.clear()
        cache[sale_id] = cached = (now + INFO_TTL_S, body)
    return cached[1]
