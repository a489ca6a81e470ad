"""The Redis Cluster rows of ``flashsale bench allocate --cluster N --buckets B``: one hot SKU,
one per primary, one split into stock buckets, and two sell-outs that must leave nothing unsold.
Each row records every primary's share of the decisions and its server CPU per decision."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import redis.asyncio as aioredis

from allocator.hold_scripts import HoldScripts, ReserveRequest
from allocator.ids import new_reservation_id
from allocator.sku_allocator import SkuAllocator
from flashsale.clients import redis_client
from flashsale.keys import SkuKeys, bucket_for
from flashsale.ops_endpoints import info_of_primaries
from flashsale.settings import Settings
from loadtest.bench import Row, cpu_seconds
from loadtest.bench_allocate_rig import POOL, STOCK, Rig

SELLOUT_STOCK = 3_000  # units of the bucket rows' sell-outs


async def cluster_rows(rig: Rig, settings: Settings, buckets: int = 1) -> None:
    """The batched allocator on a Redis Cluster: one hot SKU (one node does the work),
    then one hot SKU per primary, the callers spread over them, and with ``buckets`` > 1
    one hot SKU split into that many stock buckets. Each row records every primary's
    share of the decisions and its server CPU per decision."""
    client = redis_client(settings, max_connections=POOL, wait_s=None)
    assert isinstance(client, aioredis.RedisCluster)
    try:
        await client.initialize()
        primaries = client.get_primaries()
        n = len(primaries)
        one = await rig.fresh_sku(client, "CLUSTER-ONE")
        await _spread_row(
            rig,
            client,
            [one],
            f"cluster{n}_one_hot_sku",
            f"batched allocator, one hot SKU on a {n}-primary cluster",
        )
        per_node: dict[str, SkuKeys] = {}
        for i in itertools.count():
            keys = SkuKeys(f"bench-{rig.run_id}", f"CLUSTER-{i}")
            node = client.get_node_from_key(keys.stock)
            if node is not None and node.name not in per_node:
                per_node[node.name] = await rig.fresh_sku(client, keys.sku)
            if len(per_node) == n:
                break
        await _spread_row(
            rig,
            client,
            list(per_node.values()),
            f"cluster{n}_sku_per_primary",
            f"batched allocator, {n} hot SKUs, one per primary",
        )
        if buckets > 1:
            await _bucket_rows(rig, client, n, buckets)
    finally:
        await rig.cleanup(client)
        await client.aclose()


async def _spread_row(
    rig: Rig, client: aioredis.RedisCluster, skus: list[SkuKeys], name: str, what: str
) -> None:
    allocators = [SkuAllocator(HoldScripts(client), k, window=rig.options.window,
                               max_batch=rig.options.max_batch) for k in skus]  # fmt: skip
    turn = itertools.count()
    made = [0] * len(skus)

    async def op() -> None:
        i = next(turn) % len(skus)
        await allocators[i].reserve(rig.request())
        made[i] += 1

    async def active() -> int:
        return sum([await rig.active(client, k)() for k in skus])

    before = await info_of_primaries(client, "cpu")
    batches_before = sum(a.batches for a in allocators)
    row = await rig.measure(name, what, op, client=client, command="evalsha",
                             granted=active)  # fmt: skip
    after = await info_of_primaries(client, "cpu")
    batches = sum(a.batches for a in allocators) - batches_before
    row.extra["mean_batch"] = round(row.decisions / max(batches, 1), 1)
    for allocator in allocators:
        await allocator.aclose()
    decided_at = [(k.stock, m) for k, m in zip(skus, made, strict=True)]
    row.extra["nodes"] = _node_shares(client, before, after, decided_at)


async def _bucket_rows(rig: Rig, client: aioredis.RedisCluster, n: int, buckets: int) -> None:
    """One hot SKU in ``buckets`` stock buckets: its decisions/s, per primary; then two
    sell-outs of a small stock (buyers spread by their hash, and every buyer hashing to
    one bucket), which must leave no unit unsold."""
    keys = await rig.bucketed_sku(client, "BUCKETED", buckets, STOCK)
    allocator = rig.allocator(client, keys[0], buckets)
    made = [0] * buckets

    async def op() -> None:
        request = rig.request()
        await allocator.reserve(request)
        made[allocator.bucket_of(request.buyer_id)] += 1

    async def active() -> int:
        return sum([await rig.active(client, k)() for k in keys])

    before = await info_of_primaries(client, "cpu")
    batches_before = allocator.batches
    row = await rig.measure(
        f"cluster{n}_one_sku_{buckets}_buckets",
        f"batched allocator, one hot SKU in {buckets} stock buckets", op,
        client=client, command="evalsha", granted=active,
    )  # fmt: skip
    after = await info_of_primaries(client, "cpu")
    row.extra["mean_batch"] = round(row.decisions / max(allocator.batches - batches_before,
                                                        1), 1)  # fmt: skip
    await allocator.aclose()
    decided_at = [(k.stock, m) for k, m in zip(keys, made, strict=True)]
    row.extra["nodes"] = _node_shares(client, before, after, decided_at)
    for skew in ("spread", "one_bucket"):
        await _sellout(rig, client, n, buckets, skew)


async def _sellout(rig: Rig, client: aioredis.RedisCluster, n: int, buckets: int,
                   skew: str) -> None:  # fmt: skip
    stock = SELLOUT_STOCK
    keys = await rig.bucketed_sku(client, f"SELLOUT-{skew}", buckets, stock)
    allocator = rig.allocator(client, keys[0], buckets)
    buyers = (f"sellout-{rig.run_id}-{i}" for i in itertools.count())
    if skew == "one_bucket":
        buyers = (b for b in buyers if bucket_for(b, buckets) == 0)
    people = list(itertools.islice(buyers, stock + stock // 2))
    began = time.perf_counter()
    gate = asyncio.Semaphore(rig.options.concurrency)

    async def one(buyer: str) -> str:
        async with gate:
            request = ReserveRequest(new_reservation_id(), buyer, 1, "k", "tok_bench", buyer)
            return (await allocator.reserve(request)).outcome

    outcomes = await asyncio.gather(*(one(b) for b in people))
    seconds = time.perf_counter() - began
    await allocator.aclose()
    counts = [await rig.active(client, k)() for k in keys]
    available = sum([int(await client.hget(k.stock, "available") or 0) for k in keys])
    granted = outcomes.count("reserved")
    row = Row(f"cluster{n}_{buckets}_buckets_sellout_{skew}",
              f"{len(people):,} buyers ({skew.replace('_', ' ')}) for {stock:,} units in "
              f"{buckets} buckets", len(people) / seconds, len(people), seconds, {
                  "granted": granted, "under_sell": stock - granted,
                  "available_left": available, "transfers": allocator.borrowed,
                  "sold_out_answers": outcomes.count("sold_out"),
                  "consistent": granted == stock == sum(counts) and available == 0,
              })  # fmt: skip
    rig.rows.append(row)
    rig.progress(f"  {row.name:30} under-sell {stock - granted}, "
                  f"{allocator.borrowed} transfers")  # fmt: skip


def _node_shares(client: aioredis.RedisCluster, before: dict[str, Any], after: dict[str, Any],
                 decided_at: list[tuple[str, int]]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each primary's share of the decisions (``decided_at``: a key and the decisions made on
    its slot) and its server CPU per decision, from INFO cpu before and after."""
    total = max(sum(m for _, m in decided_at), 1)
    nodes = {}
    for node in client.get_primaries():
        decided = sum(m for key, m in decided_at if client.get_node_from_key(key) == node)
        cpu = cpu_seconds(after[node.name]) - cpu_seconds(before[node.name])
        nodes[node.name] = {
            "share": round(decided / total, 3),
            "server_cpu_us_per_decision": round(cpu * 1e6 / decided, 3) if decided else None,
        }
    return nodes
