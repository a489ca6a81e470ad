"""A single Redis behind an endpoint that moves on failover (a managed service's DNS name, a
virtual IP): connections opened before the failover still reach the old primary, now a
replica, which answers every write with READONLY and goes on answering reads. A connection
that hears READONLY is dropped, so that the next attempt reaches the new primary; without
that, every pooled connection kept asking the old primary and every write was refused until
the process restarted. The endpoint is a TCP proxy whose target moves, as DNS does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import uvloop

from allocator.redis_calls import call_packed, read_packed
from flashsale.clients import RedisClient, redis_client
from flashsale.ops_endpoints import check, ping_redis
from flashsale.outages import is_outage
from flashsale.redis_connection import Script
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


@dataclass
class Rig:
    """Engine clients that reach the old primary through one endpoint; the new primary is
    its replica until :meth:`fail_over`."""

    clients: list[RedisClient]
    old: aioredis.Redis
    new: aioredis.Redis
    endpoint: FaultProxy

    async def fail_over(self) -> None:
        """As a managed failover goes: the replica is promoted, the old primary becomes its
        replica, and the endpoint leads to the new one."""
        await self.new.replicaof("NO", "ONE")
        await self.old.replicaof("127.0.0.1", _port(self.new))
        self.endpoint.target_port = _port(self.new)


def _port(client: aioredis.Redis) -> int:
    return int(client.connection_pool.connection_kwargs["port"])


@contextlib.asynccontextmanager
async def behind_one_endpoint(
    old_and_new: tuple[str, str], home: Path, clients: int
) -> AsyncIterator[Rig]:
    """``clients`` engine clients whose Redis URL is an endpoint (a TCP proxy, as DNS) leading
    to the old primary, the new one made its replica."""
    old_url, new_url = old_and_new
    old, new = aioredis.Redis.from_url(old_url), aioredis.Redis.from_url(new_url)
    endpoint = await FaultProxy("127.0.0.1", _port(old)).start()
    settings = Settings.from_env({"REDIS_URL": through(old_url, endpoint.port),
                                  "FLASHSALE_HOME": str(home)})  # fmt: skip
    rig = Rig([redis_client(settings, max_connections=POOL) for _ in range(clients)], old, new,
              endpoint)  # fmt: skip
    try:
        await new.replicaof("127.0.0.1", _port(old))
        yield rig
    finally:
        for client in (*rig.clients, old, new):
            await client.aclose()
        await endpoint.stop()


def test_after_a_failover_behind_one_endpoint_writes_reach_the_new_primary(
    old_and_new: tuple[str, str], tmp_path: Path
) -> None:
    """The new primary was the old one's replica: the data and (up to Redis 6.2) the loaded
    scripts came with it."""

    async def scenario() -> None:
        async with behind_one_endpoint(old_and_new, tmp_path, 3) as rig:
            commands, scripts, packed = rig.clients
            script = scripts.register_script(WRITE)
            await script(keys=["before"], args=["old"])  # loaded on the old primary
            for client in rig.clients:  # POOL connections each, to the old one
                await asyncio.gather(*(client.set(f"warm-{i}", 1) for i in range(POOL)))
            assert await rig.old.wait(1, 5000) == 1  # the replica has it all
            await rig.fail_over()

            # redis-py's commands and scripts: retried on a fresh connection, every one lands.
            sets = await asyncio.gather(*(commands.set(f"c-{i}", "new") for i in range(POOL)))
            assert sets == [True] * POOL
            runs = await asyncio.gather(
                *(script(keys=[f"s-{i}"], args=["new"]) for i in range(POOL))
            )
            assert runs == [b"OK"] * POOL
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
            assert await rig.new.mget(names) == [b"old"] + [b"new"] * (len(names) - 1)

    uvloop.run(scenario())


def test_after_a_failover_behind_one_endpoint_the_probe_says_ready_at_once(
    old_and_new: tuple[str, str], tmp_path: Path
) -> None:
    """The readiness probe asks that the server take a write (a replica refuses every one),
    and its connections follow the failover as the engine's do: were it kept on the old
    primary, an idle service would stay unready, and a load balancer would send it none of
    the requests whose writes would have moved it."""

    async def scenario() -> None:
        async with behind_one_endpoint(old_and_new, tmp_path, 1) as rig:
            [client] = rig.clients
            await asyncio.gather(*(client.set(f"warm-{i}", 1) for i in range(POOL)))
            assert await check(lambda: ping_redis(client)) is None
            await rig.fail_over()
            for _ in range(POOL):  # each pooled connection led to the old primary
                assert await check(lambda: ping_redis(client)) is None

    uvloop.run(scenario())


def test_after_a_failover_to_a_primary_without_the_scripts_every_call_lands(
    old_and_new: tuple[str, str], tmp_path: Path
) -> None:
    """Redis 7 does not replicate ``SCRIPT LOAD``, so the promoted replica has no script: the
    first call of each script after the failover hears NOSCRIPT there. The script has to be
    loaded on the server that said so. Loaded through any pooled connection, it may go to the
    old primary (which has it) and the call again to the new one: NOSCRIPT once more, which is
    neither an outage nor the request's fault."""

    async def scenario() -> None:
        async with behind_one_endpoint(old_and_new, tmp_path, 2) as rig:
            scripts, packed = rig.clients
            script = Script(scripts, WRITE)
            await script(keys=["before"], args=["old"])
            for client in rig.clients:  # POOL connections each, to the old primary
                await asyncio.gather(*(client.get(f"warm-{i}") for i in range(POOL)))
            assert await rig.old.wait(1, 5000) == 1
            # The failover, onto a server that has none of the scripts (as on Redis 7: flushed
            # before each round, so that each kind of call meets it).
            await rig.fail_over()

            async def packed_call(i: int) -> object:
                return await call_packed(packed, script, ("EVALSHA", script.sha, 1, f"p-{i}", "n"))

            async def read(i: int) -> object:  # reads keep old connections in the pools
                return await asyncio.gather(scripts.get(f"warm-{i}"), packed.get(f"warm-{i}"))

            async def script_call(i: int) -> object:
                return await script(keys=[f"s-{i}"], args=["n"])

            for calls in ((script_call, read, read, read), (packed_call, read, read, read)):
                await rig.new.script_flush()
                answers = await asyncio.gather(*(calls[i % 4](i) for i in range(12 * POOL)),
                                               return_exceptions=True)  # fmt: skip
                refused = [a for a in answers if isinstance(a, BaseException)]
                assert all(is_outage(a) for a in refused), [repr(a) for a in refused]
            assert await asyncio.gather(*(packed_call(i) for i in range(POOL))) == [b"OK"] * POOL
            assert await asyncio.gather(*(script_call(i) for i in range(POOL))) == [b"OK"] * POOL
            names = [f"{p}-{i}" for p in "sp" for i in range(POOL)]
            assert await rig.new.mget(names) == [b"n"] * len(names)

    uvloop.run(scenario())
