"""Which exceptions mean "a dependency is down, wait and retry" and which mean "this can never
succeed": one classification, shared by the gateway (503), the workers and the reconciler."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions
import uvloop
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaConnectionError

from flashsale import outages
from flashsale.cli.devstack.processes import free_port
from flashsale.errors import ProviderDown, Unavailable
from flashsale.ops_endpoints import check, memory_read, memory_used, ping_postgres, ping_redis
from flashsale.outages import is_demotion, is_outage
from flashsale.settings import Secret, Settings
from gateway.app import create_app
from loadtest.fault_proxy import FaultProxy, through
from tests.conftest import Cli
from tests.lone_redis import lone_redis as lone

# A command of a script that the ACL user may not run, or a key it may not touch: words with no
# error code, as Redis 6.2 (wrapped) and 7.0 answer them (7.0's "ERR " taken off by redis-py).
IN_A_SCRIPT_REFUSED = [
    redis.exceptions.ResponseError(
        "Error running script (call to f_104ae65debf45156ded1e8e613705534c8e62c17): "
        "@user_script:1: @user_script: 1: The user executing the script can't run this "
        "command or subcommand"
    ),
    redis.exceptions.ResponseError(
        "The user executing the script can't access at least one of the keys mentioned in the "
        "command arguments script: 2c72deee909ba2886d54cc074272a842100d1744, on @user_script:1."
    ),
]

WAIT = [
    # Postgres: connection (08), insufficient resources (53), operator intervention (57),
    # transaction rollback (40), lock not available (55P03), a read-only server (25006)
    asyncpg.ConnectionDoesNotExistError("gone"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("crash"),
    asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.InsufficientResourcesError("out of memory"),
    asyncpg.DeadlockDetectedError("deadlock detected"),
    asyncpg.SerializationError("could not serialize access"),
    asyncpg.LockNotAvailableError("could not obtain lock"),
    asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    # a schema behind the engine (its migrations not run yet): `flashsale migrate` mends it,
    # and the event or request succeeds then, instead of being parked on the dead letters
    asyncpg.UndefinedTableError('relation "orders" does not exist'),
    asyncpg.UndefinedColumnError('column "cause" does not exist'),
    asyncpg.UndefinedFunctionError("function flashsale_sold(text) does not exist"),
    # a user not granted what it does (42501): the grant mends it without a release, as a
    # password does a refused login; a reservation parked on the dead letters for it was not
    # bad data
    asyncpg.InsufficientPrivilegeError("permission denied for table orders"),
    # a transaction pooler without FLASHSALE_PG_POOL_MODE=transaction: a statement of
    # asyncpg's cache named twice on a server connection, or missing from it
    asyncpg.DuplicatePreparedStatementError('prepared statement "__asyncpg_stmt_1__" exists'),
    asyncpg.InvalidSQLStatementNameError('prepared statement "__asyncpg_stmt_2__" does not exist'),
    # asyncpg's client state: a connection closed under it, a protocol surprise
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.InternalClientError("unexpected connection_lost() call"),
    asyncpg.exceptions.ProtocolError("unexpected message"),
    # Redis: connection, timeout, loading, read-only (a failover), OOM, a busy script
    redis.exceptions.ConnectionError("Connection refused"),
    redis.exceptions.TimeoutError("Timeout reading from socket"),
    redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
    redis.exceptions.ResponseError("BUSY Redis is busy running a script."),
    redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
    redis.exceptions.ResponseError("NOREPLICAS Not enough good replicas to write."),
    redis.exceptions.ResponseError(  # as Redis 6.2 wraps a refusal met inside a script
        "Error running script (call to f_6b1e): @user_script:56: @user_script: 56: -OOM "
        "command not allowed when used memory > 'maxmemory'."
    ),
    # its disk full or failing: writes stop until a save succeeds again
    redis.exceptions.ResponseError(
        "MISCONF Redis is configured to save RDB snapshots, but it is currently not able to "
        "persist on disk."
    ),
    redis.exceptions.ResponseError(
        "Error running script (call to f_6b1e): @user_script:1: @user_script: 1: -MISCONF "
        "Errors writing to the AOF file: No space left on device"
    ),
    # an ACL user not allowed a command or a key
    redis.exceptions.NoPermissionError(
        "this user has no permissions to run the 'evalsha' command or its subcommand"
    ),
    *IN_A_SCRIPT_REFUSED,
    # the network, the broker, the payment provider's open circuit
    ConnectionResetError("reset by peer"),
    TimeoutError(),
    socket.gaierror(-3, "Temporary failure in name resolution"),
    OSError(errno.ENETUNREACH, "Network is unreachable"),
    OSError(errno.EMFILE, "Too many open files"),  # a process out of sockets, for now
    KafkaConnectionError("no broker"),
    ProviderDown("the circuit is open"),
    Unavailable("the SKU is being rebuilt"),
    # uvloop, writing to a connection the peer reset (found by flashsale chaos network-reset)
    RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False "
        "0x56083ea45d10>; the handler is closed"
    ),
]

NEVER = [
    asyncpg.CheckViolationError("new row violates check constraint"),
    asyncpg.UniqueViolationError("duplicate key"),
    asyncpg.CharacterNotInRepertoireError("invalid byte sequence for encoding UTF8: 0x00"),
    asyncpg.exceptions.ClientConfigurationError("bad option"),
    redis.exceptions.ResponseError("WRONGTYPE Operation against a key"),
    redis.exceptions.ResponseError(
        "Error running script (call to f_6b1e): @user_script:3: @user_script: 3: -WRONGTYPE "
        "Operation against a key holding the wrong kind of value"
    ),
    redis.exceptions.ResponseError(  # a script's own error, whatever words it uses
        "Error running script (call to f_6b1e): @user_script:9: user_script:9: hold: READONLY "
    ),
    redis.exceptions.NoScriptError("NOSCRIPT No matching script"),
    redis.exceptions.DataError("Invalid input"),
    ValueError("malformed hold record"),
    RuntimeError("Event loop is closed"),
    KeyError("currency"),
    # a file: retrying will not make it appear (a socket's error never names a file)
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/etc/flashsale/rules.json"),
    PermissionError(errno.EACCES, "Permission denied", "/var/lib/flashsale/report.json"),
    IsADirectoryError(errno.EISDIR, "Is a directory", "/var/lib/flashsale"),
]


DEMOTED = [
    redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    redis.exceptions.ResponseError(
        "Error running script (call to f_6b1e): @user_script:56: @user_script: 56: -READONLY "
        "You can't write against a read only replica."
    ),
]


def test_a_write_refused_by_a_replica_is_told_from_other_outages() -> None:
    """A READONLY answer means the connection leads to a demoted primary: the client drops
    it (flashsale.clients); other outages keep their connections."""
    assert all(is_demotion(exc) for exc in DEMOTED)
    others = [e for e in WAIT if not isinstance(e, redis.exceptions.ReadOnlyError)]
    assert len(others) == len(WAIT) - 1 and not any(is_demotion(exc) for exc in others)
    assert not any(is_demotion(exc) for exc in NEVER)


@pytest.mark.parametrize("exc", IN_A_SCRIPT_REFUSED, ids=["redis-6.2", "redis-7.0"])
def test_a_command_a_script_may_not_run_is_said_as_the_users_grant(exc: BaseException) -> None:
    """Neither Redis 6.2 nor 7.0 gives a script's refused command the NOPERM code: the CLI
    printed the traceback, the gateway answered 500 and the workers parked the reservation."""
    said = outages.settings_at_fault(exc)
    assert said is not None and str(said).startswith(
        "Redis refused REDIS_URL's user: the user executing the script can't "
    ), said
    assert "(ACL LOG names it)" in str(said) and "docs/PRODUCTION.md" in str(said), said


@pytest.mark.parametrize("exc", WAIT, ids=lambda e: type(e).__name__)
def test_a_dependency_that_is_down_is_waited_out(exc: BaseException) -> None:
    assert is_outage(exc)


@pytest.mark.parametrize("exc", NEVER, ids=lambda e: type(e).__name__)
def test_what_can_never_succeed_is_not_an_outage(exc: BaseException) -> None:
    assert not is_outage(exc)


def test_what_uvloop_raises_on_a_reset_connection_is_an_outage(stack: Settings) -> None:
    """The engine runs on uvloop. A Redis connection the network reset failed, on its next
    write, with uvloop's own RuntimeError rather than a ConnectionError; it must still be an
    outage (a 503 to the buyer), not a 500. Each failure also drops the connection, so the
    call after it works. redis-py 8.2 looks at the transport before writing and raises its
    ConnectionError, which its retry carries: then no call fails at all."""

    async def scenario() -> list[BaseException]:
        target = urlsplit(stack.require_redis())
        proxy = await FaultProxy(target.hostname or "127.0.0.1", target.port or 6379).start()
        client = aioredis.Redis.from_url(through(stack.require_redis(), proxy.port),
                                         health_check_interval=0)  # fmt: skip
        failures: list[BaseException] = []
        try:
            for _ in range(5):
                await client.ping()
                proxy.reset_all()
                await asyncio.sleep(0.05)  # the RST has arrived; the client does not know yet
                try:
                    await client.ping()
                except Exception as exc:  # noqa: BLE001 - what is raised is the point
                    failures.append(exc)
            assert await client.ping()  # and it reconnects
        finally:
            await client.aclose()
            await proxy.stop()
        return failures

    failures = uvloop.run(scenario())
    assert all(is_outage(exc) for exc in failures), [repr(e) for e in failures]


async def test_a_redis_connection_closed_while_it_writes_is_an_outage(stack: Settings) -> None:
    """redis-py's asyncio connection let a close that races a write leak as AttributeError
    (its writer is already gone; redis/redis-py#3546, #4287): seen as a 500 on a reservation
    while a Redis Cluster primary failed over. It is an outage, recognised by where it was
    raised; an AttributeError anywhere else is still a bug. redis-py 8.2 raises its
    ConnectionError there instead, an outage too."""
    pool = aioredis.ConnectionPool.from_url(stack.require_redis())
    connection = aioredis.Connection(**pool.connection_kwargs)
    await connection.send_command("PING")  # connects
    assert await connection.read_response() == b"PONG"
    await connection.disconnect()  # what a concurrent close leaves behind
    with pytest.raises((AttributeError, redis.exceptions.ConnectionError)) as raised:
        await connection._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])
    assert is_outage(raised.value)
    assert not is_outage(AttributeError("'NoneType' object has no attribute 'writelines'"))


@pytest.fixture
def lone_redis(tmp_path: Path) -> Iterator[str]:
    with lone(tmp_path) as url:
        yield url


WRITE = "return redis.call('SET', KEYS[1], ARGV[1])"


async def test_a_script_refused_a_write_by_a_passing_state_of_redis_is_an_outage(
    lone_redis: str,
) -> None:
    """A primary demoted to a replica (a Sentinel or managed failover: the old connections
    still point at it) refuses a script's write with READONLY, and a full one with OOM. Redis
    6.2 wraps both in "Error running script", which redis-py raises as a plain ResponseError:
    seen as a traceback from `flashsale sale preload`, and the gateway's, the workers' and the
    reconciler's scripts meet the same answer. Both pass (the new primary, freed memory):
    outages, not bad data. A script's command refused for its data stays bad data."""
    client = aioredis.Redis.from_url(lone_redis)
    refused: list[BaseException] = []
    try:
        assert await client.eval(WRITE, 1, "k", "v")
        await client.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.ResponseError) as oom:
            await client.eval(WRITE, 1, "k2", "v")
        refused.append(oom.value)
        await client.config_set("maxmemory", "0")
        await client.config_set("save", "3600 1")  # a snapshot that cannot be written: MISCONF
        await client.config_set("dir", "/proc")
        await client.bgsave()
        for _ in range(100):
            if (await client.info("persistence"))["rdb_last_bgsave_status"] == "err":
                break
            await asyncio.sleep(0.05)
        with pytest.raises(redis.exceptions.ResponseError) as misconf:
            await client.eval(WRITE, 1, "k3", "v")
        refused.append(misconf.value)
        await client.config_set("save", "")
        await client.config_set("stop-writes-on-bgsave-error", "no")
        dead = free_port()
        await client.replicaof("127.0.0.1", dead)
        with pytest.raises(redis.exceptions.ResponseError) as readonly:
            await client.eval(WRITE, 1, "k", "w")
        refused.append(readonly.value)
        assert await client.get("k") == b"v"  # a replica still answers reads
        with pytest.raises(redis.exceptions.ResponseError) as bad:
            await client.eval("return redis.call('HGET', KEYS[1], 'f')", 1, "k")  # WRONGTYPE
    finally:
        await client.aclose()
    assert all(is_outage(exc) for exc in refused), [str(e) for e in refused]
    assert not is_outage(bad.value), str(bad.value)


async def test_a_redis_that_answers_but_refuses_every_write_is_not_ready(lone_redis: str) -> None:
    """A full Redis (``maxmemory`` reached under ``noeviction``) and one demoted to a replica
    answer a PING, and refuse every write: every buyer was answered 503 while ``/readyz``
    said ready and ``flashsale_dependency_up`` 1, so no alert fired. Both pass, and the probe
    says ready again."""
    client = aioredis.Redis.from_url(lone_redis)
    try:
        assert await check(lambda: ping_redis(client)) is None
        await client.config_set("maxmemory", "1")
        full = await check(lambda: ping_redis(client))
        assert full is not None and "full" in full and "maxmemory" in full, full
        await client.config_set("maxmemory", "0")
        assert await check(lambda: ping_redis(client)) is None
        await client.replicaof("127.0.0.1", free_port())
        demoted = await check(lambda: ping_redis(client))
        assert demoted is not None and "replica" in demoted, demoted
        await client.replicaof("NO", "ONE")
        assert await check(lambda: ping_redis(client)) is None
    finally:
        await client.aclose()


async def test_a_postgres_that_refuses_every_write_is_not_ready(stack: Settings) -> None:
    """A hot standby (``DATABASE_URL`` at a read replica, a failover that left the endpoint on
    the old primary) or a database with writes turned off answers every query: it was ready,
    while the workers waited on every order and the admin API answered 503."""
    conn = await asyncpg.connect(stack.require_database())
    try:
        assert await check(lambda: ping_postgres(conn)) is None
        await conn.execute("SET default_transaction_read_only = on")
        said = await check(lambda: ping_postgres(conn))
        assert said is not None and "read-only" in said, said
        await conn.execute("SET default_transaction_read_only = off")
        assert await check(lambda: ping_postgres(conn)) is None
    finally:
        await conn.close()


async def test_redis_memory_is_read_as_a_share_of_its_maxmemory(lone_redis: str) -> None:
    """What the allocator exports for the alert that comes before a full Redis: nothing for a
    server without a ``maxmemory`` (no share to give), else used over most, by address."""
    client = aioredis.Redis.from_url(lone_redis)
    try:
        assert await memory_used(client) == {}
        await client.config_set("maxmemory", str(10 * 2**30))
        [(node, share)] = (await memory_used(client)).items()
        used = (await client.info("memory"))["used_memory"]
        assert node == f"127.0.0.1:{urlsplit(lone_redis).port}"
        assert 0 < share == pytest.approx(used / (10 * 2**30), rel=0.5), (share, used)
    finally:
        await client.aclose()


async def test_a_redis_that_evicts_when_full_is_warned_of(lone_redis: str) -> None:
    """The documents ask for ``noeviction``; a server under another policy was used unsaid:
    ``allkeys-*`` evicts a stock hash (a lost SKU until rebuilt), ``volatile-*`` (a managed
    service's default) the pumps' leases and the rate limits."""
    client = aioredis.Redis.from_url(lone_redis)
    node = f"127.0.0.1:{urlsplit(lone_redis).port}"
    try:
        await client.config_set("maxmemory-policy", "allkeys-lru")
        assert (await memory_read(client)).warnings() == []  # no maxmemory: it never evicts
        await client.config_set("maxmemory", str(10 * 2**30))
        read = await memory_read(client)
        assert list(read.shares) == [node]
        assert read.warnings() == [
            f"Redis {node} evicts any key when full (maxmemory-policy allkeys-lru): a stock "
            "hash it evicts is a lost SKU until the reconciler rebuilds it; set noeviction "
            '(docs/PRODUCTION.md, "Redis: persistence and the durability window")'
        ], read.warnings()
        await client.config_set("maxmemory-policy", "volatile-lfu")
        [said] = (await memory_read(client)).warnings()
        volatile = f"Redis {node} evicts keys with an expiry when full (maxmemory-policy "
        assert said.startswith(volatile + "volatile-lfu): the pumps' leases"), said
        await client.config_set("maxmemory-policy", "noeviction")
        assert (await memory_read(client)).warnings() == []
    finally:
        await client.config_set("maxmemory", "0")
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()


def test_the_cli_names_a_server_that_is_down_in_one_line(
    stack: Settings, lone_redis: str, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command whose server is down, stalled or refusing writes for now ends with one line
    and exit 1, whatever the library raised: the CLI uses the services' classification. It
    caught only refused connections, so a demoted Redis (and a stalled one, after its
    timeouts) ended in a traceback."""
    created = cli("sale", "create", "--name", "Down", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    assert created.code == 0, created.err
    with redis.Redis.from_url(lone_redis) as client:
        client.replicaof("127.0.0.1", free_port())
    monkeypatch.setenv("REDIS_URL", lone_redis)
    monkeypatch.setenv("FLASHSALE_REDIS_CLUSTER", "0")  # a lone server, also under test-cluster
    refused = cli("sale", "preload", created.out.strip())
    assert refused.code == 1
    assert refused.err.startswith(
        "flashsale: error: Redis is unavailable: ConnectionError: the server is a replica now"
    ), refused.err
    # Redis 6.2 wraps the refusal met inside the script ("... -READONLY You can't write...");
    # Redis 7 passes it on as it is, which redis-py raises as its ReadOnlyError.
    assert "READONLY" in refused.err or "ReadOnlyError" in refused.err, refused.err
    assert "Traceback" not in refused.err
    assert len(refused.err.strip().splitlines()) == 1, refused.err


def test_the_cli_says_a_single_redis_is_no_cluster(
    stack: Settings, lone_redis: str, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``FLASHSALE_REDIS_CLUSTER=1`` with ``REDIS_URL`` at a single server: "Redis is
    unavailable", of a server that answered, sent the operator looking for an outage."""
    created = cli("sale", "create", "--name", "Kind", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    assert created.code == 0, created.err
    monkeypatch.setenv("REDIS_URL", lone_redis)
    monkeypatch.setenv("FLASHSALE_REDIS_CLUSTER", "1")
    result = cli("sale", "status", created.out.strip())
    assert result.code == 1
    assert result.err == (
        "flashsale: error: FLASHSALE_REDIS_CLUSTER=1, but the Redis at REDIS_URL is a single "
        "server, not a node of a Redis Cluster: unset FLASHSALE_REDIS_CLUSTER, or point "
        "REDIS_URL at a node of the cluster\n"
    ), result.err


async def test_the_probe_of_a_redis_user_not_allowed_info_is_its_ping(lone_redis: str) -> None:
    """The probe asks INFO whether the server is a cluster node; a managed Redis's user kept
    to the commands the engine sends may not ask it, and stays ready on its PING."""
    admin = aioredis.Redis.from_url(lone_redis)
    try:
        await admin.acl_setuser("engine", enabled=True, passwords=["+engine-password-0123"],
                                keys=["*"], commands=["+@all", "-info"])  # fmt: skip
    finally:
        await admin.aclose()
    port = urlsplit(lone_redis).port
    client = aioredis.Redis.from_url(f"redis://engine:engine-password-0123@127.0.0.1:{port}/0")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.info("cluster")
        assert await check(lambda: ping_redis(client)) is None
    finally:
        await client.aclose()


async def test_a_probe_says_a_single_redis_is_no_cluster_as_the_cli_does(lone_redis: str) -> None:
    """The readiness probe of a service so configured said the cluster client's own text."""
    client = aioredis.RedisCluster.from_url(lone_redis)
    try:
        said = await check(client.ping)
    finally:
        await client.aclose()
    assert said is not None and said.startswith("FLASHSALE_REDIS_CLUSTER=1, but the Redis at "
                                                "REDIS_URL is a single server"), said  # fmt: skip


@pytest.mark.parametrize(("variable", "command", "said"), [
    # It said "a server is unavailable", leaving the operator to guess which from the port.
    ("REDIS_URL", ("sale", "status", "{sale}"), "Redis is unavailable: ConnectionError: Error "),
    # The error's type was named twice: its own text starts with it.
    ("KAFKA_BOOTSTRAP", ("kafka", "init"), "cannot reach the Kafka broker at 127.0.0.1:{port}: "
     "KafkaConnectionError: Unable to bootstrap"),
])  # fmt: skip
def test_the_cli_names_the_server_it_cannot_reach(
    stack: Settings, cli: Cli, monkeypatch: pytest.MonkeyPatch, variable: str,
    command: tuple[str, ...], said: str,
) -> None:  # fmt: skip
    created = cli("sale", "create", "--name", "Down", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    assert created.code == 0, created.err
    command = tuple(part.format(sale=created.out.strip()) for part in command)
    port = free_port()
    monkeypatch.setenv(variable, f"redis://127.0.0.1:{port}" if variable == "REDIS_URL"
                       else f"127.0.0.1:{port}")  # fmt: skip
    monkeypatch.setenv("FLASHSALE_REDIS_CLUSTER", "0")
    result = cli(*command)
    assert result.code == 1
    line = [x for x in result.err.splitlines() if x.startswith("flashsale: error:")]
    assert line and line[0].startswith(f"flashsale: error: {said.format(port=port)}"), result.err
    # One line: aiokafka's own error line about the same refused connection came first.
    assert len(result.err.strip().splitlines()) == 1, result.err


@pytest.mark.parametrize(("part", "said"), [
    ("password", "Postgres at 127.0.0.1:{port} refused the login of DATABASE_URL: password "
                 "authentication failed for user"),
    ("database", "Postgres at 127.0.0.1:{port} has no such database (DATABASE_URL): "
                 'database "nosuchdb" does not exist'),
])  # fmt: skip
def test_the_cli_says_postgres_refused_the_login_not_that_it_cannot_be_reached(
    stack: Settings, cli: Cli, monkeypatch: pytest.MonkeyPatch, part: str, said: str
) -> None:
    """A wrong password or database name read "cannot reach Postgres at H:P: password
    authentication failed": Postgres was reached, and refused what DATABASE_URL says."""
    dsn = urlsplit(stack.require_database())
    wrong = (dsn._replace(netloc=f"{dsn.username}:wrong-password@{dsn.hostname}:{dsn.port}")
             if part == "password" else dsn._replace(path="/nosuchdb"))  # fmt: skip
    monkeypatch.setenv("DATABASE_URL", urlunsplit(wrong))
    result = cli("sale", "list")
    assert result.code == 1, result
    assert result.err.startswith("flashsale: error: " + said.format(port=dsn.port)), result.err


def test_the_cli_says_redis_refused_the_login(
    stack: Settings, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong password in REDIS_URL read "Redis is unavailable: AuthenticationError"."""
    created = cli("sale", "create", "--name", "Login", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    assert created.code == 0, created.err
    url = urlsplit(stack.require_redis())
    netloc = f"{url.username or 'default'}:wrong-password@{url.hostname}:{url.port}"
    monkeypatch.setenv("REDIS_URL", urlunsplit(url._replace(netloc=netloc)))
    monkeypatch.setenv("FLASHSALE_REDIS_CLUSTER", "0")  # the login comes first on a node too
    result = cli("sale", "status", created.out.strip())
    assert result.code == 1, result
    assert result.err.startswith(
        "flashsale: error: Redis refused the login of REDIS_URL: invalid username-password"
    ), result.err


def test_the_cli_says_redis_has_no_such_database(
    stack: Settings, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A REDIS_URL naming a database the server does not have (``/99``; 16 by default)
    printed redis-py's traceback, "DB index is out of range" (a node of a Redis Cluster, read
    as a single server, has none but 0: "SELECT is not allowed in cluster mode")."""
    created = cli("sale", "create", "--name", "Index", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    assert created.code == 0, created.err
    url = urlsplit(stack.require_redis())
    monkeypatch.setenv("REDIS_URL", urlunsplit(url._replace(path="/99")))
    monkeypatch.setenv("FLASHSALE_REDIS_CLUSTER", "0")
    result = cli("sale", "status", created.out.strip())
    assert (result.code, result.err.count("\n")) == (1, 1), result
    said = ("REDIS_URL leads to a node of a Redis Cluster, read as a single server: set "
            "FLASHSALE_REDIS_CLUSTER=1, and name database 0 (/0), a cluster's only one"
            if stack.redis_cluster else
            "REDIS_URL names a database this Redis does not have (DB index is out of range): "
            "use one below its `databases` setting (16 by default), as /0")  # fmt: skip
    assert result.err == f"flashsale: error: {said}\n", result.err


def test_the_cli_says_a_postgres_that_answers_nothing_did_not_answer(
    stack: Settings, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Postgres that takes the connection and answers nothing (a hung server, a partition):
    the line ended "cannot reach Postgres at 127.0.0.1:PORT: ", the timeout's empty text."""
    with socket.socket() as silent:  # the kernel completes connections; nothing is ever read
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        dsn = urlsplit(stack.require_database())
        monkeypatch.setenv("DATABASE_URL", urlunsplit(dsn._replace(
            netloc=f"{dsn.username}:{dsn.password}@127.0.0.1:{port}")))  # fmt: skip
        monkeypatch.setenv("FLASHSALE_PG_TIMEOUT", "1")
        result = cli("sale", "list")
    assert result.code == 1
    assert result.err.strip() == (
        f"flashsale: error: cannot reach Postgres at 127.0.0.1:{port}: no answer within 1 s"
    ), result.err


async def test_a_postgres_refusing_writes_for_now_is_an_outage(stack: Settings) -> None:
    """A Postgres that refuses writes (a hot standby behind the endpoint before it moves, or
    ``default_transaction_read_only`` set during maintenance) answers 25006. The engine never
    asks for a read-only transaction itself, so the server will take the write later: an
    outage, not bad data (which parks a worker's batch on the dead letters)."""
    conn = await asyncpg.connect(stack.require_database())
    try:
        await conn.execute("SET default_transaction_read_only = on")
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.execute("CREATE TABLE never_made (n int)")  # refused before it runs
    finally:
        await conn.close()
    assert refused.value.sqlstate == "25006", refused.value
    assert is_outage(refused.value)


def test_a_loop_meeting_the_same_outage_logs_it_once_per_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admission pump ticks ten times a second and the sweeper four: during a Redis outage
    each failed round was a warning of its own. The first is logged at once, the rest of the
    interval counted into the next line; a bug (not an outage) is logged every time."""
    now = [1000.0]
    monkeypatch.setattr(outages, "_clock", lambda: now[0])
    logger = logging.getLogger("test.quiet")
    down = redis.exceptions.ConnectionError("Connection refused")
    with caplog.at_level(logging.WARNING, logger="test.quiet"):
        for _ in range(40):  # five seconds of ticks
            outages.log_failure(logger, "pump for s-1 failed a tick", down)
            now[0] += 0.125
        assert [r.getMessage() for r in caplog.records] == [
            "pump for s-1 failed a tick: ConnectionError: Connection refused"
        ]
        outages.log_failure(logger, "sweep failed", down)  # another loop: its own line
        assert len(caplog.records) == 2
        outages.log_failure(logger, "pump for s-1 failed a tick", down)
        assert caplog.records[-1].getMessage() == (
            "pump for s-1 failed a tick: ConnectionError: Connection refused "
            "(39 more times in the last 5.0s)"
        )
        bug = KeyError("status")
        for _ in range(3):
            outages.log_failure(logger, "pump for s-1 failed a tick", bug)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 3


def test_the_cli_says_which_grant_the_database_user_lacks(
    stack: Settings, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DATABASE_URL whose user is not granted the engine's tables (or, to migrate, its
    schema) printed asyncpg's traceback, and the services took it for bad data."""
    dsn = urlsplit(stack.require_database())

    async def limited_user() -> None:
        conn = await asyncpg.connect(stack.require_database())
        try:
            await conn.execute("DROP ROLE IF EXISTS flashsale_limited")
            await conn.execute("CREATE ROLE flashsale_limited LOGIN PASSWORD 'limited-pw-0123'")
        finally:
            await conn.close()

    asyncio.run(limited_user())
    netloc = f"flashsale_limited:limited-pw-0123@{dsn.hostname}:{dsn.port}"
    limited = urlunsplit(dsn._replace(netloc=netloc))
    monkeypatch.setenv("DATABASE_URL", limited)
    for command in (("sale", "list"), ("migrate",)):
        result = cli(*command)
        assert (result.code, result.out) == (1, ""), result
        assert (
            result.err.startswith(
                "flashsale: error: Postgres refused DATABASE_URL's user: permission denied for "
            )
            and result.err.count("\n") == 1
        ), result.err
        assert "docs/PRODUCTION.md" in result.err, result.err

    async def ask_the_admin_api() -> tuple[int, str | None, dict[str, Any]]:
        settings = dataclasses.replace(stack, database_url=limited,
                                       admin_token=Secret("admin-token-0123456789"))  # fmt: skip
        async with TestClient(TestServer(create_app(settings))) as http:
            listed = await http.get(
                "/admin/v1/sales", headers={"Authorization": "Bearer admin-token-0123456789"}
            )
            return listed.status, listed.headers.get("Retry-After"), await listed.json()

    # The gateway answered 500: a grant is a setting, waited out as a refused login is.
    status, retry_after, body = asyncio.run(ask_the_admin_api())
    assert (status, retry_after is not None) == (503, True), body
    assert body["error"]["code"] == "unavailable", body  # what to grant is the log's


@pytest.mark.parametrize(("refused", "said"), [
    (["-evalsha", "-eval"], "this user has no permissions to run the 'evalsha' command"),
    # TIME, called inside the script: neither Redis 6.2 nor 7.0 says NOPERM there
    (["-time"], "the user executing the script can't run this command or subcommand (ACL LOG "
                "names it)"),
])  # fmt: skip
async def test_the_cli_says_which_command_the_redis_user_lacks(
    lone_redis: str, cli: Cli, monkeypatch: pytest.MonkeyPatch, stack: Settings,
    refused: list[str], said: str,
) -> None:  # fmt: skip
    """A REDIS_URL whose ACL user may not run the engine's scripts, or a command inside one,
    printed redis-py's traceback, and the admin API answered 500."""
    admin = aioredis.Redis.from_url(lone_redis)
    try:
        await admin.acl_setuser("engine", enabled=True, passwords=["+engine-password-0123"],
                                keys=["*"], commands=["+@all", *refused], reset=True)  # fmt: skip
    finally:
        await admin.aclose()
    port = urlsplit(lone_redis).port
    limited = f"redis://engine:engine-password-0123@127.0.0.1:{port}/0"
    monkeypatch.setenv("REDIS_URL", limited)
    monkeypatch.setenv("FLASHSALE_REDIS_CLUSTER", "0")
    create = ("sale", "create", "--name", "ACL", "--sku", "A", "--stock", "5",
              "--price", "100", "--currency", "EUR")  # fmt: skip
    created = await asyncio.to_thread(cli, *create)
    assert created.code == 0, created.err
    sale = created.out.strip()
    result = await asyncio.to_thread(cli, "sale", "preload", sale)
    assert (result.code, result.err.count("\n")) == (1, 1), result
    assert result.err.startswith(f"flashsale: error: Redis refused REDIS_URL's user: {said}"), (
        result.err
    )
    assert "docs/PRODUCTION.md" in result.err, result.err
    # Readiness said ready: its write was a SET, which the user may send.
    client = aioredis.Redis.from_url(limited)
    try:
        probe = await check(lambda: ping_redis(client))
    finally:
        await client.aclose()
    assert probe is not None and probe.startswith(f"Redis refused REDIS_URL's user: {said}"), probe
    settings = dataclasses.replace(stack, redis_url=limited, redis_cluster=False,
                                   admin_token=Secret("admin-token-0123456789"))  # fmt: skip
    async with TestClient(TestServer(create_app(settings))) as http:
        token = {"Authorization": "Bearer admin-token-0123456789"}
        answer = await http.post(f"/admin/v1/sales/{sale}/preload", headers=token)
        body = await answer.json()
    assert (answer.status, "Retry-After" in answer.headers) == (503, True), body
    assert body["error"]["code"] == "unavailable", body
