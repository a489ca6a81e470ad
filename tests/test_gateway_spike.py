"""10,000 buyers for 100 units through the HTTP gateway, with a real pump and real Redis.

Each buyer takes the real journey (join, poll at the server's pace, reserve when admitted). A
stand-in for the order pipeline confirms holds as they appear, so stock can never come back
and every loser's answer becomes a definitive ``sold_out``.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

from allocator.hold_scripts import HoldScripts
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.records import HoldRecord
from flashsale.settings import Settings
from gateway.state import CLIENTS
from tests.harness import Gateway, auth, gateway

BUYERS = 10_000
STOCK = 100


async def _buyer(gw: Gateway, sale: str, n: int, statuses: collections.Counter[int]) -> str:
    buyer = f"spike-{n}"
    token = gw.token(buyer)
    response = await gw.http.post(f"/v1/sales/{sale}/queue", headers=auth(token))
    statuses[response.status] += 1
    joined = await response.json()
    if joined["state"] == "sold_out":
        return "sold_out"
    ticket = joined["ticket"]
    while True:
        response = await gw.http.get(
            f"/v1/sales/{sale}/queue/status", headers={"X-Queue-Ticket": ticket}
        )
        statuses[response.status] += 1
        body = await response.json()
        state = body["state"]
        if state in ("sold_out", "expired"):
            return str(state)
        if state == "admitted":
            break
        await asyncio.sleep(min(body["retry_after_ms"], 200) / 1000)
    response = await gw.http.post(
        f"/v1/sales/{sale}/reservations",
        json={"sku": "SKU-1", "quantity": 1, "payment_token": "tok_ok"},
        headers={
            **auth(token),
            "X-Admission-Token": body["admission_token"],
            "Idempotency-Key": f"{buyer}-1",
        },
    )
    statuses[response.status] += 1
    answer = await response.json()
    if response.status == 201:
        return "reserved"
    assert response.status == 409, answer
    return str(answer["error"]["code"])


async def _pay_as_they_come(gw: Gateway, sale: str, stop: asyncio.Event) -> None:
    keys = SkuKeys(sale, "SKU-1")
    holds = HoldScripts(gw.app[CLIENTS].redis)
    while not stop.is_set():
        for rid, raw in (await gw.app[CLIENTS].redis.hgetall(keys.holds)).items():
            if HoldRecord.parse(raw).state == "ACTIVE":
                await holds.begin_payment(keys, rid.decode())
                await holds.confirm(keys, rid.decode())
        await asyncio.sleep(0.05)


@pytest.mark.heavy
async def test_ten_thousand_buyers_for_one_hundred_units(stack: Settings) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=STOCK, admission_rate=5000, admission_capacity=500)
        gw.pump(sale)
        stop = asyncio.Event()
        payer = asyncio.get_running_loop().create_task(_pay_as_they_come(gw, sale, stop))
        statuses: collections.Counter[int] = collections.Counter()
        gate = asyncio.Semaphore(256)

        async def one(n: int) -> str:
            async with gate:
                return await _buyer(gw, sale, n, statuses)

        outcomes = collections.Counter(
            await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(BUYERS))), 240)
        )
        stop.set()
        await payer

        redis = gw.app[CLIENTS].redis
        counters = ("available", "active", "paying", "sold")
        stock = [int(v) for v in await redis.hmget(SkuKeys(sale, "SKU-1").stock, *counters)]
        assert outcomes["reserved"] == STOCK, outcomes
        assert outcomes["sold_out"] == BUYERS - STOCK, outcomes
        assert stock == [0, 0, 0, STOCK]
        assert not [s for s in statuses if s >= 500], statuses

        # No reservation without admission: every hold names a claimed, admitted position.
        serving = int(await redis.hget(SaleKeys(sale).queue, "serving"))
        claims: dict[int, Any] = {
            int(score): member
            for member, score in await redis.zrange(SaleKeys(sale).claims, 0, -1, withscores=True)
        }
        holds = await redis.hgetall(SkuKeys(sale, "SKU-1").holds)
        assert len(holds) == STOCK
        for raw in holds.values():
            hold = HoldRecord.parse(raw)
            position = int(hold.admission_id)
            assert 1 <= position <= serving
            assert claims[position].decode().split("\x1f")[1] == hold.idempotency_key
