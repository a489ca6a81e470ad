"""The hold lifecycle scripts and the per-SKU allocator, against real Redis."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from allocator.hold_scripts import HoldScripts, ReserveRequest
from allocator.sale_scripts import SaleScripts
from allocator.sku_allocator import SkuAllocator
from allocator.sweeper import sweep_once
from flashsale.errors import InvalidInput, Overloaded
from flashsale.events import ReservationEvent, outbox_events
from flashsale.keys import SkuKeys
from flashsale.records import HoldRecord, ReserveResult
from flashsale.settings import Settings


@pytest.fixture
async def client(stack: Settings) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(stack.require_redis())
    yield c
    await c.aclose()


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Sku:
    keys: SkuKeys
    scripts: HoldScripts
    client: aioredis.Redis

    async def counts(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.keys.stock)
        return {text(k): int(v) for k, v in raw.items()}

    async def assert_conserved(self) -> dict[str, int]:
        c = await self.counts()
        assert c["total"] == c["available"] + c["active"] + c["paying"] + c["sold"], c
        assert min(c.values()) >= 0, c
        return c

    async def hold_state(self, reservation_id: str) -> str:
        raw = await self.client.hget(self.keys.holds, reservation_id)
        assert raw is not None
        return HoldRecord.parse(raw).state

    async def events(self) -> list[ReservationEvent]:
        entries: Any = await self.client.xrange(self.keys.outbox)
        return [event for _, fields in entries for event in outbox_events(fields)]

    async def deadline_index(self) -> dict[str, float]:
        """reservation id -> indexed deadline (the index keeps one member per batch)."""
        members: Any = await self.client.zrange(self.keys.deadlines, 0, -1, withscores=True)
        return {rid: score for member, score in members for rid in text(member).split("\x1f")}


async def make_sku(
    client: aioredis.Redis,
    *,
    stock: int = 10,
    limit: int = 2,
    ttl_ms: int = 60_000,
    starts_in_ms: int = -60_000,
    ends_in_ms: int = 3_600_000,
    status: str = "active",
) -> Sku:
    keys = SkuKeys(f"sale-{uuid.uuid4().hex[:10]}", "SKU-1")
    now = int(time.time() * 1000)
    meta = {
        "sale_id": keys.sale_id, "sku": keys.sku, "price": "1500", "currency": "EUR",
        "per_buyer_limit": str(limit), "hold_ttl_ms": str(ttl_ms),
        "starts_at_ms": str(now + starts_in_ms), "ends_at_ms": str(now + ends_in_ms),
        "status": status,
    }  # fmt: skip
    await SaleScripts(client).preload(keys, total=stock, meta=meta, force=False, first=True)
    return Sku(keys, HoldScripts(client), client)


def request(buyer: str = "b1", qty: int = 1, key: str | None = None) -> ReserveRequest:
    return ReserveRequest(
        reservation_id=f"r-{uuid.uuid4().hex}",
        buyer_id=buyer,
        quantity=qty,
        idempotency_key=key or uuid.uuid4().hex,
        payment_ref="tok_ok",
        admission_id=f"adm-{buyer}",
    )


async def reserve(sku: Sku, req: ReserveRequest) -> ReserveResult:
    [result] = await sku.scripts.reserve(sku.keys, [req])
    return result


# -- reserve ---------------------------------------------------------------------------------


async def test_reserve_grants_and_records_everything(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=10, ttl_ms=120_000)
    before_ms = int(time.time() * 1000)
    req = request("alice", 2)
    result = await reserve(sku, req)
    assert result.outcome == "reserved"
    assert result.reservation_id == req.reservation_id
    assert result.hold_expires_at_ms is not None
    assert abs(result.hold_expires_at_ms - (before_ms + 120_000)) < 5_000
    counts = await sku.assert_conserved()
    assert (counts["available"], counts["active"]) == (8, 2)
    assert await sku.hold_state(req.reservation_id) == "ACTIVE"
    assert (await sku.deadline_index())[req.reservation_id] == result.hold_expires_at_ms
    assert await client.hget(sku.keys.buyers, "alice") == b"2"
    [event] = await sku.events()
    assert event.type == "reservation.created"
    assert event.reservation_id == req.reservation_id
    assert (event.buyer_id, event.quantity, event.amount) == ("alice", 2, 3000)
    assert (event.sale_id, event.sku, event.currency) == (sku.keys.sale_id, "SKU-1", "EUR")
    assert (event.payment_ref, event.admission_id) == ("tok_ok", "adm-alice")
    assert event.idempotency_key == req.idempotency_key
    assert event.hold_deadline_ms == result.hold_expires_at_ms
    assert event.created_ms is not None and abs(event.created_ms - before_ms) < 5_000


async def test_repeated_key_returns_the_original_answer(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=10)
    first = await reserve(sku, request("bob", 1, key="k1"))
    # A retry carries a fresh reservation id; the original answer comes back unchanged.
    again = await reserve(sku, request("bob", 1, key="k1"))
    assert again == first
    assert (await sku.counts())["active"] == 1
    assert len(await sku.events()) == 1
    mismatch = await reserve(sku, request("bob", 2, key="k1"))
    assert mismatch.outcome == "idempotency_mismatch"
    # The same key from another buyer is another request.
    other = await reserve(sku, request("carol", 1, key="k1"))
    assert other.outcome == "reserved"
    assert other.reservation_id != first.reservation_id


@pytest.mark.parametrize(
    ("options", "outcome"),
    [
        ({"starts_in_ms": 60_000}, "not_started"),
        ({"status": "paused"}, "paused"),
        ({"status": "ended"}, "ended"),
        ({"starts_in_ms": -7_200_000, "ends_in_ms": -1}, "ended"),
    ],
)
async def test_sale_not_live_is_refused(
    client: aioredis.Redis, options: dict[str, Any], outcome: str
) -> None:
    sku = await make_sku(client, **options)
    assert (await reserve(sku, request())).outcome == outcome
    assert (await sku.counts())["available"] == 10
    assert await sku.events() == []
    # Not remembered: the same key is decided afresh once the sale is live.
    assert await client.hlen(sku.keys.idem) == 0


async def test_unpreloaded_sku_is_unavailable(client: aioredis.Redis) -> None:
    keys = SkuKeys(f"sale-{uuid.uuid4().hex[:10]}", "GHOST")
    [result] = await HoldScripts(client).reserve(keys, [request()])
    assert result.outcome == "unavailable"
    assert await client.exists(keys.stock, keys.holds) == 0


async def test_limit_counts_active_paying_and_sold(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=10, limit=3)
    a = await reserve(sku, request("dan", 1))
    b = await reserve(sku, request("dan", 1))
    c = await reserve(sku, request("dan", 1))
    assert a.reservation_id and b.reservation_id and c.reservation_id
    await sku.scripts.begin_payment(sku.keys, a.reservation_id)
    await sku.scripts.begin_payment(sku.keys, b.reservation_id)
    await sku.scripts.confirm(sku.keys, b.reservation_id)
    over = await reserve(sku, request("dan", 1))
    assert (over.outcome, over.counted) == ("limit_exceeded", 3)
    # Releasing the ACTIVE one frees exactly its unit for this buyer.
    await sku.scripts.release(sku.keys, c.reservation_id, "cancelled")
    assert (await reserve(sku, request("dan", 1))).outcome == "reserved"
    assert (await reserve(sku, request("dan", 1))).outcome == "limit_exceeded"
    await sku.assert_conserved()


async def test_sold_out_says_whether_holds_may_return(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=2, limit=5)
    held = await reserve(sku, request("erin", 2))
    assert held.reservation_id
    pending = await reserve(sku, request("fay", 1))
    assert (pending.outcome, pending.holds_pending) == ("sold_out", True)
    await sku.scripts.begin_payment(sku.keys, held.reservation_id)
    await sku.scripts.confirm(sku.keys, held.reservation_id)
    final = await reserve(sku, request("gus", 1))
    assert (final.outcome, final.holds_pending) == ("sold_out", False)
    too_many = await reserve(sku, request("hal", 0))
    assert too_many.outcome == "invalid_quantity"


async def test_batch_requests_are_decided_independently_in_order(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=3, limit=2)
    reqs = [request("a", 2), request("a", 1), request("b", 2), request("c", 1), request("d", 1)]
    results = await sku.scripts.reserve(sku.keys, reqs)
    assert [r.outcome for r in results] == [
        "reserved", "limit_exceeded", "sold_out", "reserved", "sold_out",
    ]  # fmt: skip
    await sku.assert_conserved()


async def test_repeats_inside_one_batch_see_earlier_answers(client: aioredis.Redis) -> None:
    """A double click can land both requests in one batch: the second must replay the first."""
    sku = await make_sku(client, stock=10, limit=2)
    first = request("eve", 2, key="dbl")
    reqs = [
        first,
        request("eve", 2, key="dbl"),  # same key, same body: replayed, not granted again
        replace(first, reservation_id="r-other", payment_ref="tok_other"),  # same key, new body
        request("eve", 1),  # new key: eve already has 2 of 2
        request("sam", 1),
        request("sam", 1),
    ]
    results = await sku.scripts.reserve(sku.keys, reqs)
    assert results[1] == results[0] and results[0].reservation_id == first.reservation_id
    assert [r.outcome for r in results[2:]] == [
        "idempotency_mismatch", "limit_exceeded", "reserved", "reserved",
    ]  # fmt: skip
    assert results[3].counted == 2
    counts = await sku.assert_conserved()
    assert counts["active"] == 4
    assert {text(k): int(v) for k, v in (await client.hgetall(sku.keys.buyers)).items()} == {
        "eve": 2, "sam": 2,
    }  # fmt: skip
    assert len(await sku.events()) == 3
    assert len(await sku.deadline_index()) == 3


# -- transitions -----------------------------------------------------------------------------


async def test_happy_path_and_idempotent_transitions(client: aioredis.Redis) -> None:
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


async def test_a_paying_hold_never_expires(client: aioredis.Redis) -> None:
    sku = await make_sku(client, ttl_ms=150)
    rid = (await reserve(sku, request("pat", 1))).reservation_id
    assert rid
    assert (await sku.scripts.begin_payment(sku.keys, rid)).ok
    await asyncio.sleep(0.2)
    assert (await sku.scripts.expire(sku.keys, 100)).expired == []
    assert await sku.hold_state(rid) == "PAYING"
    assert (await sku.scripts.confirm(sku.keys, rid)).ok
    assert await client.zcard(sku.keys.deadlines) == 0  # the sweep dropped the spent member


async def test_illegal_transitions_change_nothing(client: aioredis.Redis) -> None:
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


async def test_release_from_paying_returns_stock(client: aioredis.Redis) -> None:
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


async def test_expiry_and_begin_payment_after_expiry(client: aioredis.Redis) -> None:
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
    clients = [aioredis.Redis.from_url(stack.require_redis()) for _ in range(2)]
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


# -- the allocator ---------------------------------------------------------------------------


async def test_allocator_coalesces_and_answers_each_caller(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=50, limit=1)
    allocator = SkuAllocator(sku.scripts, sku.keys, window=0.002, max_batch=64)
    results = await asyncio.gather(*(allocator.reserve(request(f"p{i}")) for i in range(200)))
    await allocator.aclose()
    assert sum(r.outcome == "reserved" for r in results) == 50
    assert sum(r.outcome == "sold_out" for r in results) == 150
    assert allocator.batches < 20  # 200 calls, a handful of script calls
    await sku.assert_conserved()


async def test_allocator_backpressure(client: aioredis.Redis) -> None:
    sku = await make_sku(client)
    allocator = SkuAllocator(sku.scripts, sku.keys, window=0.5, max_batch=100, max_waiting=5)
    waiting = [asyncio.ensure_future(allocator.reserve(request(f"q{i}"))) for i in range(5)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await allocator.reserve(request("q-extra"))
    with pytest.raises(InvalidInput):
        await allocator.reserve(request("bad\x1fbuyer"))
    await allocator.aclose()
    assert all(w.result().outcome == "reserved" for w in waiting)


class LostReply(HoldScripts):
    """The script runs, then the reply is lost (a timeout): the outcome is unknown."""

    def __init__(self, client: aioredis.Redis, failures: int) -> None:
        super().__init__(client)
        self.failures = failures

    async def reserve(self, keys: SkuKeys, requests: list[ReserveRequest]) -> list[ReserveResult]:
        results = await super().reserve(keys, requests)
        if self.failures:
            self.failures -= 1
            raise redis.exceptions.TimeoutError("reply lost")
        return results


async def test_timeout_retry_never_decrements_twice(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=10, limit=5)
    allocator = SkuAllocator(LostReply(client, failures=2), sku.keys, retry_backoff=0.001)
    reqs = [request("rae", 1), request("sam", 2)]
    results = await asyncio.gather(*(allocator.reserve(r) for r in reqs))
    await allocator.aclose()
    assert [r.reservation_id for r in results] == [r.reservation_id for r in reqs]
    counts = await sku.assert_conserved()
    assert (counts["active"], counts["available"]) == (3, 7)
    assert len(await sku.events()) == 2


# -- concurrency -----------------------------------------------------------------------------


async def test_twenty_thousand_attempts_never_oversell(stack: Settings) -> None:
    """20,000 attempts, 50 connections, 1,000 buyers retrying keys, 100 units, limit 2."""
    # 50 clients of exactly one connection each (a blocking pool waits for its connection).
    clients = [
        aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                stack.require_redis(), max_connections=1, timeout=None
            )
        )
        for _ in range(50)
    ]
    try:
        sku = await make_sku(clients[0], stock=100, limit=2)
        rng = random.Random(7)
        attempts = []
        for _ in range(20_000):
            buyer = f"buyer-{rng.randrange(1_000)}"
            # Few keys per buyer, so many attempts are retries of an earlier key.
            key = f"{buyer}-k{rng.randrange(3)}"
            qty = 1 if key.endswith(("k0", "k1")) else 2
            attempts.append(request(buyer, qty, key))
        allocators = [SkuAllocator(HoldScripts(c), sku.keys) for c in clients[:25]]
        direct = [HoldScripts(c) for c in clients[25:]]
        semaphore = asyncio.Semaphore(400)

        async def attempt(i: int, req: ReserveRequest) -> ReserveResult:
            async with semaphore:
                if i % 2:
                    return await allocators[i % 25].reserve(req)
                [result] = await direct[i % 25].reserve(sku.keys, [req])
                return result

        results = await asyncio.gather(*(attempt(i, r) for i, r in enumerate(attempts)))
        for allocator in allocators:
            await allocator.aclose()

        counts = await sku.assert_conserved()
        assert (counts["active"], counts["available"]) == (100, 0)
        raw_holds = (await clients[0].hgetall(sku.keys.holds)).values()
        holds = [HoldRecord.parse(v) for v in raw_holds]
        assert sum(h.quantity for h in holds) == 100
        per_buyer: dict[str, int] = {}
        for h in holds:
            per_buyer[h.buyer_id] = per_buyer.get(h.buyer_id, 0) + h.quantity
        assert max(per_buyer.values()) <= 2
        assert len(await sku.events()) == len(holds)
        # Every repeated key got its first answer (sale-state refusals aside: none here).
        first: dict[tuple[str, str], ReserveResult] = {}
        repeats = 0
        for req, result in zip(attempts, results, strict=True):
            scope = (req.buyer_id, req.idempotency_key)
            if scope in first:
                repeats += 1
                assert result == first[scope], (req, result, first[scope])
            else:
                first[scope] = result
        assert repeats > 10_000
    finally:
        for c in clients:
            await c.aclose()
            await c.connection_pool.disconnect()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reservation_id", ""),
        ("buyer_id", "a\x1fb"),
        ("idempotency_key", "k\x1e"),
        ("payment_ref", None),
        ("admission_id", 7),
        ("quantity", "1"),
        ("quantity", True),
    ],
)
def test_request_validation_names_the_field(field: str, value: object) -> None:
    changes: dict[str, Any] = {field: value}
    bad = replace(request("val"), **changes)
    with pytest.raises(InvalidInput) as caught:
        bad.validate()
    assert caught.value.field == field


def test_outbox_entry_must_carry_what_it_says() -> None:
    record = "ACTIVE\x1f1\x1f2000\x1ftok\x1fadm\x1f1000\x1f\x1fbuyer\x1fkey"
    entry = {"type": "reservation.created", "sale_id": "s", "sku": "k", "unit_price": "5",
             "currency": "EUR", "count": "2", "r-1": record}  # fmt: skip
    with pytest.raises(ValueError, match="says 2 holds"):
        outbox_events(entry)
    [event] = outbox_events({**entry, "count": "1"})
    assert (event.reservation_id, event.buyer_id, event.amount) == ("r-1", "buyer", 5)
    with pytest.raises(ValueError, match="malformed hold record"):
        HoldRecord.parse("ACTIVE\x1f1")


async def test_batched_transitions_keep_item_order_across_skus(client: aioredis.Redis) -> None:
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
