"""Holds that no order will ever follow: an ACTIVE hold past its deadline in a sale that has
ended, and a PAYING hold whose order could not be written (its event dead-lettered). Their
units must come back; nothing may hold stock for good."""

from __future__ import annotations

import asyncio
import contextlib

from allocator.sale_admin import SaleAdmin
from allocator.service import AllocatorService
from flashsale.keys import SkuKeys
from flashsale.records import HoldRecord
from flashsale.settings import Settings
from reconciler.reconcile import Reconciler
from tests.pipeline import SKU, Pipeline, pipeline, provider


async def hold_of(p: Pipeline, sale: str, rid: str) -> HoldRecord:
    raw = await p.redis.hget(SkuKeys(sale, SKU).holds, rid)
    assert raw is not None
    return HoldRecord.parse(raw)


async def test_the_sweeper_expires_holds_of_a_sale_that_has_ended(stack: Settings) -> None:
    """A hold granted just before the end lives on after it; the allocator service's sweeper
    must still give its unit back when it expires."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=3, ttl=1)
        [rid] = await p.reserve(sale, ["tok_visa"])
        await SaleAdmin.build(p.pool, p.redis).set_status(sale, "end")
        await asyncio.sleep(1.1)
        stop = asyncio.Event()
        service = AllocatorService(p.settings, sweep_s=0.1)
        running = asyncio.get_running_loop().create_task(service.run(stop))
        try:
            for _ in range(50):
                if (await hold_of(p, sale, rid)).state != "ACTIVE":
                    break
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        hold = await hold_of(p, sale, rid)
        assert (hold.state, hold.cause) == ("RELEASED", "expired")
        assert (await p.counts(sale))["available"] == 3


async def test_the_reconciler_expires_an_overdue_hold_nobody_swept(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=3, ttl=1)
        [rid] = await p.reserve(sale, ["tok_visa"])
        await SaleAdmin.build(p.pool, p.redis).set_status(sale, "end")
        await asyncio.sleep(1.1)
        report = await Reconciler(p.pool, p.redis, None, p.settings.topics.order_events).run_once(
            [sale]
        )
        hold = await hold_of(p, sale, rid)
        assert (hold.state, hold.cause) == ("RELEASED", "expired")
        assert (await p.counts(sale))["available"] == 3
        assert [r.kind for r in report.repairs] == ["expire_overdue"]


async def test_a_paying_hold_whose_order_was_never_written_gives_its_unit_back(
    stack: Settings,
) -> None:
    """The order insert fails for good (a CHECK this row violates) after the hold went PAYING:
    the event is dead-lettered, and the reconciler must not leave the unit held forever."""
    async with pipeline(stack) as p:
        await p.pool.execute(
            "ALTER TABLE orders ADD CONSTRAINT test_poison_token"
            " CHECK (payment_token <> 'tok_poison') NOT VALID"
        )
        try:
            sale = await p.sale(stock=3)
            [rid] = await p.reserve(sale, ["tok_poison"])
            workers = p.start_workers(attempts=2)
            [dead] = await p.topic_messages(p.settings.topics.dead_letter, at_least=1)
            assert b"CheckViolation" in dict(dead.headers)["reason"]
            await workers.drain()
        finally:
            await p.pool.execute("ALTER TABLE orders DROP CONSTRAINT test_poison_token")
        assert (await hold_of(p, sale, rid)).state == "PAYING"
        assert await p.orders([rid]) == {}
        async with provider(p.psp_url) as psp:
            rec = Reconciler(p.pool, p.redis, psp, p.settings.topics.order_events,
                             orderless_after_s=0.2)  # fmt: skip
            await asyncio.sleep(0.3)
            report = await rec.run_once([sale])
        hold = await hold_of(p, sale, rid)
        assert hold.state == "RELEASED"
        counts = await p.counts(sale)
        assert (counts["available"], counts["paying"]) == (3, 0)
        assert [r.kind for r in report.repairs] == ["release_orderless"]
        assert rid not in p.psp.charges  # never charged: nothing to refund
