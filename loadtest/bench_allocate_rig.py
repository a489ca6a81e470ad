"""The rig of ``flashsale bench allocate``: its options, and what every row shares (fresh SKUs,
buyers' requests, measuring and recording a row)."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from allocator.hold_scripts import HoldScripts, ReserveRequest
from allocator.ids import new_reservation_id
from allocator.sale_scripts import SaleScripts
from allocator.sku_allocator import SkuAllocator
from flashsale.clients import RedisClient, redis_client
from flashsale.keys import SkuKeys, bucket_keys
from flashsale.settings import Settings
from loadtest.bench import Row, ServerSample, drive

STOCK = 1_000_000
POOL = 64  # connections for the one-request-at-a-time rows (Postgres and Redis alike)
BUYERS = 10_000
CEILING_DEPTH = 1_000  # DECRs per pipeline in the ceiling row
CEILING_PIPELINES = 4  # pipelines in flight in the ceiling row
SELLOUT_STOCK = 3_000  # units of the bucket rows' sell-outs

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


def sku_meta(keys: SkuKeys) -> dict[str, str]:
    now = int(time.time() * 1000)
    return {
        "sale_id": keys.sale_id, "sku": keys.sku, "price": "1999", "currency": "EUR",
        "per_buyer_limit": str(STOCK), "hold_ttl_ms": "600000",
        "starts_at_ms": str(now - 1000), "ends_at_ms": str(now + 3_600_000), "status": "active",
    }  # fmt: skip


class Rig:
    """What every row of the benchmark shares: fresh SKUs, buyers' requests, measuring a row
    and recording it."""

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
            keys, total=STOCK, meta=sku_meta(keys), force=True, first=True
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

    def active(self, client: RedisClient, keys: SkuKeys) -> Callable[[], Awaitable[int]]:
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
            meta = {**sku_meta(k), "buckets": str(buckets), "stock_total": str(stock)}
            await scripts.preload(k, total=share, meta=meta, force=True, first=True)
        self._skus += keys
        return keys

    async def cleanup(self, client: RedisClient) -> None:
        for keys in self._skus:
            await client.unlink(*keys.all(), keys.transfers, keys.received)
