"""Public buyer-facing reads: ``GET /v1/sales/{sale}``.

Sale pages are read by every buyer in a spike, so the answer is cached per process for
``INFO_TTL_S``: remaining units may lag that long, which the page tolerates (the reservation
path decides against live stock).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from gateway.app import SALES, json_response

INFO_TTL_S = 0.5
INFO = web.AppKey("public_info_cache", dict)


async def sale_info(request: web.Request) -> web.Response:
    sale_id = request.match_info["sale"]
    cache: dict[str, tuple[float, dict[str, Any]]] = request.app[INFO]
    now = time.monotonic()
    cached = cache.get(sale_id)
    if cached is None or cached[0] <= now:
        sales = request.app[SALES]
        sale = await sales.get(sale_id)
        status = await sales.status(sale_id)
        remaining = {row["sku"]: row["available"] for row in status["skus"]}
        body = {
            "id": sale["id"],
            "name": sale["name"],
            "state": sale["state"],
            "starts_at": sale["starts_at"],
            "ends_at": sale["ends_at"],
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
    return json_response(cached[1], headers={"Cache-Control": f"max-age={int(INFO_TTL_S) or 1}"})


def setup(app: web.Application) -> None:
    app[INFO] = {}
    app.router.add_get("/v1/sales/{sale}", sale_info)
