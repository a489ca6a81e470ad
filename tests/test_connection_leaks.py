"""A Redis call that fails gives its pooled connection back.

redis-py's pipeline loads its scripts (``SCRIPT EXISTS``) on a connection it takes from the
pool before the part of ``execute`` that always resets; when that load fails (the connection
was killed, the server restarted), the connection stayed taken. Every failed hold transition
leaked one, and once the pool's 64 were gone the order workers waited for a connection that
never came back: ``CLIENT KILL`` of the engine's connections stopped the order pipeline for
good. Found by ``flashsale chaos --scenario redis-client-kill``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from allocator.hold_scripts import HoldScripts
from flashsale.keys import SkuKeys
from flashsale.settings import Settings
from loadtest.fault_proxy import FaultProxy, through


@pytest.fixture
async def cut_off(stack: Settings) -> AsyncIterator[tuple[aioredis.Redis, FaultProxy]]:
    """A client with a pool of 2 connections (waiting 0.5 s for one), through a fault proxy."""
    if stack.redis_cluster:
        pytest.skip("a single server's pool behind a fault proxy: a cluster redirects around it")
    url = stack.require_redis()
    target = urlsplit(url)
    proxy = await FaultProxy(target.hostname or "127.0.0.1", target.port or 6379).start()
    pool = aioredis.BlockingConnectionPool.from_url(
        through(url, proxy.port), max_connections=2, timeout=0.5
    )
    client = aioredis.Redis.from_pool(pool)
    yield client, proxy
    await client.aclose()
    await proxy.stop()


async def test_failed_transitions_give_their_connections_back(
    cut_off: tuple[aioredis.Redis, FaultProxy],
) -> None:
    client, proxy = cut_off
    scripts = HoldScripts(client)
    keys = SkuKeys("leak-test", "SKU")
    assert await scripts.transition("confirm", [(keys, "r-1")]) is not None  # all is well
    for _ in range(4):  # twice the pool: each failure must give its connection back
        proxy.set("refuse")
        with pytest.raises(redis.exceptions.ConnectionError):
            await scripts.transition("confirm", [(keys, "r-1")])
        proxy.set("pass")
        await scripts.client.script_flush()  # the next pipeline has to load its script again
    [result] = await scripts.transition("confirm", [(keys, "r-1")])
    assert not result.ok  # no such hold: answered, not "no connection available"
