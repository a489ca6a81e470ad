"""The hold lifecycle after reserve, against real Redis: begin_payment, confirm, release,
expiry and the sweeper, one at a time and batched across SKUs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from allocator import hold_scripts, redis_calls
from allocator.hold_scripts import HoldScripts
from allocator.sweeper import run_sweeper, sweep_once
from flashsale.clients import RedisClient, redis_client
from flashsale.keys import SkuKeys
from flashsale.settings import Settings
from tests.holds import make_sku, request, reserve
from tests.pipeline import server_calls


async def test_happy_path_and_idempotent_transitions(client: RedisClient) -> None:
    sku = await make_sku(client)
    rid = (await reserve(sku, request("ivy", 2))).reservation_id
    assert rid
    begin = await sku.scripts.begin_payment(sku.keys, rid)
    assert (begin.ok, begin.state) == (True, "PAYING")
    assert (await sku.scripts.begin_payment(sku.keys, rid)).reason == "already_paying"
    confirm = await sku.scripts.confirm(sku.keys, rid)
    assert (confirm.ok, confirm.state) == (True, "SOLD")
    again = await sku.scripts.confirm(sku.keys, rid)
    assert (again.ok, again.state, again.reason) == (True, "SOLD", "already_sold")
    counts = await sku.assert_conserved()
    assert (counts["sold"], counts["paying"], counts["available"]) == (2, 0, 8)


async def test_a_paying_hold_never_expires(client: RedisClient) -> None:
    sku = await make_sku(client, ttl_ms=150)
    rid = (await reserve(sku, request("pat", 1))).reservation_id
    assert rid
    assert (await sku.scripts.begin_payment(sku.keys, rid)).ok
    await asyncio.sleep(0.2)
    assert (await sku.scripts.expire(sku.keys, 100)).expired == []
    assert await sku.hold_state(rid) == "PAYING"
    assert (await sku.scripts.confirm(sku.keys, rid)).ok
    assert await client.zcard(sku.keys.deadlines) == 0  # the sweep dropped the spent member


async def test_illegal_transitions_change_nothing(client: RedisClient) -> None:
    sku = await make_sku(client)
    released = (await reserve(sku, request("jo", 1))).reservation_id
    sold = (await reserve(sku, request("kim", 1))).reservation_id
    active = (await reserve(sku, request("lee", 1))).reservation_id
    assert released and sold and active
    assert (await sku.scripts.release(sku.keys, released, "cancelled")).ok
    assert (await sku.scripts.release(sku.keys, released, "cancelled")).reason == "already_released"
    await sku.scripts.begin_payment(sku.keys, sold)
    await sku.scripts.confirm(sku.keys, sold)
    snapshot = (await sku.counts(), await client.hgetall(sku.keys.holds), len(await sku.events()))

    cases = [
        (sku.scripts.confirm(sku.keys, released), "RELEASED", "released"),
        (sku.scripts.begin_payment(sku.keys, released), "RELEASED", "released"),
        (sku.scripts.release(sku.keys, sold, "cancelled"), "SOLD", "already_sold"),
        (sku.scripts.begin_payment(sku.keys, sold), "SOLD", "already_sold"),
        (sku.scripts.confirm(sku.keys, active), "ACTIVE", "not_paying"),
        (sku.scripts.confirm(sku.keys, "r-unknown"), "UNKNOWN", "unknown_reservation"),
    ]
    for call, state, reason in cases:
        result = await call
        assert (result.ok, result.state, result.reason) == (False, state, reason)
    assert snapshot == (
        await sku.counts(), await client.hgetall(sku.keys.holds), len(await sku.events()),
    )  # fmt: skip


async def test_release_from_paying_returns_stock(client: RedisClient) -> None:
    sku = await make_sku(client, stock=5)
    rid = (await reserve(sku, request("max", 2))).reservation_id
    assert rid
    await sku.scripts.begin_payment(sku.keys, rid)
    result = await sku.scripts.release(sku.keys, rid, "payment_failed")
    assert (result.ok, result.state) == (True, "RELEASED")
    counts = await sku.assert_conserved()
    assert (counts["available"], counts["paying"]) == (5, 0)
    assert await client.hget(sku.keys.buyers, "max") is None
    assert (await sku.events())[-1].cause == "payment_failed"


async def test_expiry_and_begin_payment_after_expiry(client: RedisClient) -> None:
    sku = await make_sku(client, stock=5, ttl_ms=40)
    swept = (await reserve(sku, request("ned", 1))).reservation_id
    late = (await reserve(sku, request("oli", 1))).reservation_id
    assert swept and late
    await asyncio.sleep(0.08)
    # begin_payment on an overdue hold refuses it and releases it, like the sweeper would.
    refused = await sku.scripts.begin_payment(sku.keys, late)
    assert (refused.ok, refused.state, refused.reason) == (False, "RELEASED", "expired")
    assert (await sku.scripts.expire(sku.keys, 100)).expired == [swept]
    assert (await sku.scripts.expire(sku.keys, 100)).expired == []  # double expiry: nothing
    assert await client.zcard(sku.keys.deadlines) == 0
    counts = await sku.assert_conserved()
    assert counts["available"] == 5
    expired = [e for e in await sku.events() if e.type == "reservation.expired"]
    assert sorted(e.reservation_id for e in expired) == sorted([swept, late])
    assert (await sku.scripts.confirm(sku.keys, late)).reason == "released"


async def test_racing_sweepers_return_each_hold_once(stack: Settings) -> None:
    clients = [redis_client(stack) for _ in range(2)]
    try:
        sku = await make_sku(clients[0], stock=300, limit=1, ttl_ms=50)
        results = await sku.scripts.reserve(sku.keys, [request(f"b{i}") for i in range(300)])
        assert all(r.outcome == "reserved" for r in results)
        await asyncio.sleep(0.1)
        a, b = await asyncio.gather(
            sweep_once(HoldScripts(clients[0]), [sku.keys], batch=7),
            sweep_once(HoldScripts(clients[1]), [sku.keys], batch=11),
        )
        assert a + b == 300
        counts = await sku.assert_conserved()
        assert (counts["available"], counts["active"]) == (300, 0)
        expired = [e for e in await sku.events() if e.type == "reservation.expired"]
        assert len({e.reservation_id for e in expired}) == len(expired) == 300
    finally:
        for c in clients:
            await c.aclose()


async def test_batched_transitions_keep_item_order_across_skus(client: RedisClient) -> None:
    a, b = await make_sku(client, stock=5), await make_sku(client, stock=5)
    ra = [request(f"a{i}") for i in range(3)]
    rb = [request(f"b{i}") for i in range(2)]
    for sku, reqs in ((a, ra), (b, rb)):
        assert all(r.outcome == "reserved" for r in await sku.scripts.reserve(sku.keys, reqs))
    scripts = a.scripts
    items = [(a.keys, ra[0].reservation_id), (b.keys, rb[0].reservation_id),
             (a.keys, ra[0].reservation_id), (a.keys, "r-missing"),
             (b.keys, rb[1].reservation_id)]  # fmt: skip
    begun = await scripts.transition("begin_payment", items)
    assert [(r.ok, r.state, r.reason) for r in begun] == [
        (True, "PAYING", "ok"), (True, "PAYING", "ok"), (True, "PAYING", "ok"),
        (False, "UNKNOWN", "unknown_reservation"), (True, "PAYING", "ok"),
    ]  # fmt: skip
    confirmed = await scripts.transition("confirm", items[:2])
    assert [r.reason for r in confirmed] == ["ok", "ok"]
    released = await scripts.transition(
        "release", [(b.keys, rb[1].reservation_id), (b.keys, rb[1].reservation_id),
                    (a.keys, ra[0].reservation_id), (a.keys, ra[1].reservation_id)],
        cause="payment_failed",
    )  # fmt: skip
    assert [(r.ok, r.state, r.reason) for r in released] == [
        (True, "RELEASED", "ok"), (True, "RELEASED", "already_released"),
        (False, "SOLD", "already_sold"), (True, "RELEASED", "ok"),
    ]  # fmt: skip
    counts_a, counts_b = await a.assert_conserved(), await b.assert_conserved()
    assert (counts_a["sold"], counts_a["active"], counts_a["available"]) == (1, 1, 3)
    assert (counts_b["sold"], counts_b["paying"], counts_b["available"]) == (1, 0, 4)
    assert [e.cause for e in await b.events() if e.type == "reservation.released"] == [
        "payment_failed"
    ]


async def test_the_sweeper_paces_thousands_of_skus_and_still_expires(stack: Settings) -> None:
    """A sale of thousands of SKUs stays in the sweeper's scope while holds can live. Each
    sweep sends one expire call per SKU, all pipelined, and sweeps are spread so that the
    scope costs at most ``visits_per_s`` calls a second; an overdue hold still comes back.
    A hold of a minute keeps its SKU swept through the window counted: with the short hold
    alone, a first visit late enough (a busy machine) found it overdue already, and the
    window saw no call at all."""
    client = redis_client(stack)
    try:
        sku = await make_sku(client, stock=3, ttl_ms=50)
        granted = (await reserve(sku, request("pat", 1))).reservation_id
        lasting = await make_sku(client, stock=1, ttl_ms=60_000)
        assert (await reserve(lasting, request("lee", 1))).reservation_id
        quiet = [SkuKeys(f"quiet-{uuid.uuid4().hex[:8]}", f"S{i}") for i in range(2000)]
        stop = asyncio.Event()
        expired: list[int] = []

        async def scope() -> list[SkuKeys]:
            return [*quiet, sku.keys, lasting.keys]

        task = asyncio.create_task(
            run_sweeper(sku.scripts, scope, stop=stop, visits_per_s=1000, on_expired=expired.append)
        )
        window_s = 4.0
        try:
            calls = await server_calls(client, ("evalsha",), after_s=1.0, window_s=window_s)
        finally:
            stop.set()
            await task
        assert 0 < calls <= 1000 * window_s + 2 * 2002, calls
        assert sum(expired) == 1
        assert (await sku.scripts.confirm(sku.keys, granted or "")).reason == "released"
        assert (await sku.assert_conserved())["available"] == 3
    finally:
        await client.aclose()


async def test_a_sweep_calls_the_expire_script_only_where_holds_are(
    client: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep sent the expire script to every SKU in scope: a live catalogue of 60,000 SKUs,
    nearly none of them reserved, cost its allocator a third of its CPU in script calls that
    found nothing. A SKU with no deadline index (no hold, or every one swept) is passed over
    after an EXISTS."""
    sku = await make_sku(client, ttl_ms=50)
    rid = (await reserve(sku, request("ned", 1))).reservation_id
    assert rid
    idle = [SkuKeys(sku.keys.sale_id, f"IDLE-{i}") for i in range(50)]
    scripts: list[int] = []
    send = redis_calls.send_packed

    async def counted(redis: RedisClient, commands: Sequence[Any], **options: Any) -> list[Any]:
        scripts.append(sum(c[0] == "EVALSHA" for c in commands))
        return await send(redis, commands, **options)

    monkeypatch.setattr(hold_scripts, "send_packed", counted)
    await asyncio.sleep(0.1)  # the hold is overdue
    assert await sweep_once(sku.scripts, [*idle, sku.keys]) == 1
    assert await sku.hold_state(rid) == "RELEASED"
    assert sum(scripts) == 1, scripts
    assert await sweep_once(sku.scripts, [*idle, sku.keys]) == 0  # its index is gone
    assert sum(scripts) == 1, scripts
