"""``flashsale bench allocate``: seven ways to decide "may this buyer have one unit?".

Every row works on one hot SKU with 1,000,000 units, driven by the same number of concurrent
callers from this one process, each caller awaiting one decision at a time. Rows run one after
the other in the same run, so their ratios are comparable even on a noisy machine.

Rows that talk to a server one request at a time share one pool size (``POOL``), so no row
wins by opening more connections. The ceiling row is deliberately not limited by the client:
it sends pre-packed, deep pipelines of ``DECR`` to show what the Redis server itself can do.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis

from allocator.hold_scripts import HoldScripts, ReserveRequest
from allocator.ids import new_reservation_id
from allocator.redis_calls import pack_command
from allocator.sale_scripts import SaleScripts
from allocator.sku_allocator import SkuAllocator
from flashsale.clients import RedisClient, redis_client
from flashsale.keys import SkuKeys, bucket_for, bucket_keys
from flashsale.settings import Settings
from loadtest.bench import (
    Report,
    Row,
    ServerSample,
    Target,
    cpu_seconds,
    drive,
    inconsistent,
    machine,
    table,
)
from loadtest.bench_allocate_postgres import postgres_rows

STOCK = 1_000_000
POOL = 64  # connections for the one-request-at-a-time rows (Postgres and Redis alike)
BUYERS = 10_000
CEILING_DEPTH = 1_000  # DECRs per pipeline in the ceiling row
CEILING_PIPELINES = 4  # pipelines in flight in the ceiling row
SELLOUT_STOCK = 3_000  # units of the bucket rows' sell-outs

# Targets of the allocation core (issue 3), checked against this run's own rows.
TARGET_PER_SECOND = 250_000
TARGET_SERVER_US = 1.0
TARGET_VS_POSTGRES = 10.0
TARGET_VS_PER_REQUEST = 3.0
TARGET_VS_CEILING = 0.15  # the batched row's share of the pipelined DECR ceiling

Progress = Callable[[str], None]


@dataclass(slots=True)
class Options:
    seconds: float = 3.0
    concurrency: int = 512
    max_batch: int = 256
    window: float = 0.001

    def command(self) -> str:
        """The command line that reproduces a run with these options."""
        return (f"flashsale bench allocate --seconds {self.seconds:g} --concurrency "
                f"{self.concurrency} --max-batch {self.max_batch}")  # fmt: skip


def _sku_meta(keys: SkuKeys) -> dict[str, str]:
    now = int(time.time() * 1000)
    return {
        "sale_id": keys.sale_id, "sku": keys.sku, "price": "1999", "currency": "EUR",
        "per_buyer_limit": str(STOCK), "hold_ttl_ms": "600000",
        "starts_at_ms": str(now - 1000), "ends_at_ms": str(now + 3_600_000), "status": "active",
    }  # fmt: skip


class Bench:
    def __init__(self, settings: Settings, options: Options, progress: Progress) -> None:
        self.settings = settings
        self.options = options
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:8]
        self.rows: list[Row] = []
        self._skus: list[SkuKeys] = []
        self._n = itertools.count()
        self.buyers = [f"bench-buyer-{i}" for i in range(BUYERS)]

    # -- helpers ----------------------------------------------------------------------------

    def redis(self, max_connections: int = POOL) -> RedisClient:
        """The engine's own client: one server, or a cluster (FLASHSALE_REDIS_CLUSTER=1)."""
        return redis_client(self.settings, max_connections=max_connections, wait_s=None)

    async def fresh_sku(self, client: RedisClient, name: str) -> SkuKeys:
        keys = SkuKeys(f"bench-{self.run_id}", name)
        await SaleScripts(client).preload(
            keys, total=STOCK, meta=_sku_meta(keys), force=True, first=True
        )
        self._skus.append(keys)
        return keys

    def request(self) -> ReserveRequest:
        n = next(self._n)
        buyer = self.buyers[n % BUYERS]
        return ReserveRequest(new_reservation_id(), buyer, 1, f"k{n}", "tok_bench", buyer)

    async def measure(
        self,
        name: str,
        what: str,
        op: Callable[[], Awaitable[Any]],
        *,
        client: RedisClient | None = None,
        command: str | None = None,
        granted: Callable[[], Awaitable[int]] | None = None,
        per_call: int = 1,
    ) -> Row:
        """Warm up, then drive ``op`` for the configured time and record a row. Each call of
        ``op`` makes ``per_call`` decisions."""
        for _ in range(50):
            await op()
        before = await ServerSample.take(client) if client is not None and command else None
        granted_before = await granted() if granted else 0
        cpu_before = time.process_time()
        calls, seconds = await drive(
            op, concurrency=self.options.concurrency, seconds=self.options.seconds
        )
        decisions = calls * per_call
        # This process's CPU per decision: what one more gateway process would have to add.
        client_cpu = (time.process_time() - cpu_before) * 1e6 / max(decisions, 1)
        extra: dict[str, Any] = {"client_cpu_us_per_decision": round(client_cpu, 3)}
        if before is not None and client is not None and command:
            extra |= (await ServerSample.take(client)).since(before, command, decisions)
        if granted is not None:
            # Every decision of a row is a grant (1,000,000 units never run out in one row):
            # the stock must have moved by exactly the decisions made, no more, no less.
            moved = await granted() - granted_before
            extra["stock_moved"] = moved
            extra["consistent"] = moved == decisions
        row = Row(name, what, decisions / seconds, decisions, seconds, extra)
        self.rows.append(row)
        self.progress(f"  {name:30} {row.per_second:>12,.0f}/s  ({decisions:,} in {seconds:.2f}s)")
        return row

    async def postgres_rows(self) -> str:
        return await postgres_rows(self.settings, f"bench-{self.run_id}", self.measure,
                                   stock=STOCK, connections=POOL)  # fmt: skip

    # -- Redis rows -------------------------------------------------------------------------

    async def redis_rows(self) -> str:
        client = self.redis()
        try:
            info: dict[str, Any] = await client.info("server")
            await self._decr_restore(client)
            await self._lua_per_request(client)
            await self._lua_batched(client)
            await self._ceiling(client)
            return str(info["redis_version"])
        finally:
            await self.cleanup(client)
            await client.aclose()

    async def _decr_restore(self, client: RedisClient) -> None:
        key = f"fs:{{bench-{self.run_id}:DECR}}:available"
        await client.set(key, STOCK)

        async def op() -> None:
            if await client.decrby(key, 1) < 0:
                await client.incrby(key, 1)

        async def moved() -> int:
            return STOCK - int(await client.get(key) or b"0")

        await self.measure(
            "redis_decr_restore", "DECRBY per request, INCRBY back when below zero", op,
            client=client, command="decrby", granted=moved,
        )  # fmt: skip
        await client.unlink(key)

    def _active(self, client: RedisClient, keys: SkuKeys) -> Callable[[], Awaitable[int]]:
        async def active() -> int:
            total, available, active, paying, sold = (
                int(v or 0) for v in await client.hmget(
                    keys.stock, "total", "available", "active", "paying", "sold"
                )
            )  # fmt: skip
            if total != available + active + paying + sold or available < 0:
                raise AssertionError(f"stock not conserved for {keys.sku}")
            return active

        return active

    async def _lua_per_request(self, client: RedisClient) -> None:
        keys = await self.fresh_sku(client, "PER-REQUEST")
        scripts = HoldScripts(client)

        async def op() -> None:
            await scripts.reserve(keys, [self.request()])

        await self.measure(
            "lua_per_request", "one reserve script call per buyer", op,
            client=client, command="evalsha", granted=self._active(client, keys),
        )  # fmt: skip

    async def _lua_batched(self, client: RedisClient) -> None:
        keys = await self.fresh_sku(client, "BATCHED")
        allocator = SkuAllocator(
            HoldScripts(client), keys, window=self.options.window, max_batch=self.options.max_batch
        )

        async def op() -> None:
            await allocator.reserve(self.request())

        batches_before = allocator.batches
        row = await self.measure(
            "lua_batched_allocator", "one awaited SkuAllocator.reserve per buyer, coalesced", op,
            client=client, command="evalsha", granted=self._active(client, keys),
        )  # fmt: skip
        await allocator.aclose()
        batches = allocator.batches - batches_before
        row.extra["mean_batch"] = round(row.decisions / max(batches, 1), 1)

    async def _ceiling(self, client: RedisClient) -> None:
        url = urlsplit(self.settings.require_redis())
        key = f"fs:{{bench-{self.run_id}:CEILING}}:available"
        await client.set(key, STOCK)
        host, port = url.hostname, url.port or 6379
        if isinstance(client, aioredis.RedisCluster):  # the node that serves the key
            node = client.get_node_from_key(key)
            assert node is not None
            host, port = node.host, int(node.port)
        blob = pack_command(("DECR", key)) * CEILING_DEPTH
        streams = []
        for _ in range(CEILING_PIPELINES):
            reader, writer = await asyncio.open_connection(host, port)
            parser = hiredis.Reader()
            if url.password:
                auth = ("AUTH", unquote(url.username), unquote(url.password)) if url.username \
                    else ("AUTH", unquote(url.password))  # fmt: skip
                writer.write(pack_command(auth))
                parser.feed(await reader.read(1024))
                reply = parser.gets()
                if isinstance(reply, Exception):
                    raise reply
            streams.append((reader, writer, parser))
        free = asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter, hiredis.Reader]]()
        for stream in streams:
            free.put_nowait(stream)

        async def pipeline() -> None:
            reader, writer, parser = await free.get()
            writer.write(blob)
            left = CEILING_DEPTH
            while left:
                parser.feed(await reader.read(65536))
                while left and parser.gets() is not False:
                    left -= 1
            free.put_nowait((reader, writer, parser))

        try:
            await self.measure(
                "redis_pipelined_decr_ceiling",
                f"raw DECR, {CEILING_PIPELINES} pipelines of {CEILING_DEPTH}, pre-packed",
                pipeline, client=client, command="decr", per_call=CEILING_DEPTH,
            )  # fmt: skip
        finally:
            for _, writer, _ in streams:
                writer.close()
            await client.unlink(key)

    # -- on a Redis Cluster -----------------------------------------------------------------

    async def cluster_rows(self, settings: Settings, buckets: int = 1) -> None:
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
            one = await self.fresh_sku(client, "CLUSTER-ONE")
            await self._spread_row(
                client,
                [one],
                f"cluster{n}_one_hot_sku",
                f"batched allocator, one hot SKU on a {n}-primary cluster",
            )
            per_node: dict[str, SkuKeys] = {}
            for i in itertools.count():
                keys = SkuKeys(f"bench-{self.run_id}", f"CLUSTER-{i}")
                node = client.get_node_from_key(keys.stock)
                if node is not None and node.name not in per_node:
                    per_node[node.name] = await self.fresh_sku(client, keys.sku)
                if len(per_node) == n:
                    break
            await self._spread_row(
                client,
                list(per_node.values()),
                f"cluster{n}_sku_per_primary",
                f"batched allocator, {n} hot SKUs, one per primary",
            )
            if buckets > 1:
                await self._bucket_rows(client, n, buckets)
        finally:
            await self.cleanup(client)
            await client.aclose()

    async def _spread_row(
        self, client: aioredis.RedisCluster, skus: list[SkuKeys], name: str, what: str
    ) -> None:
        allocators = [SkuAllocator(HoldScripts(client), k, window=self.options.window,
                                   max_batch=self.options.max_batch) for k in skus]  # fmt: skip
        turn = itertools.count()
        made = [0] * len(skus)

        async def op() -> None:
            i = next(turn) % len(skus)
            await allocators[i].reserve(self.request())
            made[i] += 1

        async def active() -> int:
            return sum([await self._active(client, k)() for k in skus])

        primaries = client.get_primaries()
        before = await client.info("cpu", target_nodes=primaries)
        batches_before = sum(a.batches for a in allocators)
        row = await self.measure(name, what, op, client=client, command="evalsha",
                                 granted=active)  # fmt: skip
        after = await client.info("cpu", target_nodes=primaries)
        batches = sum(a.batches for a in allocators) - batches_before
        row.extra["mean_batch"] = round(row.decisions / max(batches, 1), 1)
        for allocator in allocators:
            await allocator.aclose()
        decided_at = [(k.stock, m) for k, m in zip(skus, made, strict=True)]
        row.extra["nodes"] = _node_shares(client, before, after, decided_at)

    def allocator(self, client: RedisClient, keys: SkuKeys, buckets: int = 1) -> SkuAllocator:
        return SkuAllocator(HoldScripts(client), keys, buckets=buckets, window=self.options.window,
                            max_batch=self.options.max_batch)  # fmt: skip

    async def bucketed_sku(self, client: RedisClient, name: str, buckets: int,
                           stock: int) -> list[SkuKeys]:  # fmt: skip
        """A SKU split into ``buckets`` stock buckets holding ``stock`` units between them."""
        keys = bucket_keys(f"bench-{self.run_id}", name, buckets)
        scripts = SaleScripts(client)
        for k in keys:
            share = stock // buckets + (1 if k.bucket < stock % buckets else 0)
            meta = {**_sku_meta(k), "buckets": str(buckets), "stock_total": str(stock)}
            await scripts.preload(k, total=share, meta=meta, force=True, first=True)
        self._skus += keys
        return keys

    async def _bucket_rows(self, client: aioredis.RedisCluster, n: int, buckets: int) -> None:
        """One hot SKU in ``buckets`` stock buckets: its decisions/s, per primary; then two
        sell-outs of a small stock (buyers spread by their hash, and every buyer hashing to
        one bucket), which must leave no unit unsold."""
        keys = await self.bucketed_sku(client, "BUCKETED", buckets, STOCK)
        allocator = self.allocator(client, keys[0], buckets)
        made = [0] * buckets

        async def op() -> None:
            request = self.request()
            await allocator.reserve(request)
            made[allocator.bucket_of(request.buyer_id)] += 1

        async def active() -> int:
            return sum([await self._active(client, k)() for k in keys])

        primaries = client.get_primaries()
        before = await client.info("cpu", target_nodes=primaries)
        batches_before = allocator.batches
        row = await self.measure(
            f"cluster{n}_one_sku_{buckets}_buckets",
            f"batched allocator, one hot SKU in {buckets} stock buckets", op,
            client=client, command="evalsha", granted=active,
        )  # fmt: skip
        after = await client.info("cpu", target_nodes=primaries)
        row.extra["mean_batch"] = round(row.decisions / max(allocator.batches - batches_before,
                                                            1), 1)  # fmt: skip
        await allocator.aclose()
        decided_at = [(k.stock, m) for k, m in zip(keys, made, strict=True)]
        row.extra["nodes"] = _node_shares(client, before, after, decided_at)
        for skew in ("spread", "one_bucket"):
            await self._sellout(client, n, buckets, skew)

    async def _sellout(self, client: aioredis.RedisCluster, n: int, buckets: int,
                       skew: str) -> None:  # fmt: skip
        stock = SELLOUT_STOCK
        keys = await self.bucketed_sku(client, f"SELLOUT-{skew}", buckets, stock)
        allocator = self.allocator(client, keys[0], buckets)
        buyers = (f"sellout-{self.run_id}-{i}" for i in itertools.count())
        if skew == "one_bucket":
            buyers = (b for b in buyers if bucket_for(b, buckets) == 0)
        people = list(itertools.islice(buyers, stock + stock // 2))
        began = time.perf_counter()
        gate = asyncio.Semaphore(self.options.concurrency)

        async def one(buyer: str) -> str:
            async with gate:
                request = ReserveRequest(new_reservation_id(), buyer, 1, "k", "tok_bench", buyer)
                return (await allocator.reserve(request)).outcome

        outcomes = await asyncio.gather(*(one(b) for b in people))
        seconds = time.perf_counter() - began
        await allocator.aclose()
        counts = [await self._active(client, k)() for k in keys]
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
        self.rows.append(row)
        self.progress(f"  {row.name:30} under-sell {stock - granted}, "
                      f"{allocator.borrowed} transfers")  # fmt: skip

    async def cleanup(self, client: RedisClient) -> None:
        for keys in self._skus:
            await client.unlink(*keys.all(), keys.transfers, keys.received)


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


def check_targets(rows: list[Row]) -> list[Target]:
    by = {r.name: r for r in rows}
    batched = by["lua_batched_allocator"]
    per_request = by["lua_per_request"]
    best_pg = max((r for r in rows if r.name.startswith("pg_")), key=lambda r: r.per_second)
    server_us = float(batched.extra["server_us_per_decision"])
    vs_pg = batched.per_second / best_pg.per_second
    vs_lua = batched.per_second / per_request.per_second
    ceiling = by.get("redis_pipelined_decr_ceiling")
    vs_ceiling = batched.per_second / ceiling.per_second if ceiling else 0.0
    return [
        Target("batched decisions/s from one process", f">= {TARGET_PER_SECOND:,}",
               f"{batched.per_second:,.0f}", batched.per_second >= TARGET_PER_SECOND),
        Target("Redis server us per batched decision", f"<= {TARGET_SERVER_US}",
               f"{server_us:.2f}", server_us <= TARGET_SERVER_US),
        Target(f"batched vs best Postgres row ({best_pg.name})", f">= {TARGET_VS_POSTGRES:.0f}x",
               f"{vs_pg:.1f}x", vs_pg >= TARGET_VS_POSTGRES),
        Target("batched vs lua_per_request", f">= {TARGET_VS_PER_REQUEST:.0f}x", f"{vs_lua:.1f}x",
               vs_lua >= TARGET_VS_PER_REQUEST),
        Target("batched vs the pipelined DECR ceiling", f">= {TARGET_VS_CEILING:.0%}",
               f"{vs_ceiling:.1%}", vs_ceiling >= TARGET_VS_CEILING),
    ]  # fmt: skip


FAILURE = "stock moved by a different amount than decisions in"


def failed(report: Report) -> list[str]:
    """The rows whose check failed (named after ``FAILURE``)."""
    return inconsistent(report)


async def run(
    settings: Settings,
    options: Options,
    progress: Progress,
    command: str,
    *,
    cluster: Settings | None = None,
    buckets: int = 1,
) -> Report:
    """Every row on ``settings``' servers; with ``cluster`` (settings of a Redis Cluster), the
    cluster rows too."""
    bench = Bench(settings, options, progress)
    progress(
        f"bench allocate: {options.concurrency} concurrent callers, {options.seconds:g}s per row,"
        f" {STOCK:,} units per SKU"
    )
    pg_version = await bench.postgres_rows()
    redis_version = await bench.redis_rows()
    if cluster is not None:
        await bench.cluster_rows(cluster, buckets)
    ceiling = next(r for r in bench.rows if r.name == "redis_pipelined_decr_ceiling")
    for row in bench.rows:
        row.extra["ratio_to_ceiling"] = round(row.per_second / ceiling.per_second, 4)
    return Report(
        benchmark="allocate",
        command=command,
        rows=bench.rows,
        targets=check_targets(bench.rows),
        machine=machine(redis=redis_version, postgres=pg_version),
        config={
            "stock": STOCK, "concurrency": options.concurrency, "seconds_per_row": options.seconds,
            "pool_connections": POOL, "max_batch": options.max_batch, "window_s": options.window,
            "buyers": BUYERS,
        },
    )  # fmt: skip


def render(report: Report) -> str:
    rows = [
        (r.name, r.per_second, r.extra.get("server_us_per_decision"),
         r.extra.get("server_cpu_us_per_decision"), r.extra.get("client_cpu_us_per_decision"),
         r.extra.get("ratio_to_ceiling"), r.extra.get("mean_batch"))
        for r in report.rows
    ]  # fmt: skip
    targets = [(t.name, t.goal, t.measured, "met" if t.met else "MISSED") for t in report.targets]
    nodes = [(r.name, node, f"{v['share']:.1%}", v["server_cpu_us_per_decision"])
             for r in report.rows for node, v in r.extra.get("nodes", {}).items()]  # fmt: skip
    sellouts = [(r.name, r.decisions, r.extra["granted"], r.extra["under_sell"],
                 r.extra["transfers"]) for r in report.rows if "under_sell" in r.extra]  # fmt: skip
    return "\n\n".join([
        table(("row", "decisions/s", "server us/dec", "server cpu us/dec", "client cpu us/dec",
               "x ceiling", "mean batch"), rows),
        *([table(("cluster row", "primary", "share of decisions", "server cpu us/dec"), nodes)]
          if nodes else []),
        *([table(("sell-out", "buyers", "granted", "under-sell", "transfers"), sellouts)]
          if sellouts else []),
        table(("target", "goal", "measured", ""), targets),
    ])  # fmt: skip
