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


@pytest.mark.parametrize("lost", [False, True], ids=["corrupt", "lost"])
async def test_a_pause_during_a_rebuild_is_not_undone_by_it(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, lost: bool
) -> None:
    """A rebuild wrote the SKU's configuration as it read it at its start: a sale paused
    while a SKU was being rebuilt (its holds rewritten, or a lost SKU's) had that SKU
    reopened active, selling until the next pass. The configuration is read again, under
    the sale's row, when the SKU reopens."""
    from allocator.repair_scripts import RepairScripts
    from allocator.sale_admin import SaleAdmin

    async with pipeline(stack) as p:
        sale = await p.sale(stock=5)
        keys = SkuKeys(sale, "SKU-1")

        async def pause() -> None:
            await SaleAdmin.build(p.pool, p.redis).set_status(sale, "pause", with_skus=False)

        name = "begin_many" if lost else "begin"
        monkeypatch.setattr(RepairScripts, name, before_once(getattr(RepairScripts, name), pause))
        if lost:
            await p.redis.delete(*keys.all())
            rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
            report = await rec.run_once([sale])
            assert [r.kind for r in report.repairs] == ["rebuild_sku"], report
        else:
            await p.redis.hset(keys.stock, "available", 99)
            await rebuild_sku(p.pool, p.redis, keys)
        assert await p.redis.hget(keys.meta, "status") in (b"paused", "paused")


async def test_a_pause_while_a_lost_sale_hash_is_restored_is_kept(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis lost a sale's hash; the pass read the sale from Postgres, the sale was paused,
    and the pass wrote the hash back active: the waiting room went on admitting a paused
    sale's buyers, and no pass compares that status again. The hash is written back under
    the sale's row: the pause waits for it, then writes its own status."""
    from allocator.sale_admin import SaleAdmin
    from allocator.sale_scripts import SaleScripts
    from flashsale.keys import SaleKeys

    async with pipeline(stack) as p:
        sale = await p.sale(stock=5)
        pausing: list[asyncio.Future[Any]] = []

        async def pause_meanwhile() -> None:  # under way while the pass writes the hash
            pausing.append(
                asyncio.ensure_future(
                    SaleAdmin.build(p.pool, p.redis).set_status(sale, "pause", with_skus=False)
                )
            )
            await asyncio.sleep(0.3)

        monkeypatch.setattr(
            SaleScripts, "put_sale", before_once(SaleScripts.put_sale, pause_meanwhile)
        )
        await p.redis.delete(SaleKeys(sale).sale)
        rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        report = await rec.run_once([sale])
        assert "restore_sale" in [r.kind for r in report.repairs], report
        await pausing[0]
        assert await p.redis.hget(SaleKeys(sale).sale, "status") in (b"paused", "paused")
