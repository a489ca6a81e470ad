"""Client builders. Nothing is created at import time: entry points build clients from Settings
and own their lifecycle (close what you open)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from flashsale.errors import ConfigError, Unavailable
from flashsale.logs import REDACTED_LENGTH
from flashsale.outages import BEHIND_A_POOLER
from flashsale.payments import HttpProvider, PaymentProvider
from flashsale.redis_connection import REPLACES
from flashsale.settings import Settings

# What every Redis caller takes: one server, or a Redis Cluster (FLASHSALE_REDIS_CLUSTER=1).
# Single-key commands, scripts and redis-py pipelines work on both; commands packed in C go
# through allocator.redis_calls, which groups them by node.
RedisClient: TypeAlias = aioredis.Redis | aioredis.RedisCluster

# redis-py's cluster nodes refuse a connection beyond their pool's size instead of waiting for
# one: a node's pool may grow to this many times ``max_connections`` (connections are opened
# only as concurrency needs them), while packed calls wait their turn beyond ``max_connections``
# (allocator.redis_calls), as on a single server.
CLUSTER_POOL_FACTOR = 16

T = TypeVar("T")

log = logging.getLogger("flashsale.clients")

# The options of each server URL that name a file its client reads when it connects: the TLS
# authority, a client certificate and its key, a revocation list.
_FILE_OPTIONS = {
    "REDIS_URL": ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"),
    "DATABASE_URL": ("sslrootcert", "sslcert", "sslkey", "sslcrl"),
}


def redis_client(
    settings: Settings, *, max_connections: int = 64, wait_s: float | None = 5.0, **options: Any
) -> RedisClient:
    """An asyncio Redis client (bytes responses) for ``REDIS_URL``; with
    ``FLASHSALE_REDIS_CLUSTER=1`` a :class:`redis.asyncio.RedisCluster` that learns the
    cluster's nodes and slots from the node ``REDIS_URL`` names (:func:`cluster_client`).

    Its pool holds at most ``max_connections``; a caller beyond that waits up to ``wait_s`` for
    one to come back instead of failing (a spike queues here briefly, it does not open
    thousands of connections).

    A call waits ``FLASHSALE_REDIS_TIMEOUT`` for its answer, then fails: a hung server or a
    partition is an outage, not retried. A call that meets a dead connection (Redis
    restarted, the network reset it) is retried twice on a fresh one, 50-500 ms apart with
    jitter, before it fails: without it every connection that died idle in the pool cost one
    caller a 503 after Redis was back. A connection the network reset, or that leads to a
    primary demoted by a failover (it answers ``READONLY``), is given up the same way
    (:mod:`flashsale.redis_connection`). What a retry may repeat is safe to repeat: each
    script is idempotent by request, hold state or fence, the pump publishes an absolute
    serving position, and a re-read stream entry stays pending until acknowledged. Packed
    calls (``allocator.redis_calls.read_packed``: the reserve batches, the rate limits) take
    a raw connection and are not retried here: they replace a connection the server closed
    before sending anything on it.
    """
    check_redis_url(settings.require_redis(), cluster=settings.redis_cluster)
    options.setdefault("socket_timeout", settings.redis_timeout_s)
    options.setdefault("socket_connect_timeout", min(2.0, settings.redis_timeout_s))
    # Only a dead connection is worth a retry: a server that did not answer in time is hung
    # or cut off, and asking it twice more tripled the wait for the 503.
    backoff = ExponentialWithJitterBackoff(base=0.05, cap=0.5)
    options.setdefault("retry", Retry(backoff, 2, supported_errors=(RedisConnectionError,)))
    options.setdefault("health_check_interval", 15)
    if settings.redis_cluster:
        return cluster_client(settings, max_connections=max_connections, **options)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.require_redis(), max_connections=max_connections, timeout=wait_s, **options
    )
    pool.connection_class = REPLACES.get(pool.connection_class, pool.connection_class)
    return aioredis.Redis.from_pool(pool)


def check_redis_url(url: str, *, cluster: bool = False) -> None:
    """The options in ``url``'s query as redis-py's connection takes them, checked now: one it
    does not know (a misspelling, a TLS option on a ``redis://`` URL) or a value of the wrong
    kind would otherwise fail the first connection with a TypeError or a ValueError, a 500 in
    a service. Raises ConfigError naming REDIS_URL and the option, as for a file it names
    that cannot be read; with ``cluster``, one naming a database a cluster lacks."""
    check_url_files("REDIS_URL", url)
    try:
        options: dict[str, Any] = dict(parse_url(url))
        if cluster and options.get("db", 0) != 0:
            raise ConfigError(f"REDIS_URL: a Redis Cluster has database 0 alone, the URL "
                              f"names {options['db']}")  # fmt: skip
        for pool_option in ("max_connections", "timeout"):
            options.pop(pool_option, None)
        options.pop("connection_class", aioredis.Connection)(**options)  # not connected
    except (TypeError, ValueError) as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        said = str(exc) if unknown is None else (
            f"unknown option {unknown[1]!r} in its query (TLS options need rediss://)")  # fmt: skip
        raise ConfigError(f"REDIS_URL: {said}") from exc


def check_url_files(setting: str, url: str) -> None:
    """Each file ``url``'s query names (``_FILE_OPTIONS``) is one that can be read. The
    clients read them only when they connect, and then say "cannot connect ...: No such file
    or directory" without naming it. Raises ConfigError naming the setting, option and path."""
    query = parse_qs(urlsplit(url).query)
    for option in _FILE_OPTIONS[setting]:
        for path in query.get(option, []):
            if option == "sslrootcert" and path == "system":  # libpq: the system's authorities
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{setting}: {option}: cannot read {path}: "
                                  f"{exc.strerror or exc}") from None  # fmt: skip


def cluster_client(
    settings: Settings, *, max_connections: int = 64, **options: Any
) -> aioredis.RedisCluster:
    """A Redis Cluster client seeded by the node of ``REDIS_URL``.

    redis-py follows ``MOVED`` and ``ASK``, waits out ``TRYAGAIN`` and relearns the slots after
    a failover (``CLUSTERDOWN``, a node that stopped answering). Its ``retry`` is the cluster
    client's: a command whose node failed is sent again, after the topology was read afresh,
    at most twice. A node's pool does not wait for a free connection as the single server's
    does (redis-py's cluster pools refuse at their limit, a 503), so each may hold up to
    :data:`CLUSTER_POOL_FACTOR` times ``max_connections``.
    """
    retry = options.pop("retry")
    options.pop("health_check_interval", None)  # the cluster client checks its nodes itself
    return aioredis.RedisCluster.from_url(
        settings.require_redis(), max_connections=CLUSTER_POOL_FACTOR * max_connections,
        retry=retry, require_full_coverage=False, **options,
    )  # fmt: skip


# A COPY moves a whole sale (200,000 SKUs in, or every order out to a reader going at its own
# pace): it is given this long instead of FLASHSALE_PG_TIMEOUT.
COPY_TIMEOUT_S = 600.0


async def pg_pool(
    settings: Settings,
    *,
    min_size: int = 1,
    max_size: int = 10,
    server_settings: dict[str, str] | None = None,
    lazy: bool = False,
) -> asyncpg.Pool:
    """An asyncpg pool for ``DATABASE_URL``; raises Unavailable with where it tried.
    ``server_settings`` are session settings: not sent through a transaction pooler
    (:func:`_pooled`).

    ``lazy`` (a service): Postgres down at the start is not an error. The pool then opens its
    connections as they are asked for (each ask an outage until Postgres is back, as for a
    pool whose server went away), so the service serves what needs no Postgres meanwhile and
    its ``/readyz`` says Postgres is down."""
    dsn = settings.require_database()
    check_url_files("DATABASE_URL", dsn)
    # A statement not answered within FLASHSALE_PG_TIMEOUT is given up (and cancelled): a hung
    # server or a partition is then an outage, where a call waited for as long as it lasted.
    connect_s = _connect_timeout(settings)
    options = {"max_size": max_size, "timeout": connect_s,
               "command_timeout": settings.pg_timeout_s,
               **_pooled(settings, server_settings=server_settings)}  # fmt: skip
    try:
        connecting = asyncpg.create_pool(dsn, min_size=min_size, **options)
        return await _reach_postgres(dsn, connecting, connect_s)
    except Unavailable as exc:
        if not lazy:
            raise
        log.warning("%s; going on without it, and connecting when it is needed", exc.message)
        return await asyncpg.create_pool(dsn, min_size=0, **options)


async def pg_connect(settings: Settings) -> asyncpg.Connection:
    """One connection to ``DATABASE_URL``, its errors as :func:`pg_pool`'s."""
    dsn = settings.require_database()
    check_url_files("DATABASE_URL", dsn)
    connect_s = _connect_timeout(settings)
    connecting = asyncpg.connect(dsn, timeout=connect_s, **_pooled(settings))
    return await _reach_postgres(dsn, connecting, connect_s)


def _connect_timeout(settings: Settings) -> float:
    """How long a connection to Postgres may take: 5 s, or less with a shorter
    ``FLASHSALE_PG_TIMEOUT``."""
    return min(5.0, settings.pg_timeout_s)


def _pooled(settings: Settings, **options: Any) -> dict[str, Any]:
    """asyncpg's connection options for ``FLASHSALE_PG_POOL_MODE``. Behind a transaction
    pooler each transaction may run on another server connection, so nothing may outlive one:
    no named prepared statements (asyncpg's statement cache: they collided as "prepared
    statement __asyncpg_stmt_1__ already exists") and no session settings (PgBouncer refuses
    them as startup parameters). Each statement is then planned for its own values, which is
    what the workers' ``plan_cache_mode`` asks of a direct connection."""
    if settings.pg_pool_mode == "transaction":
        return {"statement_cache_size": 0}
    return options


async def _reach_postgres(dsn: str, connecting: Awaitable[T], connect_s: float) -> T:
    """``connecting`` awaited. Postgres down or refusing: Unavailable, saying where. A URL
    asyncpg refuses (``sslmode=verify-fulll``, a port that is not a number, another scheme):
    ConfigError naming DATABASE_URL, without its password (as the logs redact it)."""
    try:
        return await connecting
    except ValueError as exc:  # asyncpg's ClientConfigurationError is one
        said = str(exc)
        password = urlsplit(dsn).password or ""
        if len(password) >= REDACTED_LENGTH:
            said = said.replace(password, "********")
        raise ConfigError(f"DATABASE_URL: {said}") from exc
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        where = urlsplit(dsn)
        server = f"Postgres at {where.hostname}:{where.port}"
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):  # 28: the login
            raise Unavailable(f"{server} refused the login of DATABASE_URL: {exc}") from exc
        if "unsupported startup parameter" in str(exc):  # PgBouncer's: a session setting
            raise Unavailable(f"{server} refused a session setting ({exc}): "
                              f"{BEHIND_A_POOLER}") from exc  # fmt: skip
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            raise Unavailable(f"{server} has no such database (DATABASE_URL): {exc}") from exc
        why = f"no answer within {connect_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
        raise Unavailable(f"cannot reach {server}: {why}") from exc


@dataclass(frozen=True, slots=True)
class Clients:
    """A service's long-lived clients: Postgres, Redis and, when ``FLASHSALE_PSP_URL`` is set,
    the payment provider (None otherwise)."""

    pool: asyncpg.Pool
    redis: RedisClient
    provider: PaymentProvider | None


@contextlib.asynccontextmanager
async def open_clients(settings: Settings, *, pool_size: int = 4,
                       lazy: bool = False) -> AsyncIterator[Clients]:  # fmt: skip
    """:class:`Clients` for ``settings``, closed in reverse order on exit. The Redis client
    comes first: building it checks REDIS_URL and connects to nothing yet. ``lazy``: as for
    :func:`pg_pool` (a service starting while Postgres is down)."""
    async with contextlib.AsyncExitStack() as opened:
        client = redis_client(settings)
        opened.push_async_callback(client.aclose)
        pool = await pg_pool(settings, min_size=1, max_size=pool_size, lazy=lazy)
        opened.push_async_callback(pool.close)
        provider = None
        if settings.psp_url:
            provider = await opened.enter_async_context(HttpProvider(settings.psp_url))
        yield Clients(pool, client, provider)
