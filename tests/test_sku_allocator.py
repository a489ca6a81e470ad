"""The per-SKU allocator against real Redis: coalescing, back-pressure, a lost reply retried,
and 20,000 concurrent attempts that never oversell."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from allocator.batching import Coalescer
from allocator.hold_scripts import HoldScripts, ReserveRequest
from allocator.sku_allocator import SkuAllocator
from flashsale.clients import redis_client
from flashsale.errors import InvalidInput, Overloaded
from flashsale.inflight import InFlight
from flashsale.keys import SkuKeys
from flashsale.records import HoldRecord, ReserveResult
from flashsale.settings import Settings
from tests.holds import make_sku, request


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
    """The script runs, then the reply is lost with its connection: the outcome is unknown.
    (A timeout is not retried: a server that does not answer in time is down, and the
    caller's own retry, by the same key, settles the outcome.)"""

    def __init__(self, client: aioredis.Redis, failures: int) -> None:
        super().__init__(client)
        self.failures = failures

    async def reserve(self, keys: SkuKeys, requests: list[ReserveRequest], *,
                      with_holds: bool = False) -> list[ReserveResult]:  # fmt: skip
        results = await super().reserve(keys, requests, with_holds=with_holds)
        if self.failures:
            self.failures -= 1
            raise redis.exceptions.ConnectionError("connection lost before the reply")
        return results


async def test_a_retry_after_a_lost_reply_never_decrements_twice(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=10, limit=5)
    allocator = SkuAllocator(LostReply(client, failures=2), sku.keys, retry_backoff=0.001)
    reqs = [request("rae", 1), request("sam", 2)]
    results = await asyncio.gather(*(allocator.reserve(r) for r in reqs))
    await allocator.aclose()
    assert [r.reservation_id for r in results] == [r.reservation_id for r in reqs]
    counts = await sku.assert_conserved()
    assert (counts["active"], counts["available"]) == (3, 7)
    assert len(await sku.events()) == 2


async def test_twenty_thousand_attempts_never_oversell(stack: Settings) -> None:
    """20,000 attempts, 50 connections, 1,000 buyers retrying keys, 100 units, limit 2."""
    # 50 clients of one connection each (a blocking pool waits for its connection; on a
    # cluster, a few per node).
    clients = [redis_client(stack, max_connections=1, wait_s=None) for _ in range(50)]
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


async def test_a_call_that_answers_the_wrong_number_of_items_fails_every_caller() -> None:
    """A batched call must answer each item; one that does not (a script given the wrong
    argument layout) fails every caller of its batch instead of leaving them waiting."""

    async def short(items: list[str]) -> list[str]:
        return items[1:]

    batches: Coalescer[str, str] = Coalescer(short, "test", window=0.001)
    results = await asyncio.wait_for(
        asyncio.gather(*(batches.submit(x) for x in "abc"), return_exceptions=True), 5
    )
    assert [type(r) for r in results] == [RuntimeError] * 3
    assert "2 results for 3 items" in str(results[0])


async def test_reads_in_flight_are_shared_until_done_and_failures_reach_every_caller() -> None:
    reads = 0
    gate = asyncio.Event()

    async def read() -> int:
        nonlocal reads
        reads += 1
        await gate.wait()
        if reads == 2:
            raise RuntimeError("down")
        return reads

    shared: InFlight[str, int] = InFlight()
    waiting = [asyncio.ensure_future(shared.once("a", read)) for _ in range(10)]
    await asyncio.sleep(0)
    waiting[0].cancel()  # one caller goes away: the read goes on for the others
    gate.set()
    results = await asyncio.gather(*waiting[1:])
    assert results == [1] * 9 and reads == 1
    gate.clear()
    again = [asyncio.ensure_future(shared.once("a", read)) for _ in range(3)]  # a new read
    await asyncio.sleep(0)
    gate.set()
    failed = await asyncio.gather(*again, return_exceptions=True)
    assert reads == 2 and all(isinstance(f, RuntimeError) for f in failed)
