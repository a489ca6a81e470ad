"""One item that cannot be repaired must not stop a reconcile pass: the other repairs are made
and recorded, the failure is reported, the next pass tries it again, and the service goes on."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from allocator.sale_admin import SaleAdmin
from flashsale.errors import NotFound, PaymentError, PaymentUnknown
from flashsale.kafka import LagReader
from flashsale.keys import SkuKeys
from flashsale.payments import Charge, ChargeRequest, PaymentProvider
from flashsale.records import text
from flashsale.sales import fetch_in_play
from flashsale.settings import Settings
from reconciler import service
from reconciler import skus as skus_module
from reconciler.rebuild import rebuild_sku
from reconciler.reconcile import Reconciler
from reconciler.report import PassReport
from tests.harness import calls_to
from tests.pipeline import SKU, Pipeline, pipeline, provider


class RefundsFail:
    """A provider whose refunds never get a definite answer; everything else goes through."""

    def __init__(self, inner: PaymentProvider) -> None:
        self.inner = inner

    async def charge(self, key: str, amount: int, currency: str, token: str) -> Charge:
        return await self.inner.charge(key, amount, currency, token)

    async def charge_many(self, requests: Sequence[ChargeRequest]) -> list[Charge | PaymentError]:
        return await self.inner.charge_many(requests)

    async def refund(self, key: str) -> Charge:
        raise PaymentUnknown(f"refund {key}: the provider answered 500")

    async def lookup(self, key: str) -> Charge | None:
        return await self.inner.lookup(key)

    async def list_charges(
        self, prefix: str, after: str | None = None, limit: int = 100
    ) -> tuple[list[Charge], bool]:
        return await self.inner.list_charges(prefix, after, limit)


async def corrupt(p: Pipeline, sale: str) -> None:
    await p.redis.hset(SkuKeys(sale, SKU).stock, "available", 99)


async def recorded(p: Pipeline, sale: str) -> list[str]:
    rows = await p.pool.fetch("SELECT kind FROM reconcile_events WHERE sale_id = $1", sale)
    return [r["kind"] for r in rows]


@contextlib.asynccontextmanager
async def serving(
    stack: Settings, sales: list[str], started: Callable[[], bool]
) -> AsyncIterator[asyncio.Task[None]]:
    """The reconciler service over ``sales`` (a pass every 0.05 s), from when ``started()``
    says its first passes ran until the block ends."""
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(service.serve(
        stack, stop, interval=0.05, stuck_after_s=60, ops_port=None, host="", sales=sales,
    ))  # fmt: skip
    try:
        for _ in range(200):
            if started() or task.done():
                break
            await asyncio.sleep(0.05)
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_refund_that_fails_does_not_stop_the_pass(stack: Settings) -> None:
    async with pipeline(stack) as p, provider(p.psp_url) as psp:
        orphaned, drifted = await p.sale(stock=5), await p.sale(stock=5)
        await psp.charge(f"{orphaned}~{SKU}~r-ghost", 1500, "EUR", "tok_visa")  # no order
        await corrupt(p, drifted)
        rec = Reconciler(p.pool, p.redis, RefundsFail(psp), p.settings.topics.order_events)
        report = await rec.run_once([orphaned, drifted])
        assert [r.kind for r in report.repairs] == ["rebuild_sku"]
        assert await recorded(p, drifted) == ["rebuild_sku"]
        assert any("r-ghost" in line and "500" in line for line in report.unresolved)
        assert (await p.counts(drifted))["available"] == 5


async def test_a_sku_that_cannot_be_rebuilt_does_not_stop_the_others(stack: Settings) -> None:
    async with pipeline(stack) as p:
        broken, drifted = await p.sale(stock=5), await p.sale(stock=5)
        await p.redis.hset(SkuKeys(broken, SKU).holds, "r-garbled", "ACTIVE\x1fnot a number")
        await corrupt(p, broken)
        await corrupt(p, drifted)
        rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        report = await rec.run_once([broken, drifted])
        assert [(r.kind, r.sale_id) for r in report.repairs] == [("rebuild_sku", drifted)]
        assert any(broken in line and "malformed" in line for line in report.unresolved)
        assert (await p.counts(drifted))["available"] == 5
        # The broken SKU stays closed (never reopened on counters nobody could check), and
        # the next pass takes it up again first.
        again = await rec.run_once([broken])
        assert any(broken in line for line in again.unresolved)


async def test_the_service_keeps_to_the_sales_it_is_given(stack: Settings) -> None:
    """``flashsale reconcile --sale A`` (the service, without ``--once``) repairs sale A and
    leaves every other sale alone, as ``--once`` does."""
    async with pipeline(stack) as p:
        mine, other = await p.sale(stock=5), await p.sale(stock=5)
        await corrupt(p, mine)
        await corrupt(p, other)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(service.serve(
            stack, stop, interval=0.05, stuck_after_s=60, ops_port=None, host="",
            sales=[mine],
        ))  # fmt: skip
        try:
            for _ in range(400):
                if await recorded(p, mine) or task.done():
                    break
                await asyncio.sleep(0.05)
            assert await recorded(p, mine) == ["rebuild_sku"], task
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        assert await recorded(p, other) == []
        assert (await p.counts(other))["available"] == 99
        with pytest.raises(NotFound, match="unknown sale 'sale-nope'"):
            await service.serve(stack, asyncio.Event(), interval=0.05, stuck_after_s=60,
                                ops_port=None, host="", sales=[mine, "sale-nope"])  # fmt: skip


async def test_the_service_outlives_a_pass_that_raises(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[str] = []
    run_once = Reconciler.run_once

    async def first_one_raises(self: Reconciler, *args: Any, **kwargs: Any) -> Any:
        passes.append("pass")
        if len(passes) == 1:
            raise ValueError("a bug nobody foresaw")
        return await run_once(self, *args, **kwargs)

    monkeypatch.setattr(Reconciler, "run_once", first_one_raises)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        service.serve(stack, stop, interval=0.05, stuck_after_s=60, ops_port=None, host="")
    )
    try:
        for _ in range(1200):  # a pass covers every sale in scope on the shared stack
            if len(passes) >= 3 or task.done():
                break
            await asyncio.sleep(0.05)
        assert not task.done(), task.exception()
        assert len(passes) >= 3
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)


async def test_lost_skus_are_rebuilt_several_at_a_time(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass rebuilt lost SKUs one after the other, each in several round trips to Redis and
    Postgres: a sale of 100,000 SKUs that Redis lost took 3 min 23 s to rebuild, every
    reservation meanwhile answered ``unavailable``. Rebuilds now run several at a time."""
    running, most = 0, 0

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.05)
            return await rebuild_sku(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr("reconciler.skus.rebuild_sku", counted)
    async with pipeline(stack) as p:
        sales = [await p.sale(stock=5) for _ in range(6)]
        for sale in sales:
            await corrupt(p, sale)
        rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        report = await rec.run_once(sales)
        assert [(r.kind, r.sale_id) for r in report.repairs] == [
            ("rebuild_sku", sale) for sale in sorted(sales)
        ]
        assert [(await p.counts(sale))["available"] for sale in sales] == [5] * 6
        assert most > 1


async def test_lost_skus_of_a_sale_are_rebuilt_together(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each lost SKU was rebuilt on its own, in three queries and three Redis round trips: a
    catalogue sale of 100,000 SKUs that Redis lost took 3 min 15 s, every reservation
    meanwhile answered ``unavailable``. Those never reserved are now rebuilt together; a SKU
    with orders is still rebuilt on its own, its holds written from them."""
    alone = calls_to(monkeypatch, "reconciler.skus.rebuild_sku")  # (pool, client, keys)
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5, skus=40)
        skus = [f"SKU-{i}" for i in range(1, 41)]
        ids = await p.reserve(sale, ["tok_visa", "tok_decline", "tok_visa"])
        p.start_workers()
        await p.wait_terminal(ids)
        before = [await p.redis.hgetall(SkuKeys(sale, sku).stock) for sku in skus]
        for sku in skus:
            await p.redis.unlink(*SkuKeys(sale, sku).all())
        rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        report = await rec.run_once([sale])
        assert not report.unresolved, report.unresolved
        assert sorted(r.sku or "" for r in report.repairs if r.kind == "rebuild_sku") == sorted(
            skus
        )
        assert [keys.sku for _, _, keys in alone] == [SKU]
        assert [await p.redis.hgetall(SkuKeys(sale, sku).stock) for sku in skus] == before
        assert (await p.counts(sale))["sold"] == 2
        assert (await rec.run_once([sale])).repairs == []  # nothing left to repair


async def test_an_ended_sales_untouched_skus_are_read_once(stack: Settings) -> None:
    """Once the sale ended, a SKU nobody held or bought cannot change: the service's passes
    read it once, then only the others (the sale stays in scope for its orders)."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5, skus=3)
        await p.reserve(sale, ["tok_visa"])  # SKU-1 is held; SKU-2 and SKU-3 are untouched
        rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        rec.slow_every_s = 0  # the orphan-hold check at every pass
        orphan_checks: list[list[str]] = []
        held = rec.orphans._held

        async def spied(skus: Sequence[SkuKeys]) -> tuple[list[SkuKeys], list[SkuKeys]]:
            orphan_checks.append(sorted(k.sku for k in skus))
            return await held(skus)

        rec.orphans._held = spied  # type: ignore[method-assign]
        for _ in range(2):  # a live sale's SKUs are read at every pass
            assert (await rec.run_once([sale], full=False)).skus == 3
        await SaleAdmin.build(p.pool, p.redis).set_status(sale, "end")
        orphan_checks.clear()
        reports = [await rec.run_once([sale], full=False) for _ in range(3)]
        assert [r.skus for r in reports] == [3, 1, 1]  # the settled SKUs are read no more
        # nor are they searched for orphan holds, from the pass that found them settled on
        assert orphan_checks and all(c == [SKU] for c in orphan_checks), orphan_checks
        fresh = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        assert (await fresh.run_once([sale])).skus == 3
        await p.redis.hset(SkuKeys(sale, SKU).stock, "available", 0)  # SKU-1 still read
        repaired = await rec.run_once([sale], full=False)
        assert [r.sku for r in repaired.repairs] == [SKU]


async def test_an_ended_sale_whose_skus_are_all_settled_is_not_read_again(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ended sale nobody bought from stays in scope for 15 minutes. Its SKUs were known
    settled after one pass, yet each of the service's passes over it fetched every SKU row
    from Postgres to leave them out (about 0.4 s for 100,000 SKUs, every 5 s, in the pass
    the small sales share). Its rows are not fetched again; its other checks still run."""
    fetched: list[list[str]] = []
    fetch = fetch_in_play

    async def spied(pool: Any, sql: str, *args: Any) -> Any:
        rows = await fetch(pool, sql, *args)
        if sql == skus_module.SCOPE_OF:
            fetched.append(sorted({r["sale_id"] for r in rows}))
        return rows

    monkeypatch.setattr(skus_module, "fetch_in_play", spied)
    async with pipeline(stack) as p:
        quiet, busy = await p.sale(stock=5, skus=3), await p.sale(stock=5)
        await p.reserve(busy, ["tok_visa"])
        rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        await SaleAdmin.build(p.pool, p.redis).set_status(quiet, "end")

        async def turn() -> PassReport:
            sizes = await rec.skus.sizes([quiet, busy])
            return await rec.run_once([quiet, busy], full=False, only=list(sizes))

        first = await turn()  # finds the quiet sale's SKUs settled
        assert first.skus == 4 and fetched == [sorted([busy, quiet])]
        fetched.clear()
        rooms = rec.rooms.repair
        checked: list[list[str]] = []

        async def rooms_spied(sales: Sequence[str], *args: Any, **kwargs: Any) -> None:
            checked.append(sorted(sales))
            await rooms(sales, *args, **kwargs)

        rec.rooms.repair = rooms_spied  # type: ignore[method-assign]
        later = [await turn() for _ in range(2)]
        assert [r.skus for r in later] == [1, 1]
        assert fetched == [[busy], [busy]], fetched  # the quiet sale's rows: not fetched
        assert checked == [sorted([busy, quiet])] * 2  # its waiting room: still checked


async def test_a_large_sale_in_scope_does_not_slow_the_repairs_of_a_small_one(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service waited between passes as long as its budget of SKU reads asked for the
    whole scope: beside a 200,000-SKU catalogue sale, 100 s, and a hot sale whose SKU Redis
    lost answered "unavailable" that long. Each sale now takes its turn at its own pace."""
    monkeypatch.setattr(service, "SKUS_PER_S", 200.0)  # the large sale: a turn every 3 s
    passes: list[PassReport] = []
    run_once = Reconciler.run_once

    async def counted(self: Reconciler, *args: Any, **kwargs: Any) -> Any:
        passes.append(await run_once(self, *args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(Reconciler, "run_once", counted)
    async with pipeline(stack) as p:
        large, small = await p.sale(stock=5, skus=600), await p.sale(stock=5)
        async with serving(stack, [large, small], lambda: bool(passes)) as task:
            await corrupt(p, small)
            await asyncio.sleep(1.0)
            assert await recorded(p, small) == ["rebuild_sku"], task
        assert passes[0].skus == 601 and all(p.skus == 1 for p in passes[1:]), passes


async def test_a_small_sale_has_its_passes_while_a_large_sales_pass_runs(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass over a 100,000-SKU sale takes about 2.6 s here, and a small sale due with it
    had its repairs made at the end of it: a SKU Redis lost stayed "unavailable" up to 6.6 s
    with passes every 5 s. A large sale's pass now runs beside the small sales' ones."""
    monkeypatch.setattr(service, "SKUS_PER_S", 200.0)  # the large sale: a turn every 3 s
    monkeypatch.setattr(service, "LARGE_SALE", 100, raising=False)
    small_passes: list[float] = []
    large_passes: list[float] = []
    run_once = Reconciler.run_once

    async def slowed(self: Reconciler, *args: Any, **kwargs: Any) -> Any:
        only = kwargs.get("only") or []
        if large in only:
            await asyncio.sleep(1.5)  # reading the large sale's SKUs
        report = await run_once(self, *args, **kwargs)
        loop = asyncio.get_running_loop()
        (large_passes if large in only else small_passes).append(loop.time())
        if small in only and large in only:
            small_passes.append(loop.time())
        return report

    monkeypatch.setattr(Reconciler, "run_once", slowed)
    async with pipeline(stack) as p:
        large, small = await p.sale(stock=5, skus=600), await p.sale(stock=5)
        async with serving(stack, [large, small], lambda: bool(small_passes)) as task:
            await asyncio.sleep(4.0)
            assert await recorded(p, small) == [], task  # nothing to repair
            await corrupt(p, small)
            await asyncio.sleep(0.5)
            assert await recorded(p, small) == ["rebuild_sku"], task
    assert len(large_passes) >= 2, large_passes  # the large sale had its turns
    gaps = [b - a for a, b in itertools.pairwise(small_passes)]
    assert max(gaps) < 0.5, gaps  # and the small one its own meanwhile


async def test_a_pause_during_a_pass_is_not_undone_by_it(stack: Settings) -> None:
    """A pass compared each SKU's status in Redis with the sale's status in Postgres as the
    pass read it at its start: a sale paused between the two reads had its SKUs written
    back active by the pass, and they sold until the next pass. A status is written as
    Postgres has it when it is written, under the sale's lock."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5, skus=3)
        rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        find = rec.skus.find

        async def paused_meanwhile(rows: Any) -> Any:
            await SaleAdmin.build(p.pool, p.redis).set_status(sale, "pause", with_skus=False)
            return await find(rows)

        rec.skus.find = paused_meanwhile  # type: ignore[method-assign]
        assert not [r for r in (await rec.run_once([sale])).repairs if r.kind == "status"]
        metas = [await p.redis.hget(SkuKeys(sale, f"SKU-{i}").meta, "status") for i in (1, 2, 3)]
        assert [text(m) for m in metas] == ["paused"] * 3, metas
        # A status that did drift is written back, and recorded.
        rec.skus.find = find  # type: ignore[method-assign]
        await p.redis.hset(SkuKeys(sale, "SKU-2").meta, "status", "active")
        report = await rec.run_once([sale])
        assert [(r.kind, r.sku, r.before, r.after) for r in report.repairs] == [
            ("status", "SKU-2", {"status": "active"}, {"status": "paused"})]  # fmt: skip
        assert text(await p.redis.hget(SkuKeys(sale, "SKU-2").meta, "status")) == "paused"


async def test_a_sales_list_of_skus_in_redis_is_put_back_in_line_with_postgres(
    stack: Settings,
) -> None:
    """The gateway checks a reservation's SKU against the sale's list of SKUs in Redis,
    written by preload, by a SKU's removal and by a restored sale hash; nothing compared it
    with Postgres, so a list left wrong (a removal whose commit failed after it wrote the
    list, an older version of the engine) stayed wrong. A pass compares the list's version
    with Postgres's (``sales.skus_version``) and writes it again, of the preloaded SKUs."""
    from flashsale.keys import SaleKeys

    async with pipeline(stack) as p:
        sale = await p.sale(stock=5, skus=3)
        key = SaleKeys(sale).sale
        rec = Reconciler(p.pool, p.redis, None, p.settings.topics.order_events)
        assert [r.kind for r in (await rec.run_once([sale])).repairs] == []  # in line
        await p.redis.hset(key, mapping={"skus": "SKU-1,SKU-9", "skus_version": "-1"})
        report = await rec.run_once([sale])
        assert [r.kind for r in report.repairs] == ["relist_skus"], report
        assert text(await p.redis.hget(key, "skus")) == "SKU-1,SKU-2,SKU-3"
        assert [r.kind for r in (await rec.run_once([sale])).repairs] == []  # once
        # A SKU imported and not preloaded yet is not listed: it cannot be reserved yet.
        await p.pool.execute(
            "INSERT INTO sale_skus (sale_id, sku, title, stock_total, price, currency,"
            " per_buyer_limit, hold_ttl_seconds) VALUES ($1, 'SKU-4', 'New', 5, 100, 'EUR', 1,"
            " 120)", sale)  # fmt: skip
        assert [r.kind for r in (await rec.run_once([sale])).repairs] == []  # nothing to list
        assert text(await p.redis.hget(key, "skus")) == "SKU-1,SKU-2,SKU-3"
        version = await p.pool.fetchval("SELECT skus_version FROM sales WHERE id = $1", sale)
        assert text(await p.redis.hget(key, "skus_version")) == str(version)  # taken


async def test_the_broker_is_read_once_a_second_however_often_the_passes_run(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service read the workers' lag and the dead letters from the broker before each
    turn of its loop: with passes every 50 ms (or many sales due one after another), twenty
    readings a second of what Prometheus scrapes every 15 s."""
    readings: list[float] = []
    passes: list[float] = []
    read, run_once = LagReader.read, Reconciler.run_once

    async def counted_read(self: LagReader, topic: str) -> int:
        readings.append(time.monotonic())
        return await read(self, topic)

    async def counted_pass(self: Reconciler, *args: Any, **kwargs: Any) -> Any:
        passes.append(time.monotonic())
        return await run_once(self, *args, **kwargs)

    monkeypatch.setattr(LagReader, "read", counted_read)
    monkeypatch.setattr(Reconciler, "run_once", counted_pass)
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5)
        async with serving(stack, [sale], lambda: len(passes) >= 30):
            pass
    assert len(passes) >= 30 and readings, (len(passes), readings)
    gaps = [b - a for a, b in itertools.pairwise(readings)]
    assert all(gap >= service.BROKER_EVERY_S * 0.99 for gap in gaps), gaps
