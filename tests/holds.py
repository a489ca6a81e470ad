"""A preloaded SKU for tests of the hold scripts, and the requests they make."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from allocator.hold_scripts import HoldScripts, ReserveRequest
from allocator.sale_scripts import SaleScripts
from flashsale.clients import RedisClient
from flashsale.events import ReservationEvent, outbox_events
from flashsale.keys import SkuKeys
from flashsale.records import SEP, HoldRecord, ReserveResult, text


@dataclass
class Sku:
    keys: SkuKeys
    scripts: HoldScripts
    client: RedisClient

    async def counts(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.keys.stock)
        return {text(k): int(v) for k, v in raw.items()}

    async def assert_conserved(self) -> dict[str, int]:
        c = await self.counts()
        assert c["total"] == c["available"] + c["active"] + c["paying"] + c["sold"], c
        assert min(c.values()) >= 0, c
        return c

    async def hold_state(self, reservation_id: str) -> str:
        raw = await self.client.hget(self.keys.holds, reservation_id)
        assert raw is not None
        return HoldRecord.parse(raw).state

    async def events(self) -> list[ReservationEvent]:
        entries: Any = await self.client.xrange(self.keys.outbox)
        return [event for _, fields in entries for event in outbox_events(fields)]

    async def deadline_index(self) -> dict[str, float]:
        """reservation id -> indexed deadline (the index keeps one member per batch)."""
        members: Any = await self.client.zrange(self.keys.deadlines, 0, -1, withscores=True)
        return {rid: score for member, score in members for rid in text(member).split(SEP)}


async def make_sku(
    client: RedisClient,
    *,
    stock: int = 10,
    limit: int = 2,
    ttl_ms: int = 60_000,
    starts_in_ms: int = -60_000,
    ends_in_ms: int = 3_600_000,
    status: str = "active",
) -> Sku:
    keys = SkuKeys(f"sale-{uuid.uuid4().hex[:10]}", "SKU-1")
    now = int(time.time() * 1000)
    meta = {
        "sale_id": keys.sale_id, "sku": keys.sku, "price": "1500", "currency": "EUR",
        "per_buyer_limit": str(limit), "hold_ttl_ms": str(ttl_ms),
        "starts_at_ms": str(now + starts_in_ms), "ends_at_ms": str(now + ends_in_ms),
        "status": status,
    }  # fmt: skip
    await SaleScripts(client).preload(keys, total=stock, meta=meta, force=False, first=True)
    return Sku(keys, HoldScripts(client), client)


def request(buyer: str = "b1", qty: int = 1, key: str | None = None) -> ReserveRequest:
    return ReserveRequest(
        reservation_id=f"r-{uuid.uuid4().hex}",
        buyer_id=buyer,
        quantity=qty,
        idempotency_key=key or uuid.uuid4().hex,
        payment_ref="tok_ok",
        admission_id=f"adm-{buyer}",
    )


async def reserve(sku: Sku, req: ReserveRequest) -> ReserveResult:
    [result] = await sku.scripts.reserve(sku.keys, [req])
    return result


def single_node_only(client: Any) -> None:
    """The admission gate touches a sale's keys and a SKU's in one script: a single Redis node
    only. On a cluster the gateway claims first (tests/test_gateway_queue.py runs there)."""
    if isinstance(client, aioredis.RedisCluster):
        pytest.skip("the admission gate runs on a single Redis node only")
