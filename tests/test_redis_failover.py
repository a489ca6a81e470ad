"""A single Redis behind an endpoint that moves on failover (a managed service's DNS name, a
virtual IP): connections opened before the failover still reach the old primary, now a
replica, which answers every write with READONLY and goes on answering reads. A connection
that hears READONLY is dropped, so that the next attempt reaches the new primary; without
that, every pooled connection kept asking the old primary and every write was refused until
the process restarted. The endpoint is a TCP proxy whose target moves, as DNS does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import uvloop

from allocator.redis_calls import Script, call_packed, read_packed
from flashsale.clients import redis_client
from flashsale.outages import is_outage
from flashsale.settings import Settings
from loadtest.fault_proxy import FaultProxy, through
from tests.lone_redis import lone_redis

POOL = 4
WRITE = "return redis.call('SET', KEYS[1], ARGV[1])"


@pytest.fixture
def old_and_new(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two servers: the primary before the failover, and the one promoted by it."""
    with lone_redis(tmp_path / "old") as old, lone_redis(tmp_path / "new") as new:
        yield old, new


def test_after_a_failover_behind_one_endpoint_writes_reach_the_new_primary(
    old_and_new: tuple[str, str], tmp_path: Path
) -> None:
    """As a managed failover goes: the new primary was the old one's replica (the data and the
    loaded scripts came with it), it is promoted, the old primary becomes its replica, and the
    endpoint leads to the new one."""
    old_url, new_url = old_and_new
    old_port, new_port = urlsplit(old_url).port or 0, urlsplit(new_url).port or 0

    async def scenario() -> None:
        endpoint = await FaultProxy("127.0.0.1", old_port).start()
        settings = Settings.from_env({"REDIS_URL": through(old_url, endpoint.port),
                                      "FLASHSALE_HOME": str(tmp_path)})  # fmt: skip
        commands, scripts, packed = (redis_client(settings, max_connections=POOL)
                                     for _ in range(3))  # fmt: skip
        script = scripts.register_script(WRITE)
        old, new = aioredis.Redis.from_url(old_url), aioredis.Redis.from_url(new_url)
        try:
            await new.replicaof("127.0.0.1", old_port)
            await script(keys=["before"], args=["old"])  # loaded on the old primary
            for client in (commands, scripts, packed):  # POOL connections each, to the old one
                await asyncio.gather(*(client.set(f"warm-{i}", 1) for i in range(POOL)))
            assert await old.wait(1, 5000) == 1  # the replica has it all
            # The failover.
            await new.replicaof("NO", "ONE")
            await old.replicaof("127.0.0.1", new_port)
            endpoint.target_port = new_port

            # redis-py's commands and scripts: retried on a fresh connection, every one lands.
            assert await asyncio.gather(*(commands.set(f"c-{i}", "new") for i in range(POOL)))
            assert await asyncio.gather(
                *(script(keys=[f"s-{i}"], args=["new"]) for i in range(POOL))
            )
            # The engine's packed calls (the reserve and join batches) are not retried: a call
            # on a connection to the old primary may fail, as an outage (a 503, never bad
            # data); the connection is dropped, so the next calls land.
            first = await asyncio.gather(
                *(call_packed(packed, script, ("EVALSHA", script.sha, 1, f"p-{i}", "new"))
                  for i in range(POOL)),
                return_exceptions=True,
            )  # fmt: skip
            failed = [a for a in first if isinstance(a, BaseException)]
            assert all(is_outage(a) for a in failed), [repr(a) for a in failed]
            again = await asyncio.gather(
                *(call_packed(packed, script, ("EVALSHA", script.sha, 1, f"p-{i}", "new"))
                  for i in range(POOL))
            )  # fmt: skip
            assert again == [b"OK"] * POOL
            assert await read_packed(packed, [("SET", "r", "new"), ("GET", "r")]) == [b"OK", b"new"]

            names = ["before", *(f"{p}-{i}" for p in "csp" for i in range(POOL))]
            assert await new.mget(names) == [b"old"] + [b"new"] * (len(names) - 1)
        finally:
            for client in (commands, scripts, packed, old, new):
                await client.aclose()
            await endpoint.stop()

    uvloop.run(scenario())


def test_after_a_failover_to_a_primary_without_the_scripts_every_call_lands(
    old_and_new: tuple[str, str], tmp_path: Path
) -> None:
    """Redis 7 does not replicate ``SCRIPT LOAD``, so the promoted replica has no script: the
    first call of each script after the failover hears NOSCRIPT there. The script has to be
    loaded on the server that said so. Loaded through any pooled connection, it may go to the
    old primary (which has it) and the call again to the new one: NOSCRIPT once more, which is
    neither an outage nor the request's fault."""
    old_url, new_url = old_and_new
    old_port, new_port = urlsplit(old_url).port or 0, urlsplit(new_url).port or 0

    async def scenario() -> None:
        endpoint = await FaultProxy("127.0.0.1", old_port).start()
        settings = Settings.from_env({"REDIS_URL": through(old_url, endpoint.port),
                                      "FLASHSALE_HOME": str(tmp_path)})  # fmt: skip
        scripts, packed = (redis_client(settings, max_connections=POOL) for _ in range(2))
        script = Script(scripts, WRITE)
        old, new = aioredis.Redis.from_url(old_url), aioredis.Redis.from_url(new_url)
        try:
            await new.replicaof("127.0.0.1", old_port)
            await script(keys=["before"], args=["old"])
            for client in (scripts, packed):  # POOL connections each, to the old primary
                await asyncio.gather(*(client.get(f"warm-{i}") for i in range(POOL)))
            assert await old.wait(1, 5000) == 1
            # The failover, onto a server that has none of the scripts (as on Redis 7: flushed
            # before each round, so that each kind of call meets it).
            await new.replicaof("NO", "ONE")
            await old.replicaof("127.0.0.1", new_port)
            endpoint.target_port = new_port

            async def packed_call(i: int) -> object:
                return await call_packed(packed, script, ("EVALSHA", script.sha, 1, f"p-{i}", "n"))

            async def read(i: int) -> object:  # reads keep old connections in the pools
                return await asyncio.gather(scripts.get(f"warm-{i}"), packed.get(f"warm-{i}"))

            async def script_call(i: int) -> object:
                return await script(keys=[f"s-{i}"], args=["n"])

            for calls in ((script_call, read, read, read), (packed_call, read, read, read)):
                await new.script_flush()
                answers = await asyncio.gather(*(calls[i % 4](i) for i in range(12 * POOL)),
                                               return_exceptions=True)  # fmt: skip
                refused = [a for a in answers if isinstance(a, BaseException)]
                assert all(is_outage(a) for a in refused), [repr(a) for a in refused]
            assert await asyncio.gather(*(packed_call(i) for i in range(POOL))) == [b"OK"] * POOL
            assert await asyncio.gather(*(script_call(i) for i in range(POOL))) == [b"OK"] * POOL
            names = [f"{p}-{i}" for p in "sp" for i in range(POOL)]
            assert await new.mget(names) == [b"n"] * len(names)
        finally:
            for client in (scripts, packed, old, new):
                await client.aclose()
            await endpoint.stop()

    uvloop.run(scenario())
