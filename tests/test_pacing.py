"""The background loops' pacing over many SKUs (allocator/pacing.py), without servers."""

from __future__ import annotations

import asyncio
from collections import Counter

from allocator.hold_scripts import ExpireResult
from allocator.pacing import LOOKED_AT_ONCE, SaleTurns, Schedule, period, sale_periods
from allocator.settled import KEYS_AT_ONCE, ScopeKeys
from allocator.sweeper import SLICE, run_sweeper, sweep_once
from flashsale.keys import SkuKeys
from tests.harness import loop_turns


def test_the_period_grows_with_the_scope_past_the_budget() -> None:
    assert period(10, 0.25, 10_000) == 0.25
    assert period(10_000, 0.25, 10_000) == 1.0
    assert period(0, 0.5, 1000) == 0.5


def test_a_schedule_takes_only_what_is_due_and_follows_its_scope() -> None:
    a, b, c = (SkuKeys("s", name) for name in "abc")
    schedule = Schedule(rescan_s=100.0)
    scope = [a, b]
    assert schedule.due(scope, 0.0) == [a, b]  # new to the scope: due at once
    schedule.busy(a, 0.0)  # had work: due again at once
    schedule.busy(b, 0.0)
    assert schedule.due(scope, 0.0) == [a, b]
    schedule.busy(a, 0.0)
    schedule.idle(b, 0.0, ceiling_s=1.0)  # none since: 10 ms, then doubling to the ceiling
    assert schedule.due(scope, 0.0) == [a]
    schedule.idle(a, 0.0, ceiling_s=1.0)
    assert schedule.due(scope, 0.005) == []
    assert sorted(k.sku for k in schedule.due(scope, 0.01)) == ["a", "b"]
    for key in (a, b):
        schedule.idle(key, 0.01, ceiling_s=1.0)  # 20 ms
    assert schedule.due(scope, 0.02) == []
    assert len(schedule.due(scope, 0.03)) == 2
    for _ in range(10):
        schedule.idle(a, 0.0, ceiling_s=1.0)
        schedule.due(scope, 5.0)
    schedule.idle(a, 10.0, ceiling_s=1.0)
    assert schedule.due(scope, 10.99) == [] and schedule.due(scope, 11.0) == [a]  # the ceiling
    schedule.idle(a, 11.0, ceiling_s=1.0)
    never = Schedule(rescan_s=100.0, seed=7)  # never had work: somewhere within the ceiling
    assert never.due([c], 0.0) == [c]
    never.idle(c, 0.0, ceiling_s=1.0)
    [(at, _, _)] = never._heap
    assert 0.01 <= at <= 1.0 and at != 0.01
    # Another length (edited in place): c and d are due at once, b is gone.
    scope.remove(b)
    scope += [c, SkuKeys("s", "d")]
    assert [k.sku for k in schedule.due(scope, 11.0)] == ["c", "d"]
    # A round that failed half-way: what was taken and not put back is due at the next look.
    schedule.forget()
    assert [k.sku for k in schedule.due(scope, 11.5)] == ["c", "d"]
    assert schedule.due(scope, 12.0) == [a]


def test_a_large_quiet_scope_is_read_within_the_budget_from_the_start() -> None:
    """Every SKU new to the relay's scope started at 10 ms between reads, doubling up to the
    ceiling: with 100,000 quiet SKUs the relay read all of them in each of its first
    fifteen rounds, two seconds of the allocator's loop each, and from then on all at the same
    moment. A SKU that never had work is read again at a point spread over the ceiling."""
    scope = [SkuKeys("s", str(i)) for i in range(10_000)]
    budget = 1000.0  # reads a second, as the relay's idle_reads_per_s
    ceiling = period(len(scope), 0.5, budget)  # 10 s
    schedule = Schedule(rescan_s=ceiling)
    reads_by_second = [0] * 30
    now = 0.0
    while now < 30.0:
        taken = schedule.due(scope, now)
        reads_by_second[int(now)] += len(taken)
        for keys in taken:
            schedule.idle(keys, now, ceiling_s=ceiling)
        now = round(now + 0.01, 2)
    assert reads_by_second[0] >= len(scope)  # each is read once at once
    assert max(reads_by_second[1:]) <= 1.5 * budget, reads_by_second
    assert sum(reads_by_second[10:]) >= 0.8 * budget * 20  # and still read every ceiling


async def test_a_sweep_of_a_large_scope_goes_slice_by_slice() -> None:
    """A sweep sent one pipelined expire call per SKU of the whole scope at once: for 100,000
    SKUs, seconds in which the allocator's loop served nothing else. It now goes ``SLICE``
    SKUs at a time, the loop free between slices."""
    calls: list[int] = []

    class Scripts:
        async def expire_many(self, skus: list[SkuKeys], limit: int) -> list[ExpireResult]:
            calls.append(len(skus))
            await asyncio.sleep(0)
            return [ExpireResult(["h"] if keys.sku == "0" else [], more=False) for keys in skus]

    scope = [SkuKeys("s", str(i)) for i in range(2 * SLICE + 1)]
    assert await sweep_once(Scripts(), scope) == 1  # type: ignore[arg-type]
    assert calls == [SLICE, SLICE, 1]


def test_each_sale_is_paced_by_its_own_size_within_the_budget() -> None:
    """The budget of visits a second is shared out sale by sale: a sale that needs less than
    its share keeps its interval, the rest of the budget goes to the larger ones."""
    scope = [SkuKeys("big", str(i)) for i in range(20_000)] + [SkuKeys("small", "a")]
    periods = sale_periods(scope, 0.25, 5000.0)
    assert periods["small"] == 0.25
    assert periods["big"] == 20_000 / (5000.0 - 1 / 0.25)
    many = [SkuKeys(f"s{n}", str(i)) for n in range(10) for i in range(1000)]
    even = sale_periods(many, 0.5, 1000.0)
    assert set(even.values()) == {10.0}  # ten equal sales: each a tenth of the budget
    assert sale_periods([], 0.5, 1000.0) == {}
    for scope_ in (scope, many):
        spent = sum(
            sum(1 for k in scope_ if k.sale_id == sale) / p
            for sale, p in sale_periods(scope_, 0.25, 5000.0).items()
        )
        assert spent <= 5000.0 * (1 + 1e-9)


async def test_a_large_sale_in_scope_does_not_slow_the_sweeps_of_a_small_one() -> None:
    """The sweeper visited the whole scope, then waited as long as the budget of visits asked
    for all of it. Beside a 200,000-SKU catalogue sale that was 40 s: a hot sale's expired
    holds gave their stock back up to 40 s late. Each sale is now swept at its own pace."""
    swept: Counter[str] = Counter()

    class Scripts:
        async def expire_many(self, skus: list[SkuKeys], limit: int) -> list[ExpireResult]:
            swept.update(keys.sale_id for keys in skus)
            await asyncio.sleep(0)
            return [ExpireResult([], more=False) for _ in skus]

    scope = [SkuKeys("big", str(i)) for i in range(20_000)] + [SkuKeys("small", "a")]

    async def skus() -> list[SkuKeys]:
        return scope

    stop = asyncio.Event()
    sweeper = asyncio.create_task(
        run_sweeper(Scripts(), skus, stop=stop, interval=0.01, visits_per_s=20_000.0)  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.5)  # the large sale is due once a second
    stop.set()
    await sweeper
    assert swept["big"] == len(scope) - 1  # swept once
    assert swept["small"] >= 10, swept  # at its own interval meanwhile


def test_sales_that_came_at_different_moments_share_their_turns() -> None:
    """Each sale's turn came a period after its last one, so sales that entered the scope at
    different moments were visited at as many different moments: fifty small sales made
    the sweeper send fifty calls every 0.25 s instead of one, and the reconciler run fifty
    passes every 5 s. After its first visit (at once) a sale's turns fall on the same ticks
    as the others', a whole number of intervals apart; none comes sooner than its period."""
    turns = SaleTurns(1.0, 1000.0)
    assert turns.due({"a": 1}, 0.0) == ["a"]
    assert turns.due({"a": 1, "b": 1}, 0.3) == ["b"]  # new: at once
    assert turns.due(None, 0.99) == []
    assert turns.due(None, 1.0) == ["a", "b"]  # b joins the ticks at once
    assert turns.due(None, 1.5) == []
    assert turns.due(None, 2.0) == ["a", "b"]
    assert turns.due(None, 3.002) == ["a", "b"]  # woken a little late: the next tick still
    assert turns.due(None, 4.0) == ["a", "b"]
    assert turns.due(None, 7.5) == ["a", "b"]  # far behind: the next tick
    assert turns.due(None, 7.9) == [] and turns.due(None, 8.0) == ["a", "b"]
    big = SaleTurns(1.0, 10.0)  # a sale of 25 SKUs at 10 visits a second: every 2.5 s
    assert big.due({"c": 25}, 0.2) == ["c"]
    assert big.due(None, 1.9) == [] and big.due(None, 2.0) == ["c"]  # joining the ticks
    assert big.due(None, 4.9) == [] and big.due(None, 5.0) == ["c"]  # then 2.5 s or more
    assert big.due(None, 7.0) == [] and big.due(None, 8.0) == ["c"]


async def test_a_small_sale_is_swept_while_a_large_sale_is_being_swept() -> None:
    """A sweep of a large sale held the sweeper for its length (about 2 s per 100,000 SKUs
    here): a small sale's turns waited behind it, and its expired holds gave their stock
    back that much later. A sale is swept beside the sweeps of the others."""
    swept: Counter[str] = Counter()
    slice_s = 0.05

    class Scripts:
        async def expire_many(self, skus: list[SkuKeys], limit: int) -> list[ExpireResult]:
            swept.update(keys.sale_id for keys in skus)
            await asyncio.sleep(slice_s if skus[0].sale_id == "big" else 0)
            return [ExpireResult([], more=False) for _ in skus]

    scope = [SkuKeys("big", str(i)) for i in range(10 * SLICE)] + [SkuKeys("small", "a")]

    async def skus() -> list[SkuKeys]:
        return scope

    stop = asyncio.Event()
    sweeper = asyncio.create_task(
        run_sweeper(Scripts(), skus, stop=stop, interval=0.01, visits_per_s=20_000.0)  # type: ignore[arg-type]
    )
    await asyncio.sleep(10 * slice_s * 0.9)  # within the large sale's first sweep
    seen = swept.copy()
    stop.set()
    await sweeper
    assert seen["big"] < len(scope) - 1  # still sweeping it
    assert seen["small"] >= 10, seen  # at its own interval meanwhile


async def test_a_schedule_looks_at_a_large_scope_in_parts() -> None:
    """The relay's look at a scope of 240,000 SKUs (four catalogue sales) took 1.4 s of the
    allocator's loop in one stretch, and again every few seconds: every pump of the process
    missed the renewal of its lease (2 s) and was elected again."""
    scope = [SkuKeys("s", str(i)) for i in range(25_000)]
    schedule = Schedule(rescan_s=5.0)
    async with loop_turns() as turns:
        before = turns()
        await schedule.look(scope, 0.0)
        assert turns() - before >= len(scope) // LOOKED_AT_ONCE, turns() - before
    assert len(schedule.due(scope, 0.0)) == len(scope)  # new to the scope: due at once
    taken = schedule.due(scope, 0.0)
    assert taken == []  # looked at: not taken twice


async def test_the_scope_makes_each_sales_keys_once_and_in_parts() -> None:
    """At each change of the scope (a sale preloaded or ended), the keys of every holding sale
    were made again in one stretch: 0.9 s for four sales of 60,000 SKUs."""
    big = {"id": "big", "skus": [f"K{n}" for n in range(12_000)], "buckets": [1] * 12_000}
    hot = {"id": "hot", "skus": ["A"], "buckets": [3]}
    scope = ScopeKeys()
    async with loop_turns() as turns:
        before = turns()
        first = await scope.of([big, hot])
        assert turns() - before >= 12_000 // KEYS_AT_ONCE, turns() - before
    assert len(first) == 12_003 and first[0] == SkuKeys("big", "K0")
    assert [k.bucket for k in first[-3:]] == [0, 1, 2] and first[-1].sale_id == "hot"
    again = await scope.of([big, {**hot, "buckets": [2]}])  # hot split otherwise
    assert again[:12_000] == first[:12_000] and all(
        a is b for a, b in zip(again[:12_000], first[:12_000], strict=True))  # fmt: skip
    assert [k.bucket for k in again[12_000:]] == [0, 1]
