"""The admission pump's decisions (a pure function) and its no-show accounting."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from allocator import queue_scripts
from allocator.pump import AdmissionPump, Inputs, plan
from allocator.queue_scripts import QueueScripts
from allocator.queue_view import Step
from allocator.redis_calls import read_packed
from allocator.stock_count import INLINE_COUNT_KEYS
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.settings import Settings
from gateway.state import CLIENTS
from loadtest.fault_proxy import FaultProxy, through
from tests.harness import gateway, loop_turns

BASE = Inputs(
    serving=0, tail=10_000, cutoff=None, available=100, held=0, outstanding=0, noshow=0.2,
    credit=1000.0, capacity=1000, noshow_ceiling=0.5, all_preloaded=True,
)  # fmt: skip


def test_rate_bounds_admissions() -> None:
    assert plan(dataclasses.replace(BASE, credit=7.9)).admitted == 7


def test_capacity_bounds_admissions() -> None:
    step = plan(dataclasses.replace(BASE, available=10_000, capacity=30, outstanding=20))
    assert step.admitted == 10


def test_inventory_bounds_admissions_with_the_no_show_rate() -> None:
    # 100 units, 20 % no-shows: admitting 125 buyers is expected to take the 100 units.
    assert plan(BASE).admitted == 125
    assert plan(dataclasses.replace(BASE, outstanding=125, serving=125)).admitted == 0


def test_nothing_left_means_sold_out_and_no_admissions() -> None:
    step = plan(dataclasses.replace(BASE, available=0, held=0, serving=40))
    assert step.sold_out and step.admitted == 0 and step.cutoff == 40


def test_held_units_keep_the_sale_open_but_admit_nobody() -> None:
    step = plan(dataclasses.replace(BASE, available=0, held=3, serving=40))
    assert not step.sold_out and step.admitted == 0
    assert step.cutoff is not None and step.cutoff > 40


def test_the_cutoff_is_respected_and_never_moves_back_up() -> None:
    step = plan(dataclasses.replace(BASE, cutoff=50))
    assert step.serving <= 50 and step.cutoff is not None and step.cutoff <= 50


@given(
    serving=st.integers(0, 5000), waiting=st.integers(0, 5000),
    cutoff=st.none() | st.integers(0, 9000),
    available=st.integers(0, 500), held=st.integers(0, 500), outstanding=st.integers(0, 600),
    noshow=st.floats(0, 0.99), credit=st.floats(0, 2000), capacity=st.integers(1, 1000),
)  # fmt: skip
def test_plan_invariants(
    serving: int, waiting: int, cutoff: int | None, available: int, held: int,
    outstanding: int, noshow: float, credit: float, capacity: int,
) -> None:  # fmt: skip
    if cutoff is not None:
        cutoff = max(cutoff, serving)  # a published cutoff is never behind the serving position
    inputs = Inputs(serving, serving + waiting, cutoff, available, held, outstanding, noshow,
                    credit, capacity, 0.5, True)  # fmt: skip
    step = plan(inputs)
    assert step.serving == serving + step.admitted
    assert 0 <= step.admitted <= int(credit)
    assert step.serving <= serving + waiting  # never past the tail
    assert step.admitted <= max(0, capacity - outstanding)
    assert step.cutoff is not None and step.serving <= step.cutoff
    if cutoff is not None:
        assert step.cutoff <= cutoff  # only moves back
    if available + held == 0:
        assert step.sold_out and step.admitted == 0


@pytest.mark.parametrize("claimed", [0, 4])
async def test_lapsed_admissions_are_learned_as_no_shows_and_replaced(
    stack: Settings, claimed: int
) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=10, admission_rate=1000)
        for i in range(30):
            await gw.join(sale, f"q{i}")
        pump = gw.pump(sale, interval=0.02)
        redis = gw.app[CLIENTS].redis
        keys = SaleKeys(sale)
        for _ in range(100):
            if pump.last is not None and pump.last.serving > 0:
                break
            await asyncio.sleep(0.02)
        first = pump.last
        assert first is not None and first.serving == 13  # 10 units / 0.8 show rate
        for position in range(1, claimed + 1):  # some admitted buyers reserved in time
            await redis.zadd(keys.claims, {f"{position}\x1fk\x1fp": position})
        # Pretend the admission window of that step closed long ago.
        assert pump.view is not None
        pump.steps = [Step(first.serving, pump.steps[0].at_ms - 10 * pump.view.window_ms)]
        await asyncio.sleep(0.2)
        lapsed = first.serving - claimed
        assert pump.noshow == pytest.approx((lapsed + 0.2 * 20) / (first.serving + 20))
        assert pump.last is not None and pump.last.serving > first.serving  # compensated


async def test_windows_a_pause_stopped_are_not_learned_as_no_shows(stack: Settings) -> None:
    """A pause stops admitted buyers' windows: the pump neither counts those buyers as no-shows
    nor admits others in their place, however long ago they were admitted."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=10, admission_rate=1000)
        for i in range(30):
            await gw.join(sale, f"q{i}")
        pump = gw.pump(sale, interval=0.02)
        for _ in range(100):
            if pump.last is not None and pump.last.serving > 0:
                break
            await asyncio.sleep(0.02)
        first = pump.last
        assert first is not None and first.serving == 13
        # The step was ten windows ago, and the sale has been paused from then on.
        assert pump.view is not None
        window, at = pump.view.window_ms, pump.steps[0].at_ms - 10 * pump.view.window_ms
        await gw.app[CLIENTS].redis.hset(SaleKeys(sale).sale, "pauses", f"{at}:{at + 11 * window}")
        await asyncio.sleep(0.1)  # the pump reads the pauses
        pump.steps = [Step(first.serving, at)]
        await asyncio.sleep(0.2)
        assert pump.noshow == pytest.approx(0.2)  # the prior: nothing lapsed
        assert pump.last is not None and pump.last.serving == first.serving


async def test_a_sale_opens_while_postgres_is_down(stack: Settings) -> None:
    """The opening's draw needs the sale's seed, kept in Postgres. A pump that ticked before
    the opening has it already, so a Postgres outage at the opening does not keep the
    pre-queue waiting (before, every tick failed until Postgres was back)."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=10, starts_in=1.5)
        for i in range(5):
            assert (await gw.join(sale, f"early-{i}"))[0] == 200
        db = urlsplit(stack.require_database())
        proxy = await FaultProxy(db.hostname or "127.0.0.1", db.port or 5432).start()
        pool = await asyncpg.create_pool(through(stack.require_database(), proxy.port),
                                         min_size=0, max_size=2)  # fmt: skip
        pump = AdmissionPump(QueueScripts(gw.app[CLIENTS].redis), pool, sale, ["SKU-1"], "t")
        try:
            for _ in range(5):  # the pump of a discovered sale ticks before its opening
                await pump.tick()
                await asyncio.sleep(0.05)
            proxy.set("refuse")  # Postgres goes down, and stays down through the opening
            proxy.reset_all()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            failures: list[str] = []
            while int(await gw.app[CLIENTS].redis.hget(SaleKeys(sale).queue, "serving") or 0) < 5:
                assert loop.time() < deadline, f"the pre-queue was never drawn: {failures[-1:]}"
                try:
                    await pump.tick()
                except Exception as exc:  # noqa: BLE001 - the test reports the last one
                    failures.append(repr(exc))
                await asyncio.sleep(0.05)
        finally:
            for task in (pump.recording, pump.seeding):
                if task is not None:
                    task.cancel()
            await pool.close()
            await proxy.stop()


@pytest.mark.parametrize("slow_reads", ["stock counts", "every read"])
async def test_a_sale_slow_to_read_is_admitted_at_its_rate(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, slow_reads: str
) -> None:
    """The pump counts what is left over every SKU of the sale: about 1.5 s for a sale of
    100,000 SKUs here. Ticking at that pace, it admitted a third of the sale's admission rate
    (one tick spent at most half a second's worth of it). Here Redis answers the pump's counts
    of SKU counters, or every read of the pump, 0.8 s late."""
    rate = 100
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=10_000, admission_rate=rate)
        joined = await asyncio.gather(*(gw.join(sale, f"b{i}") for i in range(500)))
        assert {code for code, _ in joined} == {200}
        pump = gw.pump(sale, interval=0.02)
        read = pump.queue.snapshot

        async def slow(keys: SaleKeys, **options: Any) -> Any:
            if slow_reads == "every read" or options.get("skus"):
                await asyncio.sleep(0.8)
            return await read(keys, **options)

        monkeypatch.setattr(pump.queue, "snapshot", slow)  # before its first tick
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while pump.last is None or pump.last.serving == 0:
            assert loop.time() < deadline, "nobody was admitted"
            await asyncio.sleep(0.01)
        began, first = loop.time(), pump.last.serving
        await asyncio.sleep(3)
        admitted, took = pump.last.serving - first, loop.time() - began
        assert admitted >= 0.8 * rate * took, f"{admitted} admitted in {took:.2f} s"


@pytest.mark.parametrize("history_ms", [5000, 1000])
async def test_after_a_quiet_spell_the_next_buyer_is_quoted_the_admission_rate(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, history_ms: int
) -> None:
    """The rates the ETAs are quoted from are measured while buyers wait. A spell with nobody
    waiting was measured too: the arrivals' rate (the next buyer, first in line, was quoted a
    second at 100 admissions a second), and once the spell outlasted the rates' history, a
    rate of 0: the wait "unknown", and a poll again in 10 s, while the pump admitted the buyer
    at its next tick (the page showed the turn 10 s late, a sixth of the admission window)."""
    monkeypatch.setattr("allocator.pump.RATE_HISTORY_MS", history_ms)
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=10, admission_rate=100)
        c = gw.app[CLIENTS]
        pump = AdmissionPump(QueueScripts(c.redis), c.pool, sale, ["SKU-1"], "t")
        try:
            _, first = await gw.join(sale, "first")
            loop = asyncio.get_running_loop()
            quiet_until = loop.time() + 1.5
            while loop.time() < quiet_until:  # the first buyer admitted, then nobody waits
                await pump.tick()
                await asyncio.sleep(0.05)
            assert (await gw.status(sale, first["ticket"]))[1]["state"] == "admitted"
            _, second = await gw.join(sale, "second")
            await asyncio.sleep(0.15)  # the gateway's counters are at most 100 ms old
            _, waiting = await gw.status(sale, second["ticket"])
            assert waiting["state"] == "waiting" and waiting["ahead"] == 0, waiting
            assert waiting["eta_seconds"]["p50"] == 0.0, waiting  # 1 place at 100 a second
            assert waiting["retry_after_ms"] == 250, waiting
        finally:
            for task in (pump.recording, pump.seeding):
                if task is not None:
                    task.cancel()


async def test_a_sale_of_many_skus_keeps_its_lease_through_its_first_count(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalogue's first stock count ran inside the pump's first tick: 3.5 s for 60,000
    SKUs on a busy machine, longer than the 2 s lease, which lapsed; the pump was elected
    again with a new token, and every sale's pump in that process waited behind the count's
    parsing. The first count of a sale that many SKUs runs beside the ticks, as later ones do."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=5)
        c = gw.app[CLIENTS]
        skus = ["SKU-1", *(f"K{n}" for n in range(INLINE_COUNT_KEYS))]
        pump = AdmissionPump(QueueScripts(c.redis), c.pool, sale, skus, "catalogue")
        read = pump.queue.snapshot

        async def slow(keys: SaleKeys, **options: Any) -> Any:
            if options.get("skus"):
                await asyncio.sleep(2.5)  # a count longer than the lease
            return await read(keys, **options)

        monkeypatch.setattr(pump.queue, "snapshot", slow)
        assert await asyncio.wait_for(pump.tick(), 1.0) is None  # it did not wait for the count
        elected, counting = pump.token, pump.counting
        assert elected and counting is not None
        while not counting.done():
            assert await pump.tick() is None and pump.token == elected
            await asyncio.sleep(0.3)
        assert pump.count is not None and not pump.count.preloaded  # K0... are not in Redis
        assert await pump.tick() is not None and pump.token == elected


async def test_a_wide_count_lets_the_loop_serve_others_while_it_reads(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SKUs' answers of a count were parsed in one stretch: 0.3 to 0.5 s for 60,000 SKUs,
    through which the allocator's other sales' pumps could not renew their leases."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=5)
        queue = QueueScripts(gw.app[CLIENTS].redis)
        seen: list[tuple[int, int]] = []  # (the loop's turns so far, SKUs read) per read
        async with loop_turns() as turns:

            async def noted(client: Any, commands: Any, **options: Any) -> Any:
                seen.append((turns(), sum(c[0] == "HMGET" and ":stock" in c[1] for c in commands)))
                return await read_packed(client, commands, **options)

            monkeypatch.setattr(queue_scripts, "read_packed", noted)
            skus = [SkuKeys(sale, f"K{n}") for n in range(6000)]
            snap = await queue.snapshot(SaleKeys(sale), skus=skus)
        assert len(snap.stock) == sum(n for _, n in seen) == 6000, seen
        # Each read's answers are parsed before the next read, with nothing else let run.
        assert max(n for _, n in seen) <= 2000, seen
        assert all(b[0] > a[0] for a, b in itertools.pairwise(seen)), seen


async def test_a_lease_renewed_late_by_its_own_leader_keeps_what_the_pump_measured(
    stack: Settings,
) -> None:
    """A pump whose loop was busy past its 2 s lease took the lease again with the next token,
    and started over as a new leader: the admission rate it had measured for the ETAs, the
    steps and its credit were thrown away, and the log said "is leader" of a pump that had
    been all along. Nobody led between (the next token is its own), so it goes on; after
    another owner's turn, it starts over."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=1000, admission_rate=50)
        for n in range(20):
            assert (await gw.join(sale, f"b{n}"))[0] == 200
        c = gw.app[CLIENTS]
        pump = AdmissionPump(QueueScripts(c.redis), c.pool, sale, ["SKU-1"], "busy")
        for _ in range(5):
            await pump.tick()
            await asyncio.sleep(0.05)
        elected, measured = pump.token, list(pump.history)
        assert elected and measured
        keys = SaleKeys(sale)
        await c.redis.delete(keys.lease)  # it lapsed: the loop was busy past the lease
        await pump.tick()
        assert pump.token == elected + 1
        assert list(pump.history)[: len(measured)] == measured  # kept
        await c.redis.delete(keys.lease)
        assert await pump.queue.acquire(keys, "another", 2000) == elected + 2
        await pump.queue.release(keys, "another")
        await pump.tick()
        assert pump.token == elected + 3 and len(pump.history) <= 1  # a new leader's start


@pytest.mark.parametrize("waiting", [0, 50])
async def test_a_catalogue_nobody_waits_for_is_counted_seldom(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, waiting: int
) -> None:
    """Two catalogue sales of 60,000 SKUs an hour before their opening kept the allocator at
    half a core: their stock was counted every 1.8 s, a third of the time, for nobody. A sale
    nobody waits in, away from its opening, is counted a tenth as often; one with buyers in
    line at the pace its admissions need."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=1000, admission_rate=1,
                                    starts_in=-1 if waiting else 600)  # fmt: skip
        for n in range(waiting):
            assert (await gw.join(sale, f"b{n}"))[0] == 200
        c = gw.app[CLIENTS]
        skus = ["SKU-1", *(f"K{n}" for n in range(INLINE_COUNT_KEYS))]
        pump = AdmissionPump(QueueScripts(c.redis), c.pool, sale, skus, "catalogue")
        read, counts = pump.queue.snapshot, 0

        async def slow(keys: SaleKeys, **options: Any) -> Any:
            nonlocal counts
            if options.get("skus"):
                counts += 1
                await asyncio.sleep(0.2)
            return await read(keys, **options)

        monkeypatch.setattr(pump.queue, "snapshot", slow)
        loop = asyncio.get_running_loop()
        ends = loop.time() + 3.0
        while loop.time() < ends:
            await pump.tick()
            await asyncio.sleep(0.05)
        assert pump.busy == bool(waiting)
        if waiting:  # one every 3 times its 0.2 s
            assert counts >= 4, counts
        else:  # the first, then one every 30 times its 0.2 s
            assert counts == 1, counts


async def test_the_pumps_of_sales_ticking_together_share_their_round_trips(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 live sales nobody queued for kept an allocator at a quarter of a core: each pump's
    tick, once a second, made three round trips of its own (its lease, its read, its step),
    and redis-py's machinery per round trip cost more than what they carried. Those of the
    sales ticking at once now go together: one write and one read for all of them, on each
    node of a Redis Cluster that holds some of them."""
    async with gateway(stack) as gw:
        sales = [await gw.create_sale(stock=5) for _ in range(20)]
        c = gw.app[CLIENTS]
        queue = QueueScripts(c.redis)
        pumps = [AdmissionPump(queue, c.pool, sale, ["SKU-1"], "together") for sale in sales]
        for _ in range(3):  # elected (each reads its steps), drawn, connected
            await asyncio.gather(*(pump.tick() for pump in pumps))
        writes = 0
        send = Connection.send_packed_command

        async def counted(self: Connection, *args: Any, **kwargs: Any) -> None:
            nonlocal writes
            writes += 1
            await send(self, *args, **kwargs)

        monkeypatch.setattr(Connection, "send_packed_command", counted)
        steps = await asyncio.gather(*(pump.tick() for pump in pumps))
        assert all(step is not None for step in steps)  # each led and stepped
        nodes = len({c.redis.get_node_from_key(SaleKeys(sale).queue).name for sale in sales}
                    if stack.redis_cluster else {"one"})  # fmt: skip
        assert writes <= 3 * nodes, f"{writes} writes for the ticks of {len(pumps)} sales"
