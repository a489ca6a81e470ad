"""Typed bindings of the Lua scripts in ``lua/``: loaded once per client, called by EVALSHA.

redis-py's ``register_script`` sends EVALSHA and falls back to loading the script on NOSCRIPT,
so a Redis restart or ``SCRIPT FLUSH`` is survived transparently.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from flashsale.keys import SaleKeys, SkuKeys

PreloadOutcome = Literal["loaded", "unchanged", "refused_committed", "refused_below_committed"]


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return importlib.resources.files("lua").joinpath(f"{name}.lua").read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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


@dataclass(frozen=True, slots=True)
class PreloadResult:
    sku: str
    outcome: PreloadOutcome
    counts: StockCounts


class Scripts:
    """The engine's scripts registered on one client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._preload: AsyncScript = client.register_script(source("preload"))
        self._set_status: AsyncScript = client.register_script(source("set_status"))
        self._put_sale: AsyncScript = client.register_script(source("put_sale"))

    async def preload(
        self, keys: SkuKeys, *, total: int, meta: dict[str, str], force: bool
    ) -> PreloadResult:
        args: list[str | int] = ["1" if force else "0", total]
        for name, value in meta.items():
            args += [name, value]
        raw = await self._preload(keys=[keys.meta, keys.stock], args=args)
        outcome = _text(raw[0])
        counts = StockCounts(*(int(v) for v in raw[1:6]))
        return PreloadResult(keys.sku, outcome, counts)  # type: ignore[arg-type]

    async def set_status(self, key: str, status: str) -> bool:
        return bool(await self._set_status(keys=[key], args=[status]))

    async def put_sale(self, keys: SaleKeys, fields: dict[str, str]) -> int:
        args: list[str] = []
        for name, value in fields.items():
            args += [name, value]
        return int(await self._put_sale(keys=[keys.sale], args=args))
