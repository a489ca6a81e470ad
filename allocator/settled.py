"""Which SKUs of the holding sales the relay, the sweeper and the backlog gauge still visit.

A sale stays holding for a hold TTL and a minute after its end, and those loops visit every
SKU in scope: a 100,000-SKU catalogue sale ending put them back on each of its SKUs for three
minutes. Once a sale has ended for Redis as well (a minute past its end, so past it by Redis's
clock too; or ended, and its SKU's copy of the status says so), no reservation is granted any
more, and a SKU with nothing held or being paid and an empty outbox gets no more events and
has nothing to expire. Each allocator process reads those SKUs once and leaves them out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from allocator.redis_calls import Command, read_packed
from flashsale.clients import RedisClient
from flashsale.keys import SkuKeys, bucket_keys
from flashsale.records import text


def ended_for_redis(row: Mapping[str, Any]) -> bool | None:
    """For a sale's row with ``past_end`` (a minute past its end) and ``status``: True when
    past its end (so past it by Redis's clock too), None when only ended by its status (each
    SKU's Redis copy must say so too before no grant is possible), False otherwise. The
    allocator's and the reconciler's rule for leaving an ended sale's SKUs alone."""
    if row.get("past_end"):
        return True
    return None if row.get("status") == "ended" else False


# SKUs whose keys are made in one stretch of the loop (see ScopeKeys).
KEYS_AT_ONCE = 5000


class ScopeKeys:
    """The stock keys (each SKU's, or each of its buckets') of the holding sales, made once
    per sale's set of SKUs: at each change of the scope, the keys of every holding sale were
    made again in one stretch (0.9 s for four sales of 60,000 SKUs), through which no pump of
    the process could renew its lease."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[list[str], list[int], list[SkuKeys]]] = {}

    async def of(self, holding: Sequence[Mapping[str, Any]]) -> list[SkuKeys]:
        """Every key of the sales of ``holding`` (rows with ``id``, ``skus``, ``buckets``), in
        their order; those of a sale new or changed made ``KEYS_AT_ONCE`` SKUs at a time, the
        loop's other tasks let run between."""
        made: dict[str, tuple[list[str], list[int], list[SkuKeys]]] = {}
        scope: list[SkuKeys] = []
        for row in holding:
            sale, skus, buckets = row["id"], row["skus"], row["buckets"]
            known = self._made.get(sale)
            if known is None or known[0] != skus or known[1] != buckets:
                keys: list[SkuKeys] = []
                for start in range(0, len(skus), KEYS_AT_ONCE):
                    keys += [k for sku, n in zip(skus[start : start + KEYS_AT_ONCE],
                                                 buckets[start : start + KEYS_AT_ONCE],
                                                 strict=True)
                             for k in bucket_keys(sale, sku, n)]  # fmt: skip
                    await asyncio.sleep(0)
                known = (skus, buckets, keys)
            made[sale] = known
            scope += known[2]
        self._made = made
        return scope


class SettledSkus:
    """The SKUs found settled, by this process, of the sales still holding."""

    def __init__(self) -> None:
        self.keys: set[SkuKeys] = set()
        self.sales: set[str] = set()  # the sales whose every SKU is settled

    def keep(self, sales: Iterable[str]) -> None:
        """Forget the SKUs of sales no longer holding."""
        holding = set(sales)
        self.keys = {k for k in self.keys if k.sale_id in holding}
        self.sales &= holding

    async def find(self, client: RedisClient, holding: Sequence[Mapping[str, Any]],
                   in_scope: Sequence[SkuKeys], chunk: int = 20_000) -> bool:  # fmt: skip
        """Read each SKU of ``in_scope`` whose sale (its row in ``holding``) has ended and that
        is not known settled yet, and add those that are. Whether any was added."""
        over = {r["id"]: ended_for_redis(r) for r in holding if r["id"] not in self.sales}
        fresh = [(k, bool(over[k.sale_id])) for k in in_scope
                 if over.get(k.sale_id, False) is not False and k not in self.keys]  # fmt: skip
        ending = {sale for sale, end in over.items() if end is not False}
        added = False
        for start in range(0, len(fresh), chunk):  # the loop serves others between chunks
            part = fresh[start : start + chunk]
            commands: list[Command] = []
            for keys, _ in part:
                commands += [("HMGET", keys.stock, "active", "paying"), ("XLEN", keys.outbox),
                             ("HGET", keys.meta, "status")]  # fmt: skip
            replies = iter(await read_packed(client, commands))
            for keys, past in part:
                (active, paying), backlog, status = next(replies), next(replies), next(replies)
                ended = past or (status is not None and text(status) == "ended")
                if ended and active is not None and int(active) == int(paying or 0) == 0 \
                        and int(backlog) == 0:  # fmt: skip
                    self.keys.add(keys)
                    added = True
        self.sales |= ending - {k.sale_id for k, _ in fresh if k not in self.keys}
        return added
