"""The reconciler racing the workers: a capture that lands between two of the reconciler's
reads must never make it release a hold whose order is PAYING or CONFIRMED.

The windows are milliseconds wide in production; here each is opened on purpose by running
the worker's steps inside the reconciler, at the point between its reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from allocator.redis_calls import read_packed
from flashsale.keys import SkuKeys
from flashsale.records import HoldRecord
from flashsale.settings import Settings
from reconciler import rebuild
from reconciler.rebuild import rebuild_sku
from reconciler.reconcile import Reconciler
from tests.pipeline import Pipeline, pipeline, provider
from workers.saga import Saga


def before_once(
    real: Callable[..., Awaitable[Any]], step: Callable[[], Awaitable[None]]
) -> Callable[..., Awaitable[Any]]:
    """``real``, with ``step`` run before its first call."""
    pending = [step]

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        while pending:
            await pending.pop()()
        return await real(*args, **kwargs)

    return wrapped


async def relayed(p: Pipeline, keys: SkuKeys) -> None:
    """The outbox entry of the reservation was published and acknowledged."""
    for _ in range(100):
        if not await p.redis.xlen(keys.outbox):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the relay did not empty the outbox")


async def test_a_confirm_between_the_reads_is_not_a_sold_counter_ahead(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler read Postgres's sold count, then the capture was confirmed (Redis, then
    Postgres), then it read Redis: Redis is one ahead of what it read from Postgres, with
    nothing in flight. That is not drift."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=2)
        rid, keys, event = await p.one_reservation(sale)
        await relayed(p, keys)
        store = p.store()
        assert (await p.holds.begin_payment(keys, rid)).ok  # the worker has begun
        await store.create([event], {rid: ("PAYING", "payment_started")})

        async def capture_confirmed() -> None:
            assert (await p.holds.confirm(keys, rid)).ok
            async with p.pool.acquire() as conn:
                await store.advance(conn, [(rid, "payment_captured")], ["PAYING"], "CONFIRMED",
                                    "order.confirmed", count_sold=True)  # fmt: skip

        monkeypatch.setattr(
            "reconciler.skus.read_packed", before_once(read_packed, capture_confirmed)
        )
        report = await Reconciler(p.pool, p.redis, None, p.settings.topics.order_events).run_once(
            [sale]
        )
        assert [r.json() for r in report.repairs if r.kind == "rebuild_sku"] == []
        assert HoldRecord.parse(await p.redis.hget(keys.holds, rid) or b"").state == "SOLD"


async def test_a_rebuild_never_releases_a_hold_sold_while_it_ran(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild releasing SOLD holds that Postgres has no order for read the orders, then the
    worker ran the whole saga (order, capture, SOLD, CONFIRMED), then it read the holds: the
    hold is SOLD and was not in the orders it read. Releasing it would sell its unit twice."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=2)
        rid, keys, event = await p.one_reservation(sale)

        async def whole_saga() -> None:
            async with provider(p.psp_url) as psp:
                assert (await Saga(p.store(), p.holds, psp).run([event])).confirmed == 1

        monkeypatch.setattr(rebuild, "_hold_map", before_once(rebuild._hold_map, whole_saga))
        done = await rebuild_sku(p.pool, p.redis, keys, release_unordered_sold=True)
        assert done.after.sold == 1 and done.after.available == 1, done
        assert HoldRecord.parse(await p.redis.hget(keys.holds, rid) or b"").state == "SOLD"
        assert (await p.orders([rid]))[rid] == "CONFIRMED"
        assert p.psp.captures[rid] == 1
