"""The sales an allocator serves, from Postgres every 2 s in each process: those in which a
hold can still live (swept and relayed), the live ones among them getting a pump each, each
with every SKU.

A sale's SKUs are read only when its set of SKUs moved (``sales.skus_version``, moved by
triggers on ``sale_skus``: migration 0017). Reading every SKU at each discovery took 100-140
ms of Postgres for a live sale of 100,000 SKUs, every 2 s and in each process. The lists kept
stay the same objects while nothing changes, which the allocator's checks for "the same
scope" rely on.

Beside them, the sales about to open, or open, that were never preloaded (nothing else shows
that their buyers are all told they are not open yet), and those with SKUs added after their
preload and not preloaded (which no buyer can see).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from flashsale.sales import HOLDS_END, fetch_in_play

# The sales in which a hold can still live: after a sale ended, for as long as a hold granted
# at the end can live (its SKUs' longest hold TTL) and a minute more. Holds expire and late
# cancels happen after the end too, so the sweeper and the relay keep covering them. An
# ended sale ends when it was ended. The live ones among them (not ended, before their end)
# get a pump each. A sale whose Redis state was deleted on purpose (``redis_cleared_at``: an
# archive, whose audit found nothing in flight, or a benchmark's sale an engine made orders
# of, discarded after the run) is not one: the relay's visits made its outbox streams again.
HOLDING_SALES = f"""
SELECT s.id, s.skus_version, s.status, s.ends_at < now() - interval '1 minute' AS past_end,
       s.status <> 'ended' AND s.ends_at > now() AS live
FROM sales s
WHERE s.preloaded_at IS NOT NULL AND s.redis_cleared_at IS NULL
  AND {HOLDS_END} + interval '1 minute' > now()
ORDER BY s.id
"""  # noqa: S608 - only constants of this code go in
# The sales that open within NOT_PRELOADED_WINDOW_S, or have opened, with what of them was not
# preloaded. A sale never preloaded: every buyer is told it is not open yet (its waiting room
# is not in Redis), with nothing else to show it; with the seconds until it opens (less than
# 0: it has). A sale preloaded: the SKUs added since and not preloaded, which no buyer can see
# or reserve (one index probe a sale: migration 0019).
NOT_PRELOADED_WINDOW_S = 600
NOT_PRELOADED = """
SELECT id, preloaded_at IS NULL AS never, extract(epoch FROM starts_at - now())::float8 AS opens_in,
       CASE WHEN preloaded_at IS NULL THEN 0
            ELSE (SELECT count(*) FROM sale_skus k
                  WHERE k.sale_id = s.id AND k.preloaded_at IS NULL) END AS skus
FROM sales s
WHERE status <> 'ended' AND ends_at > now() AND starts_at < now() + make_interval(secs => $1)
ORDER BY id
"""
# The SKUs of the sales $1, with the version of the set they are (one statement: the same
# snapshot for both).
SALE_SKUS = """
SELECT s.id, s.skus_version, array_agg(k.sku ORDER BY k.sku) AS skus,
       array_agg(k.buckets ORDER BY k.sku) AS buckets
FROM sales s JOIN sale_skus k ON k.sale_id = s.id
WHERE s.id = ANY($1::text[])
GROUP BY s.id
"""


class SkuSets:
    """The SKUs of each sale in play as last read, by the version of its set."""

    def __init__(self) -> None:
        self._sets: dict[str, tuple[int, list[str], list[int]]] = {}

    async def holding(self, pool: asyncpg.Pool) -> list[dict[str, Any]]:
        """The sales in which a hold can still live, in order of id: ``id``, ``skus`` and their
        ``buckets`` (the same lists as last time where the set did not move), ``status``,
        ``past_end`` and ``live``. A sale with no SKU is left out."""
        heads = await fetch_in_play(pool, HOLDING_SALES)
        stale = [h["id"] for h in heads
                 if self._sets.get(h["id"], (None,))[0] != h["skus_version"]]  # fmt: skip
        if stale:
            for r in await fetch_in_play(pool, SALE_SKUS, stale):
                self._sets[r["id"]] = (r["skus_version"], list(r["skus"]), list(r["buckets"]))
        in_play = {h["id"] for h in heads}
        self._sets = {sale: known for sale, known in self._sets.items() if sale in in_play}
        rows: list[dict[str, Any]] = []
        for h in heads:
            known = self._sets.get(h["id"])
            if known is not None:
                rows.append({"id": h["id"], "skus": known[1], "buckets": known[2],
                             "status": h["status"], "past_end": h["past_end"],
                             "live": h["live"]})  # fmt: skip
        return rows


@dataclass(frozen=True)
class NotPreloaded:
    """Of the sales open, or opening within ``NOT_PRELOADED_WINDOW_S``: those never preloaded,
    with the seconds until each opens (less than 0: it has), and those preloaded with SKUs
    added since and not preloaded, with how many."""

    sales: dict[str, float]
    skus: dict[str, int]


async def not_preloaded(pool: asyncpg.Pool) -> NotPreloaded:
    rows = await fetch_in_play(pool, NOT_PRELOADED, float(NOT_PRELOADED_WINDOW_S))
    return NotPreloaded(sales={row["id"]: row["opens_in"] for row in rows if row["never"]},
                        skus={row["id"]: row["skus"] for row in rows if row["skus"]})  # fmt: skip
