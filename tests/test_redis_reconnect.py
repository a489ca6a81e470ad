"""Connections Redis dropped while they sat in the pool do not fail the next callers.

After Redis restarts, every connection idle in a service's pool is dead. redis-py only finds
out when it writes to one, and under uvloop that write fails ("Error UNKNOWN while writing to
socket"). Without a retry each dead connection cost one caller a 503, long after Redis was back:
an admin preloading a sale 25 s after a Redis restart got "a dependency is unavailable"
(found by ``flashsale chaos --quick``, kill-workers after redis-kill-aof)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import redis.exceptions
import uvloop

from allocator import redis_calls
from allocator.redis_calls import read_packed
from flashsale.clients import RedisClient, redis_client
from flashsale.settings import Settings
from loadtest.fault_proxy import FaultProxy, through
from tests.lone_redis import lone_redis

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


@pytest.mark.parametrize("hiredis_reader", [True, False], ids=["hiredis", "redis-py"])
async def test_packed_replies_stay_in_order_through_an_error_answer(
    stack: Settings, hiredis_reader: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies are read in bulk from the parser's reader: an error answer in the middle is
    raised only after every reply was read, so the connection's next call reads its own
    answers, not the leftovers of this one; the same through redis-py's own reader."""
    if not hiredis_reader:
        monkeypatch.setattr(redis_calls, "DRAINABLE", ())
    client = redis_client(stack, max_connections=1)  # one connection: the next call reuses it
    key = f"packed-{uuid.uuid4().hex[:8]}"
    try:
        await client.set(key, "text")
        commands: list[redis_calls.Command] = [("ECHO", str(i)) for i in range(7)]
        commands[3] = ("HGET", key, "field")  # WRONGTYPE: the key holds a string
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await read_packed(client, commands, chunk=2)
        assert await read_packed(client, [("ECHO", "next"), ("GET", key)]) == [b"next", b"text"]
    finally:
        await client.delete(key)
        await client.aclose()


def test_a_stream_read_is_routed_by_its_stream() -> None:
    """On a cluster a packed command goes to the node of its key: for XREADGROUP that is the
    stream after STREAMS, not its first argument (the word GROUP)."""
    read = ("XREADGROUP", "GROUP", "relay", "me", "COUNT", 16, "STREAMS", "s:{a}:outbox", ">")
    assert redis_calls.command_key(read) == "s:{a}:outbox"
    assert redis_calls.command_key(("XACK", "s:{a}:outbox", "relay", "1-0")) == "s:{a}:outbox"
    assert redis_calls.command_key(("EVALSHA", "sha", 2, "k1", "k2")) == "k1"
    assert redis_calls.command_key(("PING",)) is None
    for keyed in (("MEMORY", "USAGE", "s:{a}:outbox"),
                  ("XGROUP", "CREATE", "s:{a}:outbox", "relay", "0", "MKSTREAM")):  # fmt: skip
        assert redis_calls.command_key(keyed) == "s:{a}:outbox"


def test_connections_the_network_reset_while_idle_are_replaced_not_failed(tmp_path: Path) -> None:
    """A reset (RST) rather than a close: under uvloop the next write to such a connection
    raises "the handler is closed", a RuntimeError redis-py does not retry. Nothing was sent,
    so it is sent again on a fresh connection; a packed call (outside redis-py's retry) sees
    the transport closed before it sends, and connects afresh. Found by ``flashsale chaos``:
    the admin's preload right after ``network-reset`` answered 503. (A server of the test's
    own, behind a proxy that resets: the same on a cluster stack.)"""

    async def scenario(url: str) -> list[Any]:
        target = urlsplit(url)
        proxy = await FaultProxy(target.hostname or "127.0.0.1", target.port or 6379).start()
        settings = Settings.from_env({"REDIS_URL": through(url, proxy.port),
                                      "FLASHSALE_HOME": str(tmp_path)})  # fmt: skip
        client = redis_client(settings, max_connections=POOL)
        answers: list[Any] = []
        try:
            for _ in range(3):
                await asyncio.gather(*(client.ping() for _ in range(POOL)))
                proxy.reset_all()
                await asyncio.sleep(0.05)  # the RST has arrived; the pool does not know yet
                answers += await asyncio.gather(*(client.ping() for _ in range(POOL)),
                                                return_exceptions=True)  # fmt: skip
                await asyncio.gather(*(client.ping() for _ in range(POOL)))
                proxy.reset_all()
                await asyncio.sleep(0.05)
                packed = await asyncio.gather(
                    *(read_packed(client, [("PING",)]) for _ in range(POOL)),
                    return_exceptions=True,
                )
                answers += [a == [b"PONG"] or a for a in packed]
        finally:
            await client.aclose()
            await proxy.stop()
        return answers

    with lone_redis(tmp_path / "redis") as url:
        answers = uvloop.run(scenario(url))
    assert answers == [True] * 6 * POOL, [repr(a) for a in answers if a is not True]
