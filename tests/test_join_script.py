"""``lua/join.lua`` on its own, batched, against the real Redis; and the per-sale coalescer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from allocator.queue_scripts import MAX_JOIN_BATCH, JoinResult, Joins, QueueScripts
from allocator.rate_limits import NO_LIMITS, RateKeys
from allocator.sale_scripts import SaleScripts
from flashsale.clients import RedisClient, redis_client
from flashsale.keys import SaleKeys
from flashsale.records import text
from flashsale.settings import Rate, Settings


@pytest.fixture
async def client(stack: Settings) -> AsyncIterator[RedisClient]:
    c = redis_client(stack, decode_responses=True)
    yield c
    await c.aclose()


async def open_sale(
    client: RedisClient, *, started: bool = True, max_queue: int = 1000
) -> SaleKeys:
    keys = SaleKeys(f"join-{uuid.uuid4().hex[:10]}")
    now = int(time.time() * 1000)
    starts = now - 1000 if started else now + 3_600_000
    await SaleScripts(client).put_sale(keys, {
        "status": "active", "starts_at_ms": str(starts), "ends_at_ms": str(now + 7_200_000),
        "max_queue": str(max_queue),
    }, open_queue=True)  # fmt: skip
    return keys


def outcomes(results: list[JoinResult]) -> list[tuple[str, int]]:
    return [(r.outcome, r.position) for r in results]


async def test_batch_is_fifo_and_idempotent_within_and_across_batches(
    client: RedisClient,
) -> None:
    scripts = QueueScripts(client)
    keys = await open_sale(client)
    first = await scripts.join(keys, ["a", "b", "a", "c"])
    assert outcomes(first) == [("queued", 1), ("queued", 2), ("queued", 1), ("queued", 3)]
    again = await scripts.join(keys, ["c", "d", "b"])
    assert outcomes(again) == [("queued", 3), ("queued", 4), ("queued", 2)]
    assert await client.hget(keys.queue, "tail") == "4"
    assert await client.hgetall(keys.members) == {"a": "1", "b": "2", "c": "3", "d": "4"}


async def test_pre_queue_batch_counts_each_buyer_once(client: RedisClient) -> None:
    scripts = QueueScripts(client)
    keys = await open_sale(client, started=False, max_queue=3)
    results = await scripts.join(keys, ["a", "b", "a", "c", "d"])
    assert outcomes(results) == [
        ("queued", 0), ("queued", 0), ("queued", 0), ("queued", 0), ("full", 0),
    ]  # fmt: skip
    assert await client.hget(keys.queue, "pre") == "3"
    assert await client.hget(keys.queue, "sealed") is None  # before the start: not sealed


async def test_cap_cutoff_and_sold_out_inside_one_batch(client: RedisClient) -> None:
    scripts = QueueScripts(client)
    keys = await open_sale(client, max_queue=2)
    assert outcomes(await scripts.join(keys, ["a", "b", "c"])) == [
        ("queued", 1), ("queued", 2), ("full", 0),
    ]  # fmt: skip
    await client.hset(keys.queue, mapping={"serving": 2, "cutoff": 3})
    assert outcomes(await scripts.join(keys, ["d", "e", "a"])) == [
        ("queued", 3), ("sold_out", 0), ("queued", 1),
    ]  # fmt: skip
    await client.hset(keys.queue, "sold_out", 1)
    assert outcomes(await scripts.join(keys, ["f", "d"])) == [("sold_out", 0), ("queued", 3)]
    assert await client.hget(keys.queue, "tail") == "3"


async def test_unknown_and_ended_sales_write_nothing(client: RedisClient) -> None:
    scripts = QueueScripts(client)
    missing = SaleKeys(f"join-missing-{uuid.uuid4().hex[:8]}")
    assert outcomes(await scripts.join(missing, ["a", "b"])) == [
        ("unavailable", 0), ("unavailable", 0),
    ]  # fmt: skip
    assert not await client.exists(missing.queue, missing.members)
    keys = await open_sale(client)
    await client.hset(keys.sale, "status", "ended")
    assert outcomes(await scripts.join(keys, ["a"])) == [("ended", 0)]
    assert not await client.exists(keys.members)
    assert [text(f) for f in await client.hkeys(keys.queue)] == ["live"]  # as preloaded


async def test_batch_size_is_bounded(client: RedisClient) -> None:
    scripts = QueueScripts(client)
    keys = await open_sale(client)
    with pytest.raises(ValueError, match=r"1\.\.256"):
        await scripts.join(keys, [f"b{i}" for i in range(MAX_JOIN_BATCH + 1)])
    with pytest.raises(ValueError):
        await scripts.join(keys, [])


async def test_concurrent_joins_share_script_calls_and_positions_stay_unique(
    client: RedisClient,
) -> None:
    joins = Joins(QueueScripts(client), window=0.005)
    keys = await open_sale(client, max_queue=10_000)
    buyers = [f"b{i}" for i in range(1000)] + [f"b{i}" for i in range(0, 1000, 7)]
    results = await asyncio.gather(*(joins.join(keys, b) for b in buyers))
    coalescer = joins.get(keys)
    await joins.aclose()
    by_buyer: dict[str, int] = {}
    for buyer, result in zip(buyers, results, strict=True):
        assert result.outcome == "queued"
        assert by_buyer.setdefault(buyer, result.position) == result.position
    assert sorted(by_buyer.values()) == list(range(1, 1001))
    assert coalescer.batches < 50  # 1,143 joins, a handful of script calls


async def test_a_join_counts_its_rate_limits_in_the_same_call(client: RedisClient) -> None:
    """A gated join (a single Redis node: the gateway passes the rate-limit keys with the
    join) is counted against its per-IP and per-buyer limits first; one over a limit is
    answered rate_limited with the wait in microseconds, and not queued. Later joins of the
    batch see the earlier ones' counts."""
    scripts = QueueScripts(client)
    keys = await open_sale(client)
    # The rate keys share the sale's slot here, so the test also runs on a cluster (the
    # gateway gates joins on a single node only, where its keys' slots do not matter).
    ip, per = f"{keys.tag}:test-rl:ip", f"{keys.tag}:test-rl:buyer:"
    rates = (*Rate(1.0, 4).gcra_us(), *Rate(1.0, 2).gcra_us())  # IP: burst 4, buyer: burst 2

    def limits(buyer: str) -> RateKeys:
        return RateKeys(ip, per + buyer, rates)

    buyers = ["a", "a", "a", "b", "c"]
    joined = await scripts.join(keys, buyers, [limits(b) for b in buyers])
    # a, a: the buyer's burst of 2; the third a: over its own limit, still counted by the IP
    # (as every rate check does: a refusal by one limit errs on the side of limiting). b: the
    # IP's fourth. c: over the IP's burst.
    assert [r.outcome for r in joined] == ["queued", "queued", "rate_limited", "queued",
                                           "rate_limited"]  # fmt: skip
    assert joined[0].position == joined[1].position == 1 and joined[3].position == 2
    assert 0 < joined[2].position <= 1_000_000 and 0 < joined[4].position <= 1_000_000
    # Not queued, and the counts are kept (as lua/ratelimit.lua keeps them: the theoretical
    # arrival time in us, expiring once it has passed).
    assert await scripts.positions_of(keys, ["c"]) == [None]
    for key in (ip, per + "a", per + "b"):
        assert int(await client.get(key) or 0) > time.time() * 1_000_000
        assert 0 < await client.pttl(key) <= 5_000
    # A join without limits beside gated ones is not counted (its KEYS index is 0), and a
    # batch with no limit at all (rate limits off) is an ungated call.
    mixed = await scripts.join(keys, ["d", "e"], [NO_LIMITS, limits("e")])
    assert [r.outcome for r in mixed] == ["queued", "rate_limited"]
    assert outcomes(await scripts.join(keys, ["h", "i"], [NO_LIMITS] * 2)) == [
        ("queued", 4), ("queued", 5)]  # fmt: skip
    # The Joins coalescer passes the limits of the joins that carry them.
    joins = Joins(scripts, window=0.005)
    results = await asyncio.gather(joins.join(keys, "f"), joins.join(keys, "g", limits("g")))
    await joins.aclose()
    assert [r.outcome for r in results] == ["queued", "rate_limited"]


async def test_a_waiting_room_redis_lost_takes_no_one_until_restored(
    client: RedisClient,
) -> None:
    """The queue hash is gone (FLUSHALL, eviction, a stray DEL) while the sale is configured:
    joining again would hand out positions 1, 2, ... a second time. It answers unavailable."""
    scripts = QueueScripts(client)
    keys = await open_sale(client)
    assert outcomes(await scripts.join(keys, ["a", "b"])) == [("queued", 1), ("queued", 2)]
    await client.delete(keys.queue)
    assert outcomes(await scripts.join(keys, ["c", "a"])) == [("unavailable", 0)] * 2
    # Re-putting the sale (a later preload) does not reopen it; only a restore does.
    await SaleScripts(client).put_sale(keys, {"status": "active"}, open_queue=False)
    assert outcomes(await scripts.join(keys, ["c"])) == [("unavailable", 0)]
