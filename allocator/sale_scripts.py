"""Bindings of the sale-configuration scripts: preload a SKU, copy a sale's status (with its
pauses) or admission rate, put the sale hash (``lua/preload.lua``,
``lua/set_status.lua``, ``lua/set_fields.lua``, ``lua/put_sale.lua``), and the read of SKU
counters that sale status shows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

from redis.commands.core import AsyncScript

from allocator.redis_calls import Command, lua_script, read_packed, send_packed
from flashsale.clients import RedisClient
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.records import integer, text

PreloadOutcome = Literal[
    "loaded", "unchanged", "refused_committed", "refused_below_committed", "refused_lost"
]
STOCK_FIELDS = ("total", "available", "active", "paying", "sold")


class SkuRule(NamedTuple):
    """What the reservation route checks a request against: the per-buyer limit, and the
    number of stock buckets the SKU is split into."""

    limit: int
    buckets: int = 1


@dataclass(frozen=True, slots=True)
class StockCounts:
    total: int
    available: int
    active: int
    paying: int
    sold: int

    @property
    def held(self) -> int:
        return self.active + self.paying

    def __add__(self, other: StockCounts) -> StockCounts:
        return StockCounts(self.total + other.total, self.available + other.available,
                           self.active + other.active, self.paying + other.paying,
                           self.sold + other.sold)  # fmt: skip


def summed(counts: Sequence[StockCounts | None]) -> StockCounts | None:
    """The counters of a SKU's buckets added up; None when Redis lacks any of them."""
    if not counts or any(c is None for c in counts):
        return None
    total = counts[0]
    for c in counts[1:]:
        total = total + c  # type: ignore[operator]
    return total


class Preload(NamedTuple):
    """One SKU (or stock bucket) to preload: see :meth:`SaleScripts.preload`."""

    keys: SkuKeys
    total: int | None
    meta: dict[str, str]
    first: bool


@dataclass(frozen=True, slots=True)
class PreloadResult:
    sku: str
    outcome: PreloadOutcome
    counts: StockCounts


def _preload_result(keys: SkuKeys, raw: list[bytes]) -> PreloadResult:
    outcome = cast(PreloadOutcome, text(raw[0]))
    return PreloadResult(keys.sku, outcome, StockCounts(*(int(v) for v in raw[1:6])))


def archived_keys(keys: SkuKeys | SaleKeys) -> tuple[str, ...]:
    """The keys archiving deletes: a stock bucket's per-buyer state, or a waiting room's."""
    if isinstance(keys, SaleKeys):
        return (keys.members, keys.steps, keys.claims)
    return (keys.holds, keys.deadlines, keys.buyers, keys.idem, keys.received)


class SaleScripts:
    """The sale-configuration scripts registered on one client."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._preload: AsyncScript = lua_script(client, "preload")
        self._set_fields: AsyncScript = lua_script(client, "set_fields")
        self._set_status: AsyncScript = lua_script(client, "set_status")
        self._put_sale: AsyncScript = lua_script(client, "put_sale")
        self._retire: AsyncScript = lua_script(client, "retire")
        self._archive: AsyncScript = lua_script(client, "archive")

    async def preload(
        self, keys: SkuKeys, *, total: int | None, meta: dict[str, str], force: bool, first: bool
    ) -> PreloadResult:
        """Load the SKU's configuration and stock (see ``lua/preload.lua``); ``total`` None
        keeps the stock as it is (a stock bucket once loaded). ``first``: the SKU was never
        preloaded; otherwise a SKU missing from Redis is refused (``refused_lost``): the
        reconciler rebuilds it from Postgres."""
        [result] = await self.preload_many([Preload(keys, total, meta, first)], force=force)
        return result

    async def preload_many(self, skus: Sequence[Preload], *, force: bool) -> list[PreloadResult]:
        """:meth:`preload` of each of ``skus``, one script call each (each SKU atomic), sent
        pipelined and packed in C: one round trip per node rather than per SKU. Through
        redis-py, packing the calls one by one cost a 100,000-SKU sale about 30 s."""
        commands: list[Command] = []
        for sku in skus:
            command: list[str | int] = [
                "EVALSHA", self._preload.sha, 2, sku.keys.meta, sku.keys.stock,
                "1" if force else "0", "" if sku.total is None else sku.total,
                "1" if sku.first else "0",
            ]  # fmt: skip
            for name, value in sku.meta.items():
                command += [name, value]
            commands.append(tuple(command))
        replies = await send_packed(self.client, commands, script=self._preload)
        return [_preload_result(sku.keys, raw) for sku, raw in zip(skus, replies, strict=True)]

    async def closed(self, keys: SaleKeys) -> tuple[bool, int | None]:
        """Whether the sale's waiting room has found it sold out (nothing left, nothing held)
        and told its buyers so, and its cutoff when the queue has reached it (every new buyer
        is told it is sold out: ``lua/join.lua``). Neither ever turns back: the cutoff only
        moves back, sold out only turns on (``lua/advance.lua``)."""
        sold_out, tail, cutoff = await self.client.hmget(keys.queue, "sold_out", "tail", "cutoff")
        last = integer(cutoff, -1)
        return sold_out == b"1", last if 0 <= last <= integer(tail) else None

    async def set_status(self, keys: SaleKeys, status: str) -> bool:
        """A sale's status on its sale hash, keeping its pauses (``lua/set_status.lua``);
        False when the sale is not preloaded."""
        return bool(await self._set_status(keys=[keys.sale], args=[status]))

    async def set_fields(self, key: str, fields: dict[str, str]) -> bool:
        """Write ``fields`` on a hash that preload created; False when there is none."""
        [written] = await self.set_fields_many([(key, fields)])
        return written

    async def set_fields_many(self, writes: Sequence[tuple[str, dict[str, str]]]) -> list[bool]:
        """:meth:`set_fields` on each hash of ``writes``, pipelined and packed in C: pausing
        a sale of 100,000 SKUs took 18 s one call at a time, while its SKUs went on selling."""
        commands: list[Command] = [
            ("EVALSHA", self._set_fields.sha, 1, key,
             *(item for pair in fields.items() for item in pair))
            for key, fields in writes
        ]  # fmt: skip
        return [bool(r) for r in await send_packed(self.client, commands, script=self._set_fields)]

    async def retire(self, keys: SkuKeys) -> str:
        """Delete a SKU's keys if it was never reserved (see ``lua/retire.lua``)."""
        every = [keys.meta, keys.stock, keys.holds, keys.deadlines, keys.buyers, keys.idem,
                 keys.outbox, keys.transfers]  # fmt: skip
        return text(await self._retire(keys=every))

    async def archive_many(self, buckets: Sequence[SkuKeys], *, check: bool = False) -> list[str]:
        """Delete what only a running sale needs from each stock bucket of ``buckets``
        (:func:`archived_keys`), once the sale ended (see ``lua/archive.lua``; ``check``: only
        say whether it would): one script call each, pipelined and packed."""
        mode = "check" if check else "run"
        commands: list[Command] = [
            ("EVALSHA", self._archive.sha, 9, k.meta, k.stock, k.outbox, k.transfers,
             *archived_keys(k), "sku", mode)
            for k in buckets
        ]  # fmt: skip
        return [text(r) for r in await send_packed(self.client, commands, script=self._archive)]

    async def archive_room(self, keys: SaleKeys) -> str:
        """:meth:`archive_many` for the sale's waiting room."""
        return text(
            await self._archive(keys=[keys.sale, *archived_keys(keys)], args=["room", "run"])
        )

    async def put_sale(
        self, keys: SaleKeys, fields: dict[str, str], *, open_queue: bool = False
    ) -> int:
        """Replace the sale hash; ``open_queue`` (the first preload) marks the waiting room
        live (see ``lua/put_sale.lua``)."""
        args: list[str] = ["1" if open_queue else "0"]
        for name, value in fields.items():
            args += [name, value]
        return int(await self._put_sale(keys=[keys.sale, keys.queue], args=args))

    async def sku_limits(self, keys: SaleKeys) -> dict[str, SkuRule] | None:
        """The sale's SKUs, their per-buyer limits and stock buckets as preload copied them
        (two round trips); None when Redis has no sale hash for it."""
        listed = await self.client.hget(keys.sale, "skus")
        if listed is None:
            return None
        skus = [s for s in text(listed).split(",") if s]
        reads = [("HMGET", SkuKeys(keys.sale_id, sku).meta, "per_buyer_limit", "buckets")
                 for sku in skus]  # fmt: skip
        rules = await read_packed(self.client, reads) if skus else []
        return {sku: SkuRule(integer(limit, 1), integer(buckets, 1))
                for sku, (limit, buckets) in zip(skus, rules, strict=True)}  # fmt: skip

    async def stock(self, skus: Sequence[SkuKeys]) -> list[StockCounts | None]:
        """Every SKU's counters in one round trip (packed in C: a sale may have thousands of
        SKUs); None for a SKU Redis does not hold."""
        if not skus:
            return []
        rows = await read_packed(self.client, [("HMGET", keys.stock, *STOCK_FIELDS)
                                               for keys in skus])  # fmt: skip
        return [None if row[1] is None else StockCounts(*(integer(v) for v in row))
                for row in rows]  # fmt: skip
