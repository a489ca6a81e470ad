"""Two ``flashsale allocator`` processes serve the same sales: one pump leader per sale (the
lease and its fencing token); when the leader is SIGKILLed, the other takes over within the
lease, and no position is admitted twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from flashsale.keys import SaleKeys
from flashsale.records import SEP, text
from flashsale.settings import Settings
from gateway.state import CLIENTS
from tests.harness import Gateway, gateway

LEASE_S = 2.0  # allocator.pump.AdmissionPump.lease_ms


@pytest.fixture
def allocators(stack: Settings) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {**os.environ, "REDIS_URL": stack.require_redis(),
           "DATABASE_URL": stack.require_database(), "KAFKA_BOOTSTRAP": stack.require_kafka(),
           "FLASHSALE_REDIS_CLUSTER": "1" if stack.redis_cluster else "0",
           "FLASHSALE_LOG_LEVEL": "WARNING"}  # fmt: skip
    started = [subprocess.Popen([sys.executable, "-m", "flashsale", "allocator"], env=env,
                                stderr=subprocess.DEVNULL) for _ in range(2)]  # fmt: skip
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


async def _leader(gw: Gateway, sale: str) -> tuple[int, int] | None:
    """(pid, fencing token) of the sale's pump leader, from its lease."""
    raw = await gw.app[CLIENTS].redis.get(SaleKeys(sale).lease)
    if raw is None:
        return None
    owner, token = text(raw).split(SEP)
    return int(owner.split(":")[1]), int(token)


async def _serving(gw: Gateway, sale: str) -> int:
    return int(await gw.app[CLIENTS].redis.hget(SaleKeys(sale).queue, "serving") or 0)


async def test_the_other_allocator_takes_over_the_pump_within_the_lease(
    stack: Settings, allocators: list[subprocess.Popen[bytes]]
) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=500, admission_rate=40)
        for i in range(300):
            assert (await gw.join(sale, f"fo-{i}"))[0] == 200
        deadline = time.monotonic() + 30
        while (lead := await _leader(gw, sale)) is None or await _serving(gw, sale) < 20:
            assert time.monotonic() < deadline, "no allocator ever led the sale's pump"
            await asyncio.sleep(0.05)
        pid, token = lead
        [leader] = [p for p in allocators if p.pid == pid]
        [other] = [p for p in allocators if p.pid != pid]

        leader.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        leader.wait()
        before = await _serving(gw, sale)
        while (lead := await _leader(gw, sale)) is None or lead[0] != other.pid:
            assert time.monotonic() - killed_at < 3 * LEASE_S, "nobody took the pump over"
            await asyncio.sleep(0.02)
        took = time.monotonic() - killed_at
        assert lead[1] > token  # a new fencing token: the dead leader could write no more
        # The lease lapses after LEASE_S; the next tick of the other takes it (1 s apart at
        # most for a pump that is not leading), so within the lease and a tick.
        assert took <= LEASE_S + 1.2, took
        while await _serving(gw, sale) <= before:
            assert time.monotonic() - killed_at < 10, "the new leader never admitted anyone"
            await asyncio.sleep(0.05)

        # Nobody admitted twice: each admission step goes past the one before.
        steps = await gw.app[CLIENTS].redis.zrange(SaleKeys(sale).steps, 0, -1, withscores=True)
        reached = [int(text(member).split(":")[0]) for member, _ in steps]
        assert reached == sorted(set(reached)), reached
        assert reached[-1] == await _serving(gw, sale) <= 300
