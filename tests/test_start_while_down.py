"""A service that starts while Postgres or the broker is down waits for them, as one running
already does, instead of exiting ("cannot reach Postgres"), which under ``flashsale up``
meant restarts with a backoff of up to 15 s, and a process restarted during an outage stayed
down until it ended. A gateway answers joins at once (Redis only); an allocator, which learns
its sales from Postgres, starts admitting as soon as Postgres answers, the broker still down
(its relay waits for the broker, the outboxes keep the reservations)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from allocator.pump import AdmissionPump
from allocator.queue_scripts import QueueScripts
from flashsale.cli.devstack.processes import free_port
from flashsale.keys import DISCOVERED, SaleKeys
from flashsale.settings import Settings
from gateway.state import CLIENTS
from loadtest.fault_proxy import FaultProxy, through
from tests.harness import gateway

DOWN = {"DATABASE_URL": "postgresql://flashsale:pw@127.0.0.1:9/flashsale",
        "KAFKA_BOOTSTRAP": "127.0.0.1:9"}  # fmt: skip


@asynccontextmanager
async def started(
    stack: Settings, *argv: str, **env_vars: str
) -> AsyncIterator[Callable[[], None]]:
    """``flashsale ARGV`` with Postgres and the broker unreachable (unless ``env_vars`` say
    otherwise), Redis as the stack's. Yields a check that it still runs, which names what it
    wrote if it does not."""
    env = {**os.environ, "REDIS_URL": stack.require_redis(), **DOWN, **env_vars,
           "FLASHSALE_REDIS_CLUSTER": "1" if stack.redis_cluster else "0",
           "FLASHSALE_LOG_LEVEL": "WARNING"}  # fmt: skip
    with tempfile.TemporaryFile() as log:  # not a pipe: a full one would stall the process
        process = subprocess.Popen(  # noqa: ASYNC220 - a start, not a wait
            [sys.executable, "-m", "flashsale", *argv], env=env, stderr=log
        )

        def running() -> None:
            if process.poll() is not None:
                log.seek(0)
                raise AssertionError(f"exited {process.returncode}: {log.read()[-2000:]!r}")

        try:
            yield running
        finally:
            if process.poll() is None:  # waited for off the loop: a proxy of the test's serves it
                process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(process.wait, 30)


async def _get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        return answer.status, await answer.json()


async def _answering(running: Callable[[], None], url: str) -> tuple[int, dict[str, Any]]:
    """The first answer of ``url``, while its process runs."""
    deadline = time.monotonic() + 30
    while True:
        running()
        try:
            return await _get(url)
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline, f"{url} never answered"
            await asyncio.sleep(0.2)


async def test_a_gateway_started_while_postgres_is_down_takes_joins(stack: Settings) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=5)
        port = free_port()
        async with started(stack, "gateway", "--port", str(port)) as running:
            base = f"http://127.0.0.1:{port}"
            code, ready = await _answering(running, f"{base}/readyz")
            assert code == 503 and ready["checks"]["postgres"].startswith("down"), ready
            assert ready["checks"]["redis"] == "ok", ready
            buyer = {"Authorization": f"Bearer {gw.token('b-1')}"}
            async with aiohttp.ClientSession() as session:
                joined = await session.post(f"{base}/v1/sales/{sale}/queue", headers=buyer)
                assert joined.status == 200, await joined.text()


async def test_an_allocator_started_while_postgres_and_the_broker_are_down_admits_once_pg_is_back(
    stack: Settings,
) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=100, admission_rate=50)
        c = gw.app[CLIENTS]
        first = AdmissionPump(QueueScripts(c.redis), c.pool, sale, ["SKU-1"], "first")
        await first.tick()  # the opening's draw needs the seed, from Postgres
        await first.resign()
        for i in range(20):
            assert (await gw.join(sale, f"w-{i}"))[0] == 200
        await c.redis.delete(DISCOVERED)  # no sales seen by an allocator before: from Postgres
        db = urlsplit(stack.require_database())
        proxy = await FaultProxy(db.hostname or "127.0.0.1", db.port or 5432, "refuse").start()
        port = free_port()
        database_url = through(stack.require_database(), proxy.port)
        try:
            async with started(stack, "allocator", "--ops-port", str(port),
                         DATABASE_URL=database_url) as running:  # fmt: skip
                code, ready = await _answering(running, f"http://127.0.0.1:{port}/readyz")
                assert code == 503 and ready["checks"]["postgres"].startswith("down"), ready
                proxy.set("pass")  # Postgres is back; the broker is still down
                deadline = time.monotonic() + 30
                while int(await c.redis.hget(SaleKeys(sale).queue, "serving") or 0) < 20:
                    running()
                    assert time.monotonic() < deadline, "the allocator admitted nobody"
                    await asyncio.sleep(0.1)
        finally:
            await proxy.stop()


async def test_workers_started_while_postgres_and_the_broker_are_down_wait_for_them(
    stack: Settings,
) -> None:
    db = urlsplit(stack.require_database())
    broker_host, broker_port = stack.require_kafka().split(",")[0].rsplit(":", 1)
    pg = await FaultProxy(db.hostname or "127.0.0.1", db.port or 5432, "refuse").start()
    kafka = await FaultProxy(broker_host, int(broker_port), "refuse").start()
    port = free_port()
    try:
        async with started(stack, "workers", "--ops-port", str(port),
                           DATABASE_URL=through(stack.require_database(), pg.port),
                           KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka.port}",
                           FLASHSALE_PSP_URL="http://127.0.0.1:9") as running:  # fmt: skip
            url = f"http://127.0.0.1:{port}/readyz"
            code, ready = await _answering(running, url)
            assert code == 503, ready
            assert ready["checks"]["postgres"].startswith("down"), ready
            assert ready["checks"]["kafka"].startswith("down"), ready
            await asyncio.sleep(1)
            running()
            pg.set("pass")
            kafka.set("pass")  # the broker's metadata then names its own address
            deadline = time.monotonic() + 30
            while (answer := await _get(url))[0] != 200:
                running()
                assert time.monotonic() < deadline, f"never ready: {answer}"
                await asyncio.sleep(0.2)
    finally:
        await pg.stop()
        await kafka.stop()


async def test_an_allocator_started_while_postgres_is_down_admits_the_sales_seen_before(
    stack: Settings,
) -> None:
    """A running allocator keeps the sales it last read from Postgres in Redis; one started
    during a Postgres outage (a crash, a failover to a fresh process) pumps those."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=100, admission_rate=50)
        c = gw.app[CLIENTS]
        await c.redis.delete(DISCOVERED)
        async with started(stack, "allocator", DATABASE_URL=stack.require_database(),
                           KAFKA_BOOTSTRAP=stack.require_kafka()) as running:  # fmt: skip
            deadline = time.monotonic() + 30
            while not await c.redis.exists(DISCOVERED):  # it has read the live sales
                running()
                assert time.monotonic() < deadline, "the allocator never recorded its sales"
                await asyncio.sleep(0.1)
        before = int(await c.redis.hget(SaleKeys(sale).queue, "serving") or 0)
        for i in range(20):
            assert (await gw.join(sale, f"late-{i}"))[0] == 200
        async with started(stack, "allocator") as running:  # Postgres and the broker down
            deadline = time.monotonic() + 30
            while int(await c.redis.hget(SaleKeys(sale).queue, "serving") or 0) < before + 20:
                running()
                assert time.monotonic() < deadline, "the allocator admitted nobody"
                await asyncio.sleep(0.1)
