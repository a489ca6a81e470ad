"""Connections Redis dropped while they sat in the pool do not fail the next callers.

After Redis restarts, every connection idle in a service's pool is dead. redis-py only finds
out when it writes to one, and under uvloop that write fails ("Error UNKNOWN while writing to
socket"). Without a retry each dead connection cost one caller a 503, long after Redis was back:
an admin preloading a sale 25 s after a Redis restart got "a dependency is unavailable"
(found by ``flashsale chaos --quick``, kill-workers after redis-kill-aof)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import uvloop

from allocator.redis_calls import read_packed
from flashsale.clients import redis_client
from flashsale.settings import Settings

NAME = "reconnect-test"
POOL = 6


async def _kill_named(admin: aioredis.Redis) -> int:
    """Kill, server side, every connection named NAME (and only those)."""
    ids = [c["id"] for c in await admin.client_list() if c.get("name") == NAME]
    for cid in ids:
        await admin.client_kill_filter(_id=cid)
    return len(ids)


def test_connections_killed_while_idle_are_replaced_not_failed(stack: Settings) -> None:
    async def scenario() -> list[BaseException]:
        client = redis_client(stack, max_connections=POOL, client_name=NAME)
        admin = aioredis.Redis.from_url(stack.require_redis(), decode_responses=True)
        failures: list[BaseException] = []
        try:
            for _ in range(3):
                # fill the pool: POOL callers at once each hold a connection, then give it back
                await asyncio.gather(*(client.ping() for _ in range(POOL)))
                assert await _kill_named(admin) == POOL
                await asyncio.sleep(0.05)  # the FIN has arrived; the pool does not know yet
                answers = await asyncio.gather(
                    *(client.ping() for _ in range(POOL)),
                    return_exceptions=True,
                )
                failures += [a for a in answers if isinstance(a, BaseException)]
        finally:
            await client.aclose()
            await admin.aclose()
        return failures

    failures = uvloop.run(scenario())
    assert not failures, [repr(e) for e in failures]


def test_packed_calls_get_a_fresh_connection_when_theirs_died_idle(stack: Settings) -> None:
    """The reserve batches and the rate limits send packed commands on a raw pooled connection
    (``read_packed``), outside redis-py's retry: after a Redis restart, each dead connection
    cost one batch a 503 (seen as 503s at the start of the next chaos scenario)."""

    async def scenario() -> list[BaseException]:
        client = redis_client(stack, max_connections=POOL, client_name=NAME)
        admin = aioredis.Redis.from_url(stack.require_redis(), decode_responses=True)
        failures: list[BaseException] = []
        try:
            for _ in range(3):
                await asyncio.gather(*(read_packed(client, [("PING",)]) for _ in range(POOL)))
                assert await _kill_named(admin) == POOL
                await asyncio.sleep(0.05)
                answers = await asyncio.gather(
                    *(read_packed(client, [("PING",), ("ECHO", "x")]) for _ in range(POOL)),
                    return_exceptions=True,
                )
                failures += [a for a in answers if isinstance(a, BaseException)]
                replies = [a for a in answers if not isinstance(a, BaseException)]
                assert all(a == [b"PONG", b"x"] for a in replies), replies
        finally:
            await client.aclose()
            await admin.aclose()
        return failures

    failures = uvloop.run(scenario())
    assert not failures, [repr(e) for e in failures]
