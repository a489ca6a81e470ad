"""The order pipeline over the real stack, for tests: sales set up through SaleAdmin, holds
reserved through the Lua scripts, the outbox relay and the payment simulator running in the
test's loop, and workers in-process or as real ``flashsale workers`` processes.

Each harness has its own topics (a unique prefix) and consumer group, so tests never see each
other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition

from allocator.hold_scripts import HoldScripts, ReserveRequest
from allocator.queue_scripts import QueueScripts
from allocator.relay import OutboxRelay, run_relay
from allocator.sale_admin import SaleAdmin
from allocator.sku_allocator import Allocators
from flashsale.cli.devstack.processes import free_port
from flashsale.clients import RedisClient, pg_pool, redis_client
from flashsale.events import ReservationEvent, decode_event
from flashsale.kafka import client_options, consumer_lag, ensure_topics, producer
from flashsale.keys import SaleKeys, SkuKeys, bucket_keys
from flashsale.orders import TERMINAL, OrderStore
from flashsale.payments import CircuitBreaker, HttpProvider
from flashsale.salespec import parse_sale
from flashsale.settings import Settings
from flashsale.topics import Topics
from loadtest.bench import ServerSample
from loadtest.processes import stop_all
from workers.payment_simulator import Knobs, Simulator
from workers.service import BATCH_PLANNING, WorkerService

SKU = "SKU-1"
SESSION_S = 2.0


@dataclass
class Workers:
    """An in-process WorkerService and how to stop it (drain)."""

    service: WorkerService
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def drain(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


@dataclass
class Pipeline:
    settings: Settings
    pool: asyncpg.Pool
    redis: RedisClient
    psp: Simulator
    psp_url: str
    relay: OutboxRelay
    psp_site: web.TCPSite | None = None
    skus: list[SkuKeys] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)  # sale -> stock buckets of its SKU
    workers: list[Workers] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def holds(self) -> HoldScripts:
        return HoldScripts(self.redis)

    async def sale(
        self, *, stock: int = 100, limit: int = 5, ttl: int = 120, buckets: int = 1,
        skus: int = 1,
    ) -> str:  # fmt: skip
        """A live sale, preloaded: SKU-1 (reserved by :meth:`reserve`) and ``skus`` - 1 more
        like it, SKU-2, SKU-3..., that nobody reserves."""
        now = datetime.now(UTC)
        spec = {
            "name": "pipeline test", "starts_at": (now - timedelta(seconds=1)).isoformat(),
            "ends_at": (now + timedelta(hours=1)).isoformat(),
            "skus": [{"sku": f"SKU-{i}", "stock": stock, "price": 1500, "currency": "EUR",
                      "per_buyer_limit": limit, "hold_ttl_seconds": ttl, "buckets": buckets}
                     for i in range(1, skus + 1)],
        }  # fmt: skip
        admin = SaleAdmin.build(self.pool, self.redis)
        sale_id = str((await admin.create(parse_sale(spec)))["id"])
        await admin.preload(sale_id)
        self.skus += bucket_keys(sale_id, SKU, buckets)
        self.buckets[sale_id] = buckets
        return sale_id

    async def reserve(
        self, sale_id: str, tokens: list[str], *, quantity: int = 1,
        buyers: list[str] | None = None,
    ) -> list[str]:  # fmt: skip
        """One reservation per token, each by a new buyer (``buyers``, or new ids) taking the
        buyer's path through the waiting room's scripts (join, admitted by a pump step, the
        admission claimed, then reserve), so the audit can trace every reservation to its
        admission. Their ids, all granted."""
        return [rid for rid, _ in await self.reserve_requests(sale_id, tokens, quantity=quantity,
                                                              buyers=buyers)]  # fmt: skip

    async def reserve_requests(
        self, sale_id: str, tokens: list[str], *, quantity: int = 1,
        buyers: list[str] | None = None,
    ) -> list[tuple[str, ReserveRequest]]:  # fmt: skip
        """As :meth:`reserve`, with each granted id's request (to replay it)."""
        queue, keys = QueueScripts(self.redis), SaleKeys(sale_id)
        if buyers is None:
            buyers = [f"buyer-{uuid.uuid4().hex[:12]}" for _ in tokens]
        assert len(buyers) == len(tokens), "one buyer per token"
        positions: list[int] = []
        for start in range(0, len(buyers), 200):
            joined = await queue.join(keys, buyers[start : start + 200])
            assert all(j.outcome == "queued" for j in joined), joined
            positions += [j.position for j in joined]
        token = await queue.acquire(keys, "test-pump", 60_000)
        step = await queue.advance(keys, token, serving=max(positions), cutoff=None,
                                   sold_out=False, published={})  # fmt: skip
        assert step is not None and step.serving >= max(positions)
        deadline = int(time.time() * 1000) + 600_000
        requests = []
        allocator = Allocators(self.holds).for_sku(sale_id, SKU, self.buckets.get(sale_id, 1))
        for buyer, position, payment in zip(buyers, positions, tokens, strict=True):
            key = uuid.uuid4().hex
            fingerprint = hashlib.sha256(f"{SKU}\0{quantity}\0{payment}".encode()).hexdigest()
            assert await queue.claim(keys, position, key, fingerprint[:16], deadline) == "ok"
            # As the gateway makes them: the id names the buyer's stock bucket.
            rid = allocator.new_id(buyer)
            requests.append(ReserveRequest(rid, buyer, quantity, key, payment, str(position)))
        results = await asyncio.gather(*(allocator.reserve(r) for r in requests))
        await allocator.aclose()
        assert all(r.outcome == "reserved" for r in results), results
        return [(r.reservation_id or "", q) for r, q in zip(results, requests, strict=True)]

    def start_workers(self, **options: Any) -> Workers:
        stop = asyncio.Event()
        service = WorkerService(self.settings, **options)
        task = asyncio.get_running_loop().create_task(service.run(stop))
        workers = Workers(service, stop, task)
        self.workers.append(workers)
        return workers

    def spawn_workers(self, session_timeout_s: float | None = None) -> subprocess.Popen[bytes]:
        """A real ``flashsale workers`` process on this harness's topics and group;
        ``session_timeout_s``: how long the broker waits for it once it stops answering."""
        env = {**os.environ, **self.env(),
               "FLASHSALE_WORKER_SESSION_TIMEOUT": str(session_timeout_s or SESSION_S)}  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "flashsale", "workers", "--concurrency", "64"],
            env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.processes.append(process)
        return process

    def env(self) -> dict[str, str]:
        return {
            "REDIS_URL": self.settings.require_redis(),
            "DATABASE_URL": self.settings.require_database(),
            "KAFKA_BOOTSTRAP": self.settings.require_kafka(),
            **self.settings.topics.env(),
            "FLASHSALE_CONSUMER_GROUP": self.settings.consumer_group,
            "FLASHSALE_PSP_URL": self.psp_url,
            "FLASHSALE_LOG_LEVEL": "WARNING",
        }

    async def one_reservation(self, sale_id: str) -> tuple[str, SkuKeys, ReservationEvent]:
        """A single granted hold: its id, its SKU keys, and its event as relayed to Kafka."""
        [rid] = await self.reserve(sale_id, ["tok_visa"])
        messages = await self.topic_messages(self.settings.topics.reservations, at_least=1)
        return rid, SkuKeys(sale_id, SKU), decode_event(messages[0].value)

    def store(self, consumer: str = "test") -> OrderStore:
        return OrderStore(self.pool, self.settings.topics.order_events, consumer)

    async def orders(self, ids: list[str]) -> dict[str, str]:
        rows = await self.pool.fetch("SELECT id, state FROM orders WHERE id = ANY($1)", ids)
        return {r["id"]: r["state"] for r in rows}

    async def wait_terminal(self, ids: list[str], patience: float = 60) -> dict[str, str]:
        """Every order of ``ids`` in a terminal state, or AssertionError naming what is not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            states = await self.orders(ids)
            if len(states) == len(ids) and all(s in TERMINAL for s in states.values()):
                return states
            if loop.time() > deadline:
                open_ = {i: states.get(i, "missing") for i in ids if states.get(i) not in TERMINAL}
                raise AssertionError(f"{len(open_)} orders not terminal: {list(open_.items())[:5]}")
            await asyncio.sleep(0.1)

    async def counts(self, sale_id: str) -> dict[str, int]:
        """The SKU's counters, added up over its stock buckets."""
        total: dict[str, int] = {}
        for keys in bucket_keys(sale_id, SKU, self.buckets.get(sale_id, 1)):
            raw = await self.redis.hgetall(keys.stock)
            for k, v in raw.items():
                name = k.decode() if isinstance(k, bytes) else k
                total[name] = total.get(name, 0) + int(v)
        return total

    async def confirmed_units(self, sale_id: str) -> int:
        return int(await self.pool.fetchval(
            "SELECT sold FROM sale_skus WHERE sale_id = $1 AND sku = $2", sale_id, SKU
        ))  # fmt: skip

    async def topic_messages(self, topic: str, *, at_least: int = 1,
                             patience: float = 15) -> list[Any]:  # fmt: skip
        """The messages of ``topic`` from the start (waits for ``at_least``)."""
        # No consumer group (no join, no rebalance delay): every partition, from the start.
        consumer = AIOKafkaConsumer(
            **client_options(self.settings), enable_auto_commit=False,
            auto_offset_reset="earliest",
        )  # fmt: skip
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer.stop()
            raise AssertionError(f"no partitions known for {topic}")
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        found: list[Any] = []
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + patience
            while len(found) < at_least and loop.time() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                found += [r for records in batch.values() for r in records]
        finally:
            await consumer.stop()
        return found

    async def psp_down(self) -> None:
        """The provider stops listening (connections are refused)."""
        assert self.psp_site is not None
        await self.psp_site.stop()

    async def psp_up(self) -> None:
        assert self.psp_site is not None
        runner, port = self.psp_site._runner, int(self.psp_url.rsplit(":", 1)[1])
        self.psp_site = web.TCPSite(runner, "127.0.0.1", port)
        await self.psp_site.start()

    async def psp_stats(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.psp_url}/v1/stats") as response,
        ):
            return dict(await response.json())


@contextlib.asynccontextmanager
async def pipeline(stack: Settings, knobs: Knobs | None = None) -> AsyncIterator[Pipeline]:
    run = uuid.uuid4().hex[:8]
    topics = Topics(f"t{run}-reservations", f"t{run}-order-events", f"t{run}-dead-letter")
    # A short session: the broker takes a group's first members in about a second, where
    # the default 10 s made each test wait about 3 s for its workers to join.
    settings = dataclasses.replace(stack, topics=topics, consumer_group=f"workers-{run}",
                                   worker_session_timeout_s=SESSION_S)  # fmt: skip
    await ensure_topics(settings)
    psp = Simulator(knobs or Knobs())
    psp_runner = web.AppRunner(psp.app(), access_log=None, shutdown_timeout=0.5)
    await psp_runner.setup()
    port = free_port()
    site = web.TCPSite(psp_runner, "127.0.0.1", port)
    await site.start()
    psp_url = f"http://127.0.0.1:{port}"
    settings = dataclasses.replace(settings, psp_url=psp_url)
    redis = redis_client(settings)
    pool = await pg_pool(settings, min_size=1, max_size=6, server_settings=BATCH_PLANNING)
    out = producer(settings)
    await out.start()
    relay = OutboxRelay(redis, out, topics.reservations, topics.dead_letter, f"relay-{run}",
                        claim_idle_ms=1000)  # fmt: skip
    harness = Pipeline(settings, pool, redis, psp, psp_url, relay, psp_site=site)

    async def skus() -> list[SkuKeys]:
        return harness.skus

    stop = asyncio.Event()
    relay_task = asyncio.get_running_loop().create_task(run_relay(relay, skus, stop=stop))
    try:
        yield harness
    finally:
        stop_all(harness.processes, grace_s=20)
        for workers in harness.workers:
            if not workers.task.done():
                await workers.drain()
        stop.set()
        await relay_task
        await out.stop()
        await pool.close()
        await redis.aclose()
        await psp_runner.cleanup()


def provider(url: str, *, timeout_s: float = 2.0) -> HttpProvider:
    return HttpProvider(url, timeout_s=timeout_s, breaker=CircuitBreaker(threshold=5))


async def drained(p: Pipeline, patience: float = 30) -> None:
    """Every reservation event relayed and every relayed event consumed and committed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        outbox = sum([await p.redis.xlen(k.outbox) for k in p.skus])
        lag = await consumer_lag(p.settings, p.settings.topics.reservations,
                                 p.settings.consumer_group)  # fmt: skip
        if outbox == 0 and lag == 0:
            return
        assert loop.time() < deadline, f"not drained: outbox {outbox}, lag {lag}"
        await asyncio.sleep(0.1)


async def server_calls(
    client: RedisClient, commands: tuple[str, ...], *, after_s: float, window_s: float
) -> int:
    """How many of ``commands`` the Redis server (every primary) ran in the ``window_s``
    seconds that begin ``after_s`` seconds from now, whoever sent them."""
    await asyncio.sleep(after_s)
    before = await ServerSample.take(client)
    await asyncio.sleep(window_s)
    after = await ServerSample.take(client)
    return sum(after.calls.get(c, 0) - before.calls.get(c, 0) for c in commands)


async def end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    """Where each partition of ``topic`` ends now."""
    consumer = AIOKafkaConsumer(**client_options(settings))
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        assert parts, f"no partitions for {topic}"
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()
