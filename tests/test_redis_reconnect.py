"""Connections Redis dropped while they sat in the pool do not fail the next callers.

After Redis restarts, every connection idle in a service's pool is dead. redis-py only finds
out when it writes to one, and under uvloop that write fails ("Error UNKNOWN while writing to
socket"). Without a retry each dead connection cost one caller a 503, long after Redis was back:
an admin preloading a sale 25 s after a Redis restart got "a dependency is unavailable"
(found by ``flashsale chaos --quick``, kill-workers after redis-kill-aof)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import uvloop

from allocator.redis_calls import read_packed
from flashsale.clients import RedisClient, redis_client
from flashsale.settings import Settings

NAME = "reconnect-test"
POOL = 6


async def _admins(stack: Settings) -> list[aioredis.Redis]:
    """A plain client on the server, or on every node of the cluster."""
    url = stack.require_redis()
    if not stack.redis_cluster:
        return [aioredis.Redis.from_url(url, decode_responses=True)]
    cluster = aioredis.RedisCluster.from_url(url)
    await cluster.initialize()
    password = urlsplit(url).password
    admins = [aioredis.Redis(host=n.host, port=int(n.port), password=password,
                             decode_responses=True) for n in cluster.get_nodes()]  # fmt: skip
    await cluster.aclose()
    return admins


async def _kill_named(admins: list[aioredis.Redis]) -> int:
    """Kill, server side, every connection named NAME (and only those), on every node."""
    killed = 0
    for admin in admins:
        ids = [c["id"] for c in await admin.client_list() if c.get("name") == NAME]
        for cid in ids:
            await admin.client_kill_filter(_id=cid)
        killed += len(ids)
    return killed


def _after_kills(stack: Settings, call: Callable[[RedisClient], Awaitable[Any]]) -> list[Any]:
    """Three rounds, under uvloop: fill a pool of POOL connections (POOL calls at once), kill
    them all server side, then make POOL calls at once again. What the second calls gave."""

    async def scenario() -> list[Any]:
        client = redis_client(stack, max_connections=POOL, client_name=NAME)
        admins = await _admins(stack)
        answers: list[Any] = []
        try:
            for _ in range(3):
                await asyncio.gather(*(call(client) for _ in range(POOL)))
                # POOL of them; a cluster client's nodes keep a few more (the one it read the
                # slots on, connections given back while being replaced)
                killed = await _kill_named(admins)
                assert killed == POOL or (stack.redis_cluster and killed >= POOL), killed
                await asyncio.sleep(0.05)  # the FIN has arrived; the pool does not know yet
                answers += await asyncio.gather(
                    *(call(client) for _ in range(POOL)), return_exceptions=True
                )
        finally:
            await client.aclose()
            for admin in admins:
                await admin.aclose()
        return answers

    return uvloop.run(scenario())


def test_connections_killed_while_idle_are_replaced_not_failed(stack: Settings) -> None:
    answers = _after_kills(stack, lambda client: client.ping())
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert not failures, [repr(e) for e in failures]


def test_packed_calls_get_a_fresh_connection_when_theirs_died_idle(stack: Settings) -> None:
    """The reserve batches and the rate limits send packed commands on a raw pooled connection
    (``read_packed``), outside redis-py's retry: after a Redis restart, each dead connection
    cost one batch a 503 (seen as 503s at the start of the next chaos scenario)."""
    answers = _after_kills(stack, lambda client: read_packed(client, [("PING",), ("ECHO", "x")]))
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert not failures, [repr(e) for e in failures]
    assert answers == [[b"PONG", b"x"]] * len(answers)
