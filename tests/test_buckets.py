"""Hot-SKU stock buckets on the real stack (a single Redis, or a cluster with
``FLASHSALE_TEST_REDIS_CLUSTER``): a SKU split over buckets sells every unit even when every
buyer lands in one bucket, a transfer cut between its two steps is finished by the reconciler,
a lost bucket is rebuilt from its orders, and the audit holds per bucket and on the sum."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.crc import key_slot

import reconciler.audit
import reconciler.buckets
from allocator import queue_scripts, redis_calls, stock_buckets
from allocator.hold_scripts import ReserveRequest
from allocator.ids import hold_keys, route_of, routed_reservation_id
from allocator.pump import AdmissionPump
from allocator.queue_scripts import QueueScripts
from allocator.sale_admin import SaleAdmin
from allocator.sku_allocator import Allocators
from allocator.stock_buckets import BucketScripts
from flashsale.cli.sale_views import print_status
from flashsale.errors import InvalidInput
from flashsale.keys import SPREAD_SLOTS, SaleKeys, SkuKeys, bucket_for, bucket_keys
from flashsale.records import ReserveResult, integer
from flashsale.salespec import parse_sku
from flashsale.settings import Settings
from tests.harness import gateway
from tests.pipeline import SKU, Pipeline, drained, pipeline
from tests.test_reconcile import audit, checked, converged, failing, goes_on, recounted


def buyers_of_bucket(bucket: int, buckets: int, count: int) -> list[str]:
    """``count`` buyer ids that all hash to ``bucket``."""
    found: list[str] = []
    while len(found) < count:
        buyer = f"buyer-{uuid.uuid4().hex[:12]}"
        if bucket_for(buyer, buckets) == bucket:
            found.append(buyer)
    return found


async def stock_of(p: Pipeline, sale: str) -> list[dict[str, int]]:
    rows = []
    for keys in bucket_keys(sale, SKU, p.buckets[sale]):
        raw = await p.redis.hgetall(keys.stock)
        rows.append({(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()})
    return rows


def request(sale: str, allocator: Any, buyer: str) -> ReserveRequest:
    return ReserveRequest(allocator.new_id(buyer), buyer, 1, uuid.uuid4().hex, "tok_visa", "1")


def test_ids_name_their_bucket_and_buckets_have_their_own_tags() -> None:
    keys = route_of(routed_reservation_id("s1", "A.b-c", 2, 3))
    assert keys == SkuKeys("s1", "A.b-c", 2, 3) and keys is not None and keys.buckets == 3
    assert route_of(routed_reservation_id("s1", "A", 0, 3)) == SkuKeys("s1", "A")
    for bad in ("s1~A~07.9~r-x", "s1~A~x~r-x", "s1~A~2~r-x", "s1~A~3.3~r-x", "s1~A~1.65~r"):
        assert route_of(bad) is None, bad
    assert hold_keys("s1", "A", "other~A~2.3~r-1") == SkuKeys("s1", "A")  # not this SKU's id
    first, *others = bucket_keys("s1", "A", 3)
    assert first.tag == "fs:{s1:A}" and all(k.tag.startswith(f"fs:{{s1:A:{k.bucket}:")
                                            for k in others)  # fmt: skip
    # Each bucket's slot sits a third of the slot space after the previous one: on three
    # primaries with equal runs of slots, one bucket each.
    spread = 0
    for sale in (f"sale-{i:04x}" for i in range(40)):
        slots = [key_slot(k.stock.encode()) for k in bucket_keys(sale, "SKU-1", 3)]
        for b, slot in enumerate(slots):
            gap = (slot - slots[0] - round(b * 16384 / 3)) % 16384
            assert min(gap, 16384 - gap) <= SPREAD_SLOTS, (sale, slots)
        edges = [0, 5461, 10923, 16384]  # three equal runs of slots
        owners = {sum(slot >= edge for edge in edges[1:3]) for slot in slots}
        near_edge = any(abs(s - e) <= SPREAD_SLOTS for s in slots for e in edges)
        assert len(owners) == 3 or near_edge, (sale, slots)
        spread += len(owners) == 3
    assert spread >= 36, spread
    assert {bucket_for(f"b{i}", 3) for i in range(50)} == {0, 1, 2}
    assert bucket_for("alice", 3) == bucket_for("alice", 3) and bucket_for("alice", 1) == 0
    with pytest.raises(InvalidInput) as refused:
        parse_sku({"sku": "A", "stock": 5, "price": 1, "currency": "EUR", "buckets": 65}, "s")
    assert refused.value.field == "s.buckets"


async def test_postgres_reads_the_bucket_from_the_order_id(stack: Settings) -> None:
    async with pipeline(stack) as p:
        for rid in ("s~A~r-1", "s~A~3.4~r-1", "s~A~12.64~r-9", "s~A~0.3~r-1", "plain",
                    "s~A~x~r", "s~A~3~r-1"):  # fmt: skip
            in_sql = await p.pool.fetchval("SELECT order_bucket($1)", rid)
            assert in_sql == hold_keys("s", "A", rid).bucket, rid


async def test_preload_spreads_the_stock_and_every_unit_sells_from_one_bucket(
    stack: Settings,
) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=20, limit=1, buckets=3)
        rows = await stock_of(p, sale)
        assert [r["total"] for r in rows] == [7, 7, 6]
        status = await SaleAdmin.build(p.pool, p.redis).status(sale)
        [sku] = status["skus"]
        assert (sku["available"], sku["buckets"], len(sku["by_bucket"])) == (20, 3, 3)

        # Every buyer hashes to bucket 0: it lends itself dry, then borrows from the others.
        allocator = Allocators(p.holds).for_sku(sale, SKU, 3)
        buyers = buyers_of_bucket(0, 3, 26)
        results = await asyncio.gather(*(allocator.reserve(request(sale, allocator, b))
                                         for b in buyers))  # fmt: skip
        outcomes = [r.outcome for r in results]
        assert outcomes.count("reserved") == 20 and outcomes.count("sold_out") == 6, outcomes
        assert allocator.borrowed >= 2
        rows = await stock_of(p, sale)
        assert sum(r["active"] for r in rows) == 20 and rows[0]["active"] == 20
        assert all(r["available"] == 0 for r in rows), rows
        assert all(r["total"] == r["available"] + r["active"] + r["paying"] + r["sold"]
                   for r in rows)  # fmt: skip
        assert sum(r["total"] for r in rows) == 20
        # The last answers say holds may still return (20 are active): a waitlist, not final.
        assert all(r.holds_pending for r in results if r.outcome == "sold_out")
        # A bucket's sold_out is not remembered: once a hold returns, the same key succeeds.
        late = request(sale, allocator, buyers_of_bucket(2, 3, 1)[0])
        assert (await allocator.reserve(late)).outcome == "sold_out"
        first = next(r.reservation_id for r in results if r.outcome == "reserved")
        assert first is not None
        assert (await p.holds.cancel(hold_keys(sale, SKU, first), first)).ok
        again = await allocator.reserve(late)
        assert again.outcome == "reserved" and route_of(again.reservation_id or "") == SkuKeys(
            sale, SKU, 2, 3
        )
        await allocator.aclose()


async def test_units_on_their_way_between_buckets_are_waited_for_not_refused(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One bucket lends to another; until the units are credited they are in neither. A third
    bucket that runs dry meanwhile found every other bucket empty and told its buyer sold_out
    while the stock was enough for everyone (seen once under CI load: 4 of 30 buyers of a
    30-unit spread spike). It waits for the transfers on their way, then asks again."""
    real_complete = BucketScripts.complete

    async def slow_complete(self: BucketScripts, *args: Any) -> str:
        await asyncio.sleep(0.3)  # the credit is late: a slow or busy Redis
        return await real_complete(self, *args)

    monkeypatch.setattr(BucketScripts, "complete", slow_complete)
    async with pipeline(stack) as p:
        sale = await p.sale(stock=20, limit=1, buckets=3)
        assert [r["total"] for r in await stock_of(p, sale)] == [7, 7, 6]
        allocator = Allocators(p.holds).for_sku(sale, SKU, 3)

        async def reserve(bucket: int, count: int) -> list[str]:
            buyers = buyers_of_bucket(bucket, 3, count)
            results = await asyncio.gather(*(allocator.reserve(request(sale, allocator, b))
                                             for b in buyers))  # fmt: skip
            return [r.outcome for r in results]

        assert await reserve(2, 6) == ["reserved"] * 6  # bucket 2 has nothing to spare
        short = asyncio.ensure_future(reserve(0, 9))  # 2 short: bucket 1 lends, credit late
        await asyncio.sleep(0.15)
        assert await reserve(1, 5) == ["reserved"] * 5  # 20 buyers, 20 units: nobody refused
        assert await short == ["reserved"] * 9
        rows = await stock_of(p, sale)
        assert sum(r["active"] for r in rows) == 20 and all(r["available"] == 0 for r in rows)
        await allocator.aclose()


async def test_a_unit_moved_while_the_buckets_are_asked_is_not_told_sold_out(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry bucket asks the others in turn to lend, each at its own moment. A transfer that
    another process made whole meanwhile, into this very bucket, was seen by no ask: the
    buyer was told the SKU was sold out for good (the waiting room then marks the product
    sold out and offers it no more), with a unit free in the buyer's own bucket."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=1, limit=1, buckets=2)
        first, second = bucket_keys(sale, SKU, 2)
        assert [r["available"] for r in await stock_of(p, sale)] == [1, 0]
        allocator = Allocators(p.holds).for_sku(sale, SKU, 2)
        other = BucketScripts(p.redis)  # another process's allocator
        lend = allocator.transfers.lend

        async def after_another(lender: SkuKeys, receiver: SkuKeys, wanted: int,
                                **options: Any) -> Any:  # fmt: skip
            if not moved:
                moved.append((await other.transfer(first, second, 1)).units)
            return await lend(lender, receiver, wanted, **options)

        moved: list[int] = []
        monkeypatch.setattr(allocator.transfers, "lend", after_another)
        [buyer] = buyers_of_bucket(1, 2, 1)
        result = await allocator.reserve(request(sale, allocator, buyer))
        assert moved == [1] and result.outcome == "reserved", result
        await allocator.aclose()


async def test_units_on_their_way_between_buckets_are_not_sold_out_in_the_sales_summary(
    stack: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The public summary added the buckets' counters up, and units lent and not yet credited
    are in none of them: a SKU whose free units were all on their way read "sold_out": true,
    and a buyer's page opened then said "Sold out" and offered no join (each process keeps
    its copy of the summary at least half a second, a CDN 1 s)."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=2, limit=1, buckets=2)
        first, second = SkuKeys(sale, SKU, 0, 2), SkuKeys(sale, SKU, 1, 2)
        transfers = BucketScripts(p.redis)
        for lender, receiver in ((first, second), (second, first)):  # both units journaled
            _, lent = await transfers.lend(lender, receiver, 1, exact=True)
            assert lent.units == 1
        admin = SaleAdmin.build(p.pool, p.redis)
        _, stock = await admin.with_stock(sale)
        assert stock[SKU] == (2, 0)  # free the moment they are credited: not sold out
        # `sale status` and the operators' page (the same read) said available 0 as well, and
        # their units did not add up to the stock: they say it as the summary, and why.
        [row] = (await admin.status(sale))["skus"]
        assert (row["available"], row["in_transit"], row["held"]) == (2, 2, 0), row
        print_status(await admin.status(sale), as_json=False)
        assert "in transit" in capsys.readouterr().out
        async with gateway(stack) as gw:
            summary = await (await gw.http.get(f"/v1/sales/{sale}")).json()
        [sku] = summary["skus"]
        assert (sku["remaining"], sku["sold_out"]) == (2, False), sku


async def test_the_pump_counts_each_unit_on_its_way_between_buckets(stack: Settings) -> None:
    """The pump read a bucket's transfers in flight as one unit each, whatever they moved:
    read during a transfer of 10 units it saw 9 fewer that could still sell, and the cutoff
    it sets from them (the last place ever admitted, told to everyone behind: "sold out")
    only ever goes down."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=20, limit=1, buckets=2)
        first, second = bucket_keys(sale, SKU, 2)
        _, lent = await BucketScripts(p.redis).lend(first, second, 10, exact=True)
        assert lent.units == 10
        snap = await QueueScripts(p.redis).snapshot(SaleKeys(sale), skus=[first, second])
        assert snap.stock == [(0, 10), (10, 0)], snap.stock  # lent: free once credited


class Between:
    """Reads of a SKU's buckets made at two moments, as a Redis Cluster's nodes answer them:
    once armed, the next packed read of ``module`` that reaches ``key`` is sent as two, the
    commands before that key's first and the rest, with ``step`` run between."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, key: str,
                 step: Callable[[], Awaitable[None]], *modules: Any) -> None:  # fmt: skip
        self.key, self.step, self.armed, self.split = key, step, False, 0
        original = redis_calls.read_packed

        async def read(client: Any, commands: Sequence[Any], **options: Any) -> list[Any]:
            at = next((i for i, c in enumerate(commands) if self.key in c[1:]), 0)
            if not (self.armed and at):
                return await original(client, commands, **options)
            self.armed, self.split = False, self.split + 1
            before = await original(client, commands[:at], **options)
            await self.step()
            return before + await original(client, commands[at:], **options)

        for module in modules:
            monkeypatch.setattr(module, "read_packed", read)


async def test_a_transfer_between_the_reads_of_two_buckets_is_in_the_count(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Redis Cluster a SKU's buckets live on different nodes, each read at its own
    moment: a transfer made whole between the read of its receiver and that of its lender was
    in neither. A SKU whose last free units moved then counted none, and the pump marked the
    sale sold out for good; a hold taken meanwhile that failed its payment gave its unit back
    to a sale that admitted nobody any more (a spike of 3,000 buyers sold 299 of 300 units).
    The public summary and `sale status` read the buckets the same way."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=2, limit=1, buckets=2)
        first, second = bucket_keys(sale, SKU, 2)
        transfers = BucketScripts(p.redis)
        await transfers.transfer(first, second, 1, exact=True)  # bucket 0 dry, bucket 1 has 2

        async def move() -> None:  # every free unit to the other bucket, whole
            for lender, receiver in ((first, second), (second, first)):
                units = integer(await p.redis.hget(lender.stock, "available"))
                if units:
                    assert (await transfers.transfer(lender, receiver, units, exact=True)).units
                    return

        between = Between(monkeypatch, second.stock, move, queue_scripts, stock_buckets)
        queue = QueueScripts(p.redis)
        [joined] = await queue.join(SaleKeys(sale), ["early-buyer"])  # the queue runs
        assert joined.outcome == "queued", joined
        pump = AdmissionPump(queue, p.pool, sale, [SKU], "test")
        pump.buckets = {SKU: 2}
        between.armed = True
        step = await pump.tick()
        assert between.split == 1 and step is not None
        view = await queue.view(SaleKeys(sale))
        assert (step.sold_out, view.sold_out) == (False, False), step
        assert pump.count is not None and (pump.count.available, pump.count.held) == (2, 0)
        admin = SaleAdmin.build(p.pool, p.redis)
        between.armed = True
        _, stock = await admin.with_stock(sale)
        assert between.split == 2 and stock[SKU] == (2, 0), stock
        between.armed = True
        [row] = (await admin.status(sale))["skus"]
        assert between.split == 3 and row["available"] == 2, row


async def test_many_skus_in_buckets_are_read_in_parts_and_only_what_moved_again(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SKU in buckets is read as of its own moment: a catalogue of them read as one
    group was one packed read of them all, the loop held meanwhile, and a transfer anywhere
    read them all again. They go a part at a time, and only a SKU whose units moved between
    the two reads is read again."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=4, limit=1, buckets=2, skus=3)
        groups = [bucket_keys(sale, f"SKU-{i}", 2) for i in (1, 2, 3)]
        transfers = BucketScripts(p.redis)
        monkeypatch.setattr(stock_buckets, "CUT_KEYS", 4)  # two SKUs a read
        reads: list[list[str]] = []
        states = transfers.states

        async def noted(keys: Sequence[SkuKeys]) -> Any:
            reads.append([k.sku for k in keys if k.bucket == 0])
            return await states(keys)

        async def move() -> None:
            lent = await BucketScripts(p.redis).transfer(groups[0][0], groups[0][1], 1)
            assert lent.units == 1

        monkeypatch.setattr(transfers, "states", noted)
        between = Between(monkeypatch, groups[0][1].stock, move, stock_buckets)
        between.armed = True
        cuts = await transfers.snapshots(groups)
        assert between.split == 1 and [c.units for c in cuts] == [4, 4, 4]
        assert reads == [["SKU-1", "SKU-2"], ["SKU-1"], ["SKU-3"]], reads
        assert [[b.counts.available for b in c.buckets if b.counts] for c in cuts] == [
            [1, 3], [2, 2], [2, 2]]  # fmt: skip


async def test_an_audit_while_units_move_between_buckets_finds_the_stock_conserved(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit added up the buckets' totals from one read, each bucket read at its own
    moment on a cluster, and the units on their way from another read: a transfer made whole
    between the reads of its two buckets made a live sale's audit say its stock was broken."""
    async with pipeline(stack) as p, checked(p) as (_, psp):
        sale = await p.sale(stock=2, limit=1, buckets=2)
        first, second = bucket_keys(sale, SKU, 2)
        transfers = BucketScripts(p.redis)
        await transfers.transfer(first, second, 1, exact=True)  # bucket 0 dry, bucket 1 has 2

        async def move() -> None:
            assert (await transfers.transfer(second, first, 2, exact=True)).units == 2

        between = Between(monkeypatch, second.stock, move, reconciler.audit)
        between.armed = True
        report = await audit(p, psp, sale)
        assert between.split == 1 and not failing(report), failing(report)


async def test_a_spread_spike_sells_exactly_the_stock_and_the_audit_passes(
    stack: Settings,
) -> None:
    async with pipeline(stack) as p, checked(p) as (rec, psp):
        sale = await p.sale(stock=30, limit=1, buckets=3)
        granted = await p.reserve(sale, ["tok_visa"] * 30)
        assert {hold_keys(sale, SKU, rid).bucket for rid in granted} == {0, 1, 2}
        workers = p.start_workers()
        await p.wait_terminal(granted)
        await drained(p)
        assert (await p.counts(sale))["sold"] == 30
        audited = await audit(p, psp, sale)
        assert audited.passed, audited.text()
        await converged(rec, sale)
        await workers.drain()


async def test_a_transfer_cut_between_its_steps_is_finished_by_the_reconciler(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with pipeline(stack) as p, checked(p) as (rec, psp):
        sale = await p.sale(stock=12, limit=1, buckets=3)
        lender, receiver = SkuKeys(sale, SKU, 1, 3), SkuKeys(sale, SKU)
        transfers = BucketScripts(p.redis)
        # Step 1 only, as a process killed right after it leaves it: 2 of 4 units journaled.
        _, lent = await transfers.lend(lender, receiver, 1)
        assert (lent.outcome, lent.units) == ("lent", 2)
        rows = await stock_of(p, sale)
        assert [r["total"] for r in rows] == [4, 2, 4]
        snap = await transfers.snapshot(bucket_keys(sale, SKU, 3))
        assert (snap.in_transfer, snap.units) == (2, 12)
        # The audit sees the units in transfer, so conservation holds; a pass would finish it.
        monkeypatch.setattr(reconciler.buckets, "TRANSFER_GRACE_S", 0.0)
        before = await audit(p, psp, sale)
        assert "2" not in failing(before) and "8" in failing(before), before.text()

        report = await rec.run_once([sale], wait_for_grace=True)
        finished = [r for r in report.repairs if r.kind == "finish_transfer"]
        assert [(r.before, r.after) for r in finished] == [
            ({"to_bucket": 0, "units": 2}, {"credit": "credited"})
        ], report.json()
        rows = await stock_of(p, sale)
        assert [r["total"] for r in rows] == [6, 2, 4]
        assert await p.redis.hlen(lender.transfers) == 0
        # Crediting again by the same id changes nothing.
        [tid] = [r.subject for r in finished]
        assert tid is not None
        assert await transfers.complete(lender, receiver, tid, 2, "") == "gone"
        assert await transfers.credit(receiver, tid, 2, lender.bucket, "") == "already"
        await converged(rec, sale)
        workers = p.start_workers()
        assert await goes_on(p, rec, psp, sale, buyers=12) == 12
        await workers.drain()


async def test_add_stock_spreads_over_the_buckets_and_a_missed_grant_is_repaired(
    stack: Settings,
) -> None:
    async with pipeline(stack) as p, checked(p) as (rec, psp):
        sale = await p.sale(stock=9, limit=1, buckets=3)
        admin = SaleAdmin.build(p.pool, p.redis)
        status = await admin.add_stock(sale, SKU, 3)
        assert status["skus"][0]["available"] == 12
        assert [r["total"] for r in await stock_of(p, sale)] == [4, 4, 4]  # spread by transfers
        # Postgres raised, Redis never told (the process died in between): a pass grants it.
        await p.pool.execute("UPDATE sale_skus SET stock_total = 14 WHERE sale_id = $1", sale)
        assert "2" in failing(await audit(p, psp, sale))
        report = await rec.run_once([sale], wait_for_grace=True)
        assert [r.kind for r in report.repairs] == ["grant_stock"], report.json()
        assert integer(await p.redis.hget(SkuKeys(sale, SKU).meta, "stock_total")) == 14
        # A re-preload writes configuration only; the buckets keep what transfers made them.
        again = await admin.preload(sale, force=True)
        assert [r.outcome for r in again] == ["unchanged"]
        assert [r["total"] for r in await stock_of(p, sale)] == [5, 5, 4]
        await converged(rec, sale)
        workers = p.start_workers()
        assert await goes_on(p, rec, psp, sale, buyers=14) == 14
        await workers.drain()


async def test_a_lost_bucket_is_rebuilt_from_its_orders_and_the_sale_goes_on(
    stack: Settings,
) -> None:
    async with pipeline(stack) as p, checked(p) as (rec, psp):
        sale = await p.sale(stock=30, limit=1, buckets=3)
        # Four buyers per bucket, taken in turn: bucket 1 surely holds some of the reservations
        # (by chance, none of twelve new buyers landed in it about once in 130 runs).
        by_bucket = [buyers_of_bucket(b, 3, 4) for b in range(3)]
        buyers = [by_bucket[i % 3][i // 3] for i in range(12)]
        granted = await p.reserve(sale, ["tok_visa"] * 9 + ["tok_decline"] * 3, buyers=buyers)
        workers = p.start_workers()
        await p.wait_terminal(granted)
        await drained(p)
        sold_before = await p.counts(sale)
        lost = SkuKeys(sale, SKU, 1, 3)
        in_lost = [rid for rid in granted if hold_keys(sale, SKU, rid) == lost]
        assert in_lost, "no buyer landed in bucket 1"
        # A transfer into the lost bucket, lent and not credited: it must land after the rebuild.
        lender = SkuKeys(sale, SKU, 2, 3)
        await BucketScripts(p.redis).lend(lender, lost, 1)
        await p.redis.delete(*lost.all(), lost.transfers, lost.received)
        assert "2" in failing(await audit(p, psp, sale))

        report = await rec.run_once([sale], wait_for_grace=True)
        rebuilt = [r for r in report.repairs if r.kind == "rebuild_sku"]
        assert [(r.subject, r.before["reason"]) for r in rebuilt] == [("bucket 1", "lost")]
        assert (await p.counts(sale))["sold"] == sold_before["sold"] == 9
        snap = await BucketScripts(p.redis).snapshot(bucket_keys(sale, SKU, 3))
        assert snap.units == 30 and snap.in_transfer > 0
        # The transfer into it is finished once it is back (after the grace), and then the
        # whole SKU adds up again.
        reconciler.buckets.TRANSFER_GRACE_S, grace = 0.0, reconciler.buckets.TRANSFER_GRACE_S
        try:
            again = await rec.run_once([sale], wait_for_grace=True)
        finally:
            reconciler.buckets.TRANSFER_GRACE_S = grace
        assert [r.kind for r in again.repairs] == ["finish_transfer"], again.json()
        assert await goes_on(p, rec, psp, sale, buyers=18) == 27
        await workers.drain()


async def test_a_sold_counter_changed_by_hand_is_recounted_for_a_sku_in_buckets(
    stack: Settings,
) -> None:
    """As for a SKU in one bucket (tests/test_reconcile.py): the counter in Postgres, apart
    from the confirmed orders, is counted again from them, and no bucket is rebuilt. Left
    apart, every pass read the SKU's orders again and changed nothing."""
    async with pipeline(stack) as p, checked(p) as (rec, psp):
        sale = await p.sale(stock=12, limit=1, buckets=3)
        granted = await p.reserve(sale, ["tok_visa"] * 4)
        workers = p.start_workers()
        await p.wait_terminal(granted)
        await drained(p)
        for wrong in (9, 0):
            await recounted(p, rec, psp, sale, wrong, 4)
            assert (await p.counts(sale))["sold"] == 4
        await workers.drain()


async def test_a_late_credit_from_a_lender_lost_and_rebuilt_meanwhile_makes_no_units(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Completing a transfer checks that the lender's journal still holds it, then credits
    the receiver: two slots, so two calls. The lender's node lost its data between them,
    and the reconciler rebuilt it, counting the lent units back as its own; the credit,
    landing late (its retries outlasting the rebuild), counted them a second time: units
    made, the SKU oversold."""
    async with pipeline(stack) as p, checked(p) as (rec, psp):
        sale = await p.sale(stock=12, limit=1, buckets=3)
        lender, receiver = SkuKeys(sale, SKU, 1, 3), SkuKeys(sale, SKU)
        every = bucket_keys(sale, SKU, 3)
        transfers = BucketScripts(p.redis)
        tid, lent = await transfers.lend(lender, receiver, 1)
        assert (lent.outcome, lent.units) == ("lent", 2)
        assert await p.redis.hexists(lender.transfers, tid)  # the completion's first step
        await p.redis.delete(*lender.all(), lender.transfers, lender.received)
        report = await rec.run_once([sale], wait_for_grace=True)
        rebuilt = [r for r in report.repairs if r.kind == "rebuild_sku"]
        assert [(r.subject, r.before["reason"]) for r in rebuilt] == [("bucket 1", "lost")]
        assert (await transfers.snapshot(every)).units == 12  # the 2 units are bucket 1's again
        late = await transfers.credit(receiver, tid, lent.units, lender.bucket, lent.incarnation)
        assert late == "void"
        assert (await transfers.snapshot(every)).units == 12
        # The rebuilt lender lends again, and its new transfers are credited: one whole, one
        # cut after its first step and finished by the reconciler.
        assert (await transfers.transfer(lender, receiver, 1)).units == 2
        _, cut = await transfers.lend(lender, receiver, 1)
        assert cut.units == 1 and cut.incarnation not in ("", lent.incarnation), cut
        monkeypatch.setattr(reconciler.buckets, "TRANSFER_GRACE_S", 0.0)
        report = await rec.run_once([sale], wait_for_grace=True)
        finished = [r.after for r in report.repairs if r.kind == "finish_transfer"]
        assert finished == [{"credit": "credited"}], report.json()
        assert [r["total"] for r in await stock_of(p, sale)] == [7, 1, 4]
        await converged(rec, sale)
        workers = p.start_workers()
        assert await goes_on(p, rec, psp, sale, buyers=12) == 12
        await workers.drain()


async def test_a_request_for_more_than_a_bucketed_sku_has_left_is_told_how_many(
    stack: Settings,
) -> None:
    """Three per buyer, one unit left in a SKU of three buckets: a buyer asking for two was
    told a plain sold_out (a bucket's count says nothing of the SKU's), and the page marked
    the product sold out for good. Once no other bucket has a unit to lend, the units this
    bucket has are all the SKU has free: the answer says how many, as for any SKU."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=3, limit=3, buckets=3)
        allocator = Allocators(p.holds).for_sku(sale, SKU, 3)
        first, second = buyers_of_bucket(0, 3, 1)[0], buyers_of_bucket(1, 3, 1)[0]

        def asking(buyer: str, quantity: int) -> ReserveRequest:
            return ReserveRequest(allocator.new_id(buyer), buyer, quantity, uuid.uuid4().hex,
                                  "tok_visa", "1")  # fmt: skip

        assert (await allocator.reserve(asking(first, 2))).outcome == "reserved"
        refused = await allocator.reserve(asking(second, 2))
        assert (refused.outcome, refused.left, refused.holds_pending) == ("sold_out", 1, True)
        assert (await allocator.reserve(asking(second, 1))).outcome == "reserved"
        none_left = await allocator.reserve(asking(second, 1))
        assert (none_left.outcome, none_left.left) == ("sold_out", None), none_left
        await allocator.aclose()


async def test_a_final_sold_out_remembered_for_its_key_is_never_granted_on_a_replay(
    stack: Settings,
) -> None:
    """A cluster gateway claims the admission apart from the decision, so it may free the
    admission for another key after a refusal only once a replay of the refused request can
    no longer be granted: a SKU in buckets did not remember its sold_out, and a retry of the
    same request in flight could be granted after the admission was freed, which a second
    key could then spend again. A final sold_out is remembered for the key, unless a replay
    decided it first; remembered, it is replayed without a borrow."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=1, limit=1, buckets=2)
        allocator = Allocators(p.holds).for_sku(sale, SKU, 2)
        first, second = buyers_of_bucket(0, 2, 1)[0], buyers_of_bucket(1, 2, 1)[0]

        def asking(buyer: str, key: str) -> ReserveRequest:
            return ReserveRequest(allocator.new_id(buyer), buyer, 1, key, "tok_visa", "1")

        granted = await allocator.reserve(asking(first, "f"))
        assert granted.outcome == "reserved" and granted.reservation_id
        # A replay that was granted first: nothing is remembered over its answer.
        assert not await allocator.remember(asking(first, "f"), ReserveResult("sold_out"))
        assert (await allocator.reserve(asking(first, "f"))).outcome == "reserved"
        refused = await allocator.reserve(asking(second, "s"))
        assert (refused.outcome, refused.holds_pending) == ("sold_out", True), refused
        assert await allocator.remember(asking(second, "s"), refused)
        rid = granted.reservation_id
        assert (await p.holds.cancel(hold_keys(sale, SKU, rid), rid)).ok  # the unit is back
        borrowed = allocator.borrowed
        replayed = await allocator.reserve(asking(second, "s"))
        said = (replayed.outcome, replayed.left, replayed.holds_pending)
        assert said == ("sold_out", 0, True), replayed  # left 0: remembered
        assert allocator.borrowed == borrowed  # a remembered refusal borrows nothing
        assert (await allocator.reserve(asking(second, "t"))).outcome == "reserved"
        await allocator.aclose()
