"""The allocator's background loops (sweeper, relay, queue-mark checkpoints, the pumps and their
discovery) outlive any error of a round: a dependency that is down and a surprise alike are
logged and the next round runs. A loop that died would leave its service up and healthy while
stock stopped coming back, or reservations stopped reaching Kafka."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from allocator import discovery
from allocator.discovery import HOLDING_SALES, NOT_PRELOADED, SkuSets
from allocator.hold_scripts import HoldScripts
from allocator.pump import Plan
from allocator.queue_scripts import QueueScripts
from allocator.relay import OutboxRelay, run_relay
from allocator.sale_admin import SaleAdmin
from allocator.service import AllocatorService
from allocator.sweeper import run_sweeper
from flashsale.clients import redis_client
from flashsale.heap import settle_heap
from flashsale.keys import SkuKeys, bucket_keys
from flashsale.migrate import migrate
from flashsale.queue_marks import Mark, QueueMarks
from flashsale.sales import fetch_in_play
from flashsale.salespec import parse_sale, parse_skus
from flashsale.settings import Settings
from flashsale.sku_csv import parse_csv
from reconciler.skus import SCOPE
from tests.lone_redis import lone_redis
from tests.pipeline import pipeline
from workers import order_events

FAILURES = [
    asyncpg.InterfaceError("connection is closed"),  # a Postgres restart, mid-call
    asyncpg.exceptions.ConnectionDoesNotExistError("closed in the middle of operation"),
    ValueError("a surprise"),
]


def failing_then(stop: asyncio.Event, then: Any) -> Callable[..., Any]:
    """A coroutine function raising each of FAILURES in turn, then returning ``then`` and
    setting ``stop``."""
    left = list(FAILURES)

    async def call(*_args: Any, **_kwargs: Any) -> Any:
        if left:
            raise left.pop(0)
        stop.set()
        return then

    call.left = left  # type: ignore[attr-defined]
    return call


async def test_the_sweeper_outlives_any_failed_round() -> None:
    stop = asyncio.Event()
    skus = failing_then(stop, [])
    await asyncio.wait_for(run_sweeper(None, skus, stop=stop, interval=0.001), 5)  # type: ignore[arg-type]
    assert not skus.left  # type: ignore[attr-defined]


async def test_the_relay_outlives_any_failed_round() -> None:
    stop = asyncio.Event()
    relay = OutboxRelay.__new__(OutboxRelay)
    relay.relay_once = failing_then(stop, 0)  # type: ignore[method-assign]

    async def skus() -> list[SkuKeys]:
        return []

    await asyncio.wait_for(run_relay(relay, skus, stop=stop, interval=0.001), 10)
    assert not relay.relay_once.left  # type: ignore[attr-defined]


async def test_queue_marks_outlive_any_failed_checkpoint() -> None:
    stop = asyncio.Event()
    marks = QueueMarks("test")
    marks.note("s1", Mark(tail=3))
    marks.flush = failing_then(stop, 1)  # type: ignore[method-assign]
    await asyncio.wait_for(marks.run(None, stop, interval=0.001), 5)
    assert not marks.flush.left  # type: ignore[attr-defined]


@pytest.mark.parametrize("exc", FAILURES, ids=lambda e: type(e).__name__)
async def test_a_pump_tick_that_fails_is_counted_not_raised(exc: Exception) -> None:
    service = AllocatorService(Settings.from_env({}))

    class Pump:
        sale_id = "S"

        async def tick(self) -> None:
            raise exc

    await service._tick(Pump())  # type: ignore[arg-type]
    [sample] = [s for m in service.metrics.errors.collect() for s in m.samples
                if s.name.endswith("_total")]  # fmt: skip
    assert sample.value == 1


async def test_the_allocator_exports_redis_memory_unless_its_user_may_not_read_it(
    tmp_path: Path,
) -> None:
    """The share of ``maxmemory`` in use, for the alert that comes before a full Redis. A
    user that may not run INFO ends the loop (said once), rather than a traceback each time."""
    with lone_redis(tmp_path) as url:
        service = AllocatorService(Settings.from_env({}))
        service.redis = client = aioredis.Redis.from_url(url)
        try:
            await client.config_set("maxmemory", str(10 * 2**30))
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.2, stop.set)
            await asyncio.wait_for(service._measure_memory(stop, interval_s=0.05), 5)
            [sample] = [s for m in service.metrics.memory.collect() for s in m.samples]
            assert sample.labels["node"].startswith("127.0.0.1:") and 0 < sample.value < 0.1
            await client.acl_setuser("default", enabled=True, nopass=True,
                                     commands=["+@all", "-info"])  # fmt: skip
            await asyncio.wait_for(service._measure_memory(asyncio.Event()), 5)  # it returns
        finally:
            await client.aclose()


async def test_only_the_leading_pump_counts_buyers_waiting() -> None:
    """Every allocator process exports its pumps' gauges and the dashboard takes the highest:
    a process that led a sale, then lost the lease (or saw the sale end), kept showing the
    buyers waiting when it last stepped, however many were left. So for the units nobody can
    buy any more, and for a waiting room full, which alerts watch."""
    service = AllocatorService(Settings.from_env({}))

    class Pump:
        sale_id, token, busy, tail, outstanding, noshow, count = "S", 1, True, 50, 0, 0.0, None
        step: Plan | None = Plan(serving=10, cutoff=30, sold_out=False, admitted=5)
        # buyers who joined before the opening; units nobody in line can buy any more
        view = SimpleNamespace(pre=7, stranded=lambda now_ms: 3, full=lambda now_ms: True)

        async def tick(self) -> Plan | None:
            return self.step

    def waiting() -> tuple[float, float, float, float]:
        m = service.metrics
        return (m.waiting.labels("S")._value.get(), m.pre_queue.labels("S")._value.get(),
                m.stranded.labels("S")._value.get(), m.full.labels("S")._value.get())  # fmt: skip

    pump = Pump()
    await service._tick(pump)  # type: ignore[arg-type]
    assert waiting() == (20, 7, 3, 1)  # up to the cutoff, past the last admitted; the draw's
    pump.step, pump.token = None, 0  # another process took the lease
    await service._tick(pump)  # type: ignore[arg-type]
    assert waiting() == (0, 0, 0, 0)


@pytest.mark.parametrize("exc", FAILURES, ids=lambda e: type(e).__name__)
async def test_discovery_that_fails_keeps_the_pumps_it_had(exc: Exception) -> None:
    service = AllocatorService(Settings.from_env({}))

    class Pool:
        async def fetch(self, *_args: Any) -> list[Any]:
            raise exc

    service.pool = Pool()
    service.pumps = {"S": object()}  # type: ignore[dict-item]
    await service._discover(None)  # type: ignore[arg-type]
    assert list(service.pumps) == ["S"]


async def test_the_order_events_publisher_outlives_any_failed_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stop = asyncio.Event()
    publish = failing_then(stop, 0)
    monkeypatch.setattr(order_events, "_publish_some", publish)
    publishing = order_events.publish_outbox(
        None,
        None,
        stop, on_published=lambda _n: None, interval=0.001,
    )  # fmt: skip
    await asyncio.wait_for(publishing, 5)
    assert not publish.left  # type: ignore[attr-defined]


async def test_a_pump_slow_to_tick_holds_back_no_other_sale() -> None:
    """The allocator ticked every due pump together and waited for the slowest before the
    next round: a sale of 100,000 SKUs (1.5 s to count) or one whose Redis node is slow kept
    every other sale of the process to its pace, and to a fraction of its admission rate."""
    service = AllocatorService(Settings.from_env({}))

    class Pump:
        def __init__(self, sale_id: str, takes_s: float) -> None:
            self.sale_id, self.takes_s = sale_id, takes_s
            self.token, self.busy, self.next_tick, self.ticks = 0, True, 0.0, 0

        async def tick(self) -> None:
            self.ticks += 1
            await asyncio.sleep(self.takes_s)

    slow, quick = Pump("SLOW", 2.0), Pump("QUICK", 0.0)
    service.pumps = {"SLOW": slow, "QUICK": quick}  # type: ignore[dict-item]
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.0
    while loop.time() < end:
        await service._tick_due()
        await asyncio.sleep(0.05)
    assert quick.ticks >= 10 and slow.ticks == 1, (quick.ticks, slow.ticks)
    await service._ticks_ended()
    assert not service.ticking


async def test_discovery_of_an_unchanged_scope_builds_nothing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Discovery runs every 2 s. It built the keys of every SKU in scope each time: 0.34 s of
    the allocator's loop for a 100,000-SKU sale, every 2 s."""
    service = AllocatorService(Settings.from_env({}))
    rows = [{"id": "S", "skus": [f"K{i}" for i in range(100)], "buckets": [1] * 100,
             "live": True}]  # fmt: skip

    async def holding(_pool: Any) -> list[dict[str, Any]]:
        return rows

    class Redis:
        async def set(self, *_args: Any, **_kwargs: Any) -> None:
            return None

    built = 0

    def counted(*args: Any) -> Any:
        nonlocal built
        built += 1
        return bucket_keys(*args)

    monkeypatch.setattr("allocator.settled.bucket_keys", counted)
    monkeypatch.setattr(service.sku_sets, "holding", holding)
    service.pool, service.redis = object(), Redis()  # type: ignore[assignment]
    queue = QueueScripts(aioredis.Redis())  # never connects: the pumps do not tick here
    await service._discover(queue)
    first, built = service.holding_skus, 0
    assert len(first) == 100
    await service._discover(queue)
    assert service.holding_skus is first and built == 0


async def test_the_relay_and_the_sweeper_leave_an_ended_sales_settled_skus(
    stack: Settings,
) -> None:
    """Once a sale ended, a SKU with nothing held or paid and an empty outbox gets no more
    events and has nothing to expire: the allocator stops visiting it (a 100,000-SKU sale
    ending put the relay and the sweeper back on each of its SKUs for three minutes)."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5, skus=3)
        [rid] = await p.reserve(sale, ["tok_visa"])  # SKU-1 is held
        service = AllocatorService(p.settings)
        service.redis = p.redis

        async def holding() -> list[SkuKeys]:
            rows = [r for r in await SkuSets().holding(p.pool) if r["id"] == sale]
            await service._holding(rows)
            return service.holding_skus

        every = [SkuKeys(sale, f"SKU-{i}") for i in (1, 2, 3)]
        assert await holding() == every  # live: every SKU
        await SaleAdmin.build(p.pool, p.redis).set_status(sale, "end")
        assert await holding() == every[:1]  # ended: the held one only
        await HoldScripts(p.redis).release(every[0], rid, "cancelled")
        for _ in range(100):  # its events relayed (the relay deletes what it published)
            if not await p.redis.xlen(every[0].outbox):
                break
            await p.relay.relay_once(every[:1])
            await asyncio.sleep(0.02)
        assert await p.redis.xlen(every[0].outbox) == 0
        assert await holding() == []


async def test_a_sale_opening_without_its_preload_is_shown_from_ten_minutes_before(
    stack: Settings,
) -> None:
    """A sale never preloaded opened to buyers told it was not open yet, with no metric and
    no alert. The allocators' discovery lists it from ten minutes before its opening, with
    the seconds until then, until its preload (or its end)."""
    async with pipeline(stack) as p:
        admin = SaleAdmin.build(p.pool, p.redis)
        now = datetime.now(UTC)

        async def sale(opens_in: timedelta) -> str:
            spec = parse_sale(
                {
                    "name": "Not preloaded",
                    "starts_at": (now + opens_in).isoformat(),
                    "skus": [{"sku": "A", "stock": 1, "price": 1, "currency": "EUR"}],
                }
            )
            return str((await admin.create(spec))["id"])

        soon, later, opened = (await sale(timedelta(minutes=5)), await sale(timedelta(hours=2)),
                               await sale(timedelta(seconds=-30)))  # fmt: skip
        found = await discovery.not_preloaded(p.pool)
        listed = found.sales
        assert 290 < listed[soon] <= 300 and -40 < listed[opened] <= -30, listed
        # (the shared stack may hold other tests' sales: only these three are looked at)
        assert later not in listed and not {soon, later, opened} & set(found.skus), found
        service = AllocatorService(p.settings)
        service.metrics.note_not_preloaded(found)
        assert service.metrics.not_preloaded.labels(soon)._value.get() == listed[soon]
        await admin.preload(soon)
        await admin.set_status(opened, "end")
        found = await discovery.not_preloaded(p.pool)
        assert soon not in found.sales and opened not in found.sales, found
        service.metrics.note_not_preloaded(found)  # the series of a sale preloaded is gone
        gone = [s for m in service.metrics.not_preloaded.collect() for s in m.samples
                if s.labels["sale"] in (soon, opened)]  # fmt: skip
        assert gone == [], gone

        # SKUs imported after the preload are not for sale until the next one: shown too,
        # in a sale about to open (not in one opening in two hours).
        for target in (soon, later):
            await admin.import_skus(target, parse_skus([
                {"sku": f"NEW-{n}", "stock": 1, "price": 1, "currency": "EUR"} for n in (1, 2)
            ]))  # fmt: skip
        found = await discovery.not_preloaded(p.pool)
        assert found.skus.get(soon) == 2 and later not in found.skus, found
        service.metrics.note_not_preloaded(found)
        assert service.metrics.skus_not_preloaded.labels(soon)._value.get() == 2
        await admin.preload(soon)
        found = await discovery.not_preloaded(p.pool)
        assert soon not in found.skus, found
        service.metrics.note_not_preloaded(found)
        gone = [s for m in service.metrics.skus_not_preloaded.collect() for s in m.samples
                if s.labels["sale"] == soon]  # fmt: skip
        assert gone == [], gone


OLD_SKUS, NEW_SKUS = 20_000, 500


def _sale_skus_read(plan: Any) -> int:
    """The rows of ``sale_skus`` a query's plan (EXPLAIN ANALYZE, JSON) read, kept or not."""
    read = 0
    if plan.get("Relation Name") == "sale_skus":
        rows = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        read = round(rows * plan["Actual Loops"])
    return read + sum(_sale_skus_read(p) for p in plan.get("Plans", []))


async def _sale(conn: asyncpg.Connection, sale: str, ended_ago: timedelta, skus: int) -> None:
    await conn.execute(
        "INSERT INTO sales (id, name, starts_at, ends_at, admission_rate, max_queue, status,"
        " preloaded_at, shuffle_seed, shuffle_commitment) VALUES ($1, $1,"
        " now() - $2::interval - interval '1 hour', now() - $2::interval, 1, 1, 'ended',"
        " now() - $2::interval - interval '2 hours', 'x', 'x')",
        sale,
        ended_ago,
    )
    await conn.execute(
        "INSERT INTO sale_skus (sale_id, sku, title, stock_total, price, currency,"
        " per_buyer_limit, hold_ttl_seconds, preloaded_at)"
        " SELECT $1, 'S-' || i, 'S', 5, 100, 'EUR', 1, 120, now() - interval '1 day'"
        " FROM generate_series(1, $2) AS i",
        sale,
        skus,
    )


async def test_the_periodic_scope_queries_do_not_read_old_sales(fresh_dsn: str) -> None:
    """The allocator's discovery (every 2 s, in each process) and the reconciler's scope (each
    pass) joined every SKU of every sale ever preloaded, and filtered afterwards: on a stack
    with 1.7 million SKU rows from 709 sales, discovery took 2.7 s of Postgres time. Now they
    read the SKUs of the sales in which a hold can still live (here: one that ended a minute
    ago), and none of a sale that ended a month ago."""
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await migrate(conn, progress=lambda _line: None)
        await _sale(conn, "old", timedelta(days=30), OLD_SKUS)
        await _sale(conn, "recent", timedelta(minutes=1), NEW_SKUS)
        # A sale open now, preloaded, with one SKU added since: the discovery's count of SKUs
        # not preloaded reads that one, not the 20,000 preloaded.
        await _sale(conn, "open", timedelta(hours=-1), OLD_SKUS)
        await conn.execute("UPDATE sales SET status = 'active' WHERE id = 'open'")
        await conn.execute("UPDATE sale_skus SET preloaded_at = NULL "
                           "WHERE sale_id = 'open' AND sku = 'S-1'")  # fmt: skip
        await conn.execute("ANALYZE sales; ANALYZE sale_skus")
        for name, sql, args, found in (
            ("allocator", HOLDING_SALES, (), ["open", "recent"]),
            ("reconciler", SCOPE, (None,), ["open"] * (OLD_SKUS - 1) + ["recent"] * NEW_SKUS),
            ("not preloaded", NOT_PRELOADED, (600.0,), ["open"]),
        ):
            rows = await conn.fetch(sql, *args)
            assert [r[0] for r in rows] == found, name
            [plan] = orjson.loads(
                await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            )
            # and one index entry a sale: the longest hold TTL of its SKUs
            assert _sale_skus_read(plan["Plan"]) <= len(found) + 4, (name, plan)
    finally:
        await conn.close()


async def test_a_large_sale_in_scope_does_not_slow_the_backlog_gauge_of_a_small_one(
    stack: Settings,
) -> None:
    """The outbox backlog gauge read every SKU in scope, then waited as long as its budget of
    reads asked for all of them: beside a 200,000-SKU catalogue sale, 100 s, and an alert on
    a hot sale's backlog came that late. Each sale is now measured at its own pace."""
    service = AllocatorService(Settings.from_env({}))
    service.redis = redis_client(stack)
    tag = os.urandom(4).hex()
    big = [SkuKeys(f"big-{tag}", f"S{i}") for i in range(4000)]
    small = SkuKeys(f"small-{tag}", "S0")
    service.holding_skus = [*big, small]
    gauge = service.metrics.backlog.labels(small.sale_id, small.sku, "0")
    stop = asyncio.Event()
    gauging = asyncio.create_task(service._measure_backlog(stop, interval_s=0.01,
                                                           reads_per_s=4000.0))  # fmt: skip
    try:
        await service.redis.xadd(small.outbox, {"type": "test"})
        for _ in range(100):  # the first round reads every outbox
            await asyncio.sleep(0.01)
            if gauge._value.get() == 1:
                break
        await service.redis.xadd(small.outbox, {"type": "test"})
        await asyncio.sleep(0.3)  # the large sale is read once a second
        assert gauge._value.get() == 2
    finally:
        stop.set()
        await gauging
        await service.redis.delete(small.outbox)
        await service.redis.aclose()


async def test_discovery_reads_a_sales_skus_only_when_its_set_moved(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Discovery (every 2 s, in each allocator process) read every SKU of every sale in play:
    for a live sale of 100,000 SKUs, 100-140 ms of Postgres each time. A sale's SKUs are read
    again only when SKUs were added to it or taken out."""
    read: list[int] = []  # SKUs read by each discovery
    fetch = fetch_in_play

    async def counted(pool: Any, sql: str, *args: Any) -> Any:
        rows = await fetch(pool, sql, *args)
        read[-1] += sum(len(r["skus"]) for r in rows if "skus" in r)
        return rows

    monkeypatch.setattr(discovery, "fetch_in_play", counted)
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5, skus=3)
        service = AllocatorService(p.settings)
        service.pool, service.redis = p.pool, p.redis
        queue = QueueScripts(p.redis)

        async def discover() -> list[str]:
            read.append(0)
            await service._discover(queue)
            return service.pumps[sale].skus

        first = await discover()
        assert first == ["SKU-1", "SKU-2", "SKU-3"] and read[-1] >= 3
        assert await discover() == first and read[-1] == 0  # nothing moved: nothing read
        admin = SaleAdmin.build(p.pool, p.redis)
        await admin.import_skus(sale, parse_csv("sku,stock,price,currency\nSKU-4,5,100,EUR\n"))
        assert await discover() == [*first, "SKU-4"] and read[-1] >= 4
        await p.pool.execute("DELETE FROM sale_skus WHERE sale_id = $1 AND sku = 'SKU-4'", sale)
        assert await discover() == first and read[-1] >= 3
        await service._ticks_ended()


async def test_the_heap_is_settled_once_after_each_change_of_scope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cyclic garbage collector walked every object the allocator keeps (the keys and
    schedules of two 60,000-SKU sales) every few seconds, collecting nothing: 90 to 460 ms
    with the loop held each time. Once the scope settled after a change, what survives a
    collection is frozen out of the collector's walks, until the next change."""
    service = AllocatorService(Settings.from_env({}))
    rows = [{"id": "S", "skus": ["A"], "buckets": [1], "live": True}]

    async def holding(_pool: Any) -> list[dict[str, Any]]:
        return rows

    class Redis:
        async def set(self, *_args: Any, **_kwargs: Any) -> None:
            return None

    settled: list[int] = []

    def settle() -> float:
        settled.append(1)
        return 0.001

    monkeypatch.setattr("allocator.service.SETTLE_AFTER_S", 0.0)
    monkeypatch.setattr("allocator.service.settle_heap", settle)
    monkeypatch.setattr(service.sku_sets, "holding", holding)
    service.pool, service.redis = object(), Redis()  # type: ignore[assignment]
    queue = QueueScripts(aioredis.Redis())  # never connects: the pumps do not tick here
    await service._discover(queue)  # the scope changed: settled at the next discovery
    assert settled == []
    await service._discover(queue)
    assert settled == [1]
    await service._discover(queue)  # nothing changed since
    assert settled == [1]
    rows = [*rows, {"id": "T", "skus": ["B"], "buckets": [1], "live": True}]
    await service._discover(queue)
    await service._discover(queue)
    assert settled == [1, 1]


def test_settling_the_heap_collects_garbage_first_and_freezes_what_survives() -> None:
    class Node:
        other: Node | None = None

    kept = Node()
    garbage, twin = Node(), Node()
    garbage.other, twin.other = twin, garbage  # a cycle nothing refers to
    gone = weakref.ref(garbage)
    del garbage, twin
    try:
        assert settle_heap() >= 0.0
        assert gone() is None  # collected, not frozen
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects(2))  # out of the collector's walks
    finally:
        gc.unfreeze()
