"""What every service serves for operators: ``/livez`` (the process answers), ``/readyz``
that really pings its dependencies through clients that live as long as the service, with
``/healthz`` as its alias, and ``/metrics`` in the Prometheus text format.

Readiness is checked at most about once a second (:class:`Readiness`): concurrent callers
share one check and later ones get its result, so a flood of probes costs the dependencies
one ping a second, not a connection each.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``flashsale gateway --workers N`` sets it), metrics are
aggregated across the processes of one service, so any worker answers for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import platform
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from aiokafka.client import AIOKafkaClient
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from redis.asyncio import RedisCluster
from redis.exceptions import NoPermissionError

from flashsale import __version__, event_loop
from flashsale.clients import RedisClient
from flashsale.errors import ConfigError, Unavailable
from flashsale.http_protocol import EVERY_ANSWER, answer_malformed_in_json, unrouted
from flashsale.kafka import client_options
from flashsale.keys import PROBE
from flashsale.migrate import require_current
from flashsale.outages import CLUSTER_READ_AS_ONE, describe
from flashsale.redis_connection import Script
from flashsale.settings import Settings

PING_TIMEOUT_S = 2.0


def build_info(registry: CollectorRegistry, service: str) -> None:
    """``flashsale_build_info{service, version, python} 1``: which build answers, for
    dashboards and for spotting a half-finished rollout; the lag of the process's event loop
    (:func:`flashsale.event_loop.lag`); and the process's CPU and memory (``process_*``)
    where one process answers for itself (not across the processes of a multiprocess
    gateway)."""
    # No ``_created`` series beside each counter and histogram: the gateway's processes (one
    # folder of metrics) have none, and Prometheus would store them for nothing.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        ProcessCollector(registry=registry)
    registry.register(event_loop.lag())
    Gauge(
        "flashsale_build_info", "The running build (always 1)", ["service", "version", "python"],
        registry=registry, multiprocess_mode="max",
    ).labels(service, __version__, platform.python_version()).set(1)  # fmt: skip


Probe = Callable[[], Awaitable[object]]


class KafkaProbe:
    """Asks the broker for its metadata over one client kept for the service's life (a client
    per probe would cost a connection and a bootstrap each time), and looks in it for the
    engine's topics (:func:`require_topics`). Without ``KAFKA_BOOTSTRAP`` every ping fails
    with the ConfigError saying what to set, so it shows as down."""

    def __init__(self, settings: Settings, timeout_s: float = PING_TIMEOUT_S) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._client: AIOKafkaClient | None = None

    async def ping(self) -> None:
        if self._client is None:
            client = AIOKafkaClient(**client_options(self.settings),
                                    request_timeout_ms=int(self.timeout_s * 1000))  # fmt: skip
            try:
                await client.bootstrap()  # sends a Metadata request
            except BaseException:
                await client.close()
                raise
            self._client = client
            cluster = client.cluster
        else:
            cluster = await self._client.fetch_all_metadata()
        require_topics(cluster.topics(), self.settings)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def require_topics(present: Collection[str], settings: Settings) -> None:
    """Unavailable unless the broker has every topic of the engine: one that answers without
    them (its storage lost with a restart, or none made where the broker does not make them on
    first use) refuses every event. The engine's producers make them when they start."""
    missing = [topic for topic in settings.topics.all() if topic not in present]
    if missing:
        raise Unavailable(f"the broker has no topic {missing[0]}: `flashsale kafka init` makes "
                          "the engine's topics")  # fmt: skip


def dependency_probes(
    redis: RedisClient, pool: asyncpg.Pool, kafka: KafkaProbe | None = None
) -> dict[str, Probe]:
    """The probes of a service's long-lived clients, by dependency name: each server ready
    when it answers and takes writes (:func:`ping_redis`, :func:`ping_postgres`), Postgres
    also with every migration this version needs, the broker with the engine's topics."""
    probes: dict[str, Probe] = {"redis": lambda: ping_redis(redis),
                                "postgres": lambda: ping_postgres(pool)}  # fmt: skip
    if kafka is not None:
        probes["kafka"] = kafka.ping
    return probes


async def ping_redis(client: RedisClient) -> None:
    """A PING, then whether the server takes writes: one full at its ``maxmemory`` (said
    from INFO, :func:`_raise_if_full`) and a primary a failover made a replica answer a PING
    and refuse every write. The write probe (``fs:probe``, kept a second, written by a
    script as the engine's writes are, so that an ACL user who may not run them is not
    ready) goes as the engine's own writes go: a connection still leading to a demoted
    primary is dropped at its ``READONLY`` and the write sent again on a new one
    (:mod:`flashsale.redis_connection`), so the probe follows a failover behind one
    endpoint as they do. On a cluster, each primary's memory, and the write on the node of
    its slot; through a single server's client, also that the server is no node of a
    cluster, whose every node answers a PING while most keys live on the others."""
    await client.ping()
    if isinstance(client, RedisCluster):
        with contextlib.suppress(NoPermissionError):  # an ACL user without INFO: the PING
            for name, info in sorted((await _memory_by_node(client)).items()):
                _raise_if_full(info, f"the node {name}")
    else:
        try:
            info = await client.info()
        except NoPermissionError:  # an ACL user without INFO: the PING has answered
            info = {}
        if info.get("cluster_enabled"):
            raise ConfigError(CLUSTER_READ_AS_ONE)
        _raise_if_full(info, "the server")
    await Script(client, PROBE_WRITE)(keys=[PROBE])


# The probe's write, as the engine's scripts write: EVALSHA (EVAL where the server lost it),
# TIME and a write inside, so that a user not allowed what they run is not ready either.
PROBE_WRITE = "redis.call('TIME') return redis.call('SET', KEYS[1], '1', 'PX', 1000)"


def _raise_if_full(info: Mapping[str, Any], server: str) -> None:
    """Unavailable when ``info`` (INFO's memory section) says ``server`` is full: at its
    ``maxmemory`` under ``noeviction``, or under a ``volatile-*`` policy (a managed service's
    default), which evicts only keys with an expiry: the stock, holds and queues have none,
    so once the few others are gone the server answers every write OOM."""
    used, most = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    policy = str(info.get("maxmemory_policy", ""))
    if most and used >= most and (policy == "noeviction" or policy.startswith("volatile-")):
        raise Unavailable(f"Redis: {server} is full: used_memory {used:,} of maxmemory "
                          f"{most:,} bytes ({policy}): it refuses every write")  # fmt: skip


_EVICTS = {
    "allkeys": "any key when full ({policy}): a stock hash it evicts is a lost SKU until the "
               "reconciler rebuilds it",
    "volatile": "keys with an expiry when full ({policy}): the pumps' leases, the rate limits "
                "and the join challenges' nonces, then it refuses every write",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class MemoryRead:
    """Each server's (on a cluster, each primary's) used memory as a share of its
    ``maxmemory``, and its ``maxmemory-policy``, by address. A server without a
    ``maxmemory`` has no share (it grows until its machine has no memory left) and never
    evicts."""

    shares: dict[str, float]
    policies: dict[str, str]

    def warnings(self) -> list[str]:
        """A line for each server that evicts when full: the engine asks for ``noeviction``."""
        return [f"Redis {node} evicts "
                + _EVICTS[policy.split("-")[0]].format(policy=f"maxmemory-policy {policy}")
                + "; set noeviction (docs/PRODUCTION.md, \"Redis: persistence and the "
                  "durability window\")"
                for node, policy in sorted(self.policies.items())
                if node in self.shares and policy.split("-")[0] in _EVICTS]  # fmt: skip


async def memory_read(client: RedisClient) -> MemoryRead:
    """The memory of each server, or of each primary of a cluster (:class:`MemoryRead`)."""
    found = await _memory_by_node(client)
    return MemoryRead(
        {node: int(info["used_memory"]) / int(info["maxmemory"])
         for node, info in found.items() if int(info.get("maxmemory", 0))},
        {node: str(info.get("maxmemory_policy", "")) for node, info in found.items()},
    )  # fmt: skip


async def memory_used(client: RedisClient) -> dict[str, float]:
    """Each server's used memory as a share of its ``maxmemory`` (:class:`MemoryRead`)."""
    return (await memory_read(client)).shares


async def _memory_by_node(client: RedisClient) -> dict[str, dict[str, Any]]:
    """INFO's memory section of the server, or of each primary of a cluster, by address."""
    if isinstance(client, RedisCluster):
        return await info_of_primaries(client, "memory")
    where = client.connection_pool.connection_kwargs
    node = where.get("path") or f"{where.get('host')}:{where.get('port')}"
    return {node: await client.info("memory")}


async def info_of_primaries(client: RedisCluster, section: str) -> dict[str, dict[str, Any]]:
    """A section of INFO from each primary of the cluster, by address. The client learns the
    primaries as it starts; redis-py answers a command sent to one node (a cluster of one
    primary) as it came, not by node."""
    await client.initialize()  # at once if it has started
    primaries = client.get_primaries()
    found = await client.info(section, target_nodes=primaries)
    if len(primaries) == 1:
        return {primaries[0].name: found}
    return cast(dict[str, dict[str, Any]], found)


async def ping_postgres(db: asyncpg.Connection | asyncpg.Pool) -> None:
    """Every migration of this version applied (:func:`~flashsale.migrate.require_current`),
    and the server takes writes: a hot standby (``DATABASE_URL`` at a read replica, a failover
    that left the endpoint on the old primary) or a database with writes turned off answers
    every query and refuses every write, so no order would be written."""
    await require_current(db)
    if await db.fetchval("SHOW transaction_read_only") == "on":
        raise Unavailable("Postgres is read-only (a hot standby, or default_transaction_read_"
                          "only on): it refuses every write")  # fmt: skip


async def check(probe: Probe) -> str | None:
    """None when the probe answered in time, else why not."""
    try:
        await asyncio.wait_for(probe(), PING_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {PING_TIMEOUT_S:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure means down; say which
        return describe(exc)[:200]
    return None


async def health(probes: Mapping[str, Probe]) -> tuple[int, dict[str, object]]:
    """(HTTP status, body): 200 when every dependency answered, else 503 naming what is down."""
    results = dict(zip(probes, await asyncio.gather(*(check(p) for p in probes.values())),
                       strict=True))  # fmt: skip
    down = sorted(name for name, why in results.items() if why is not None)
    body: dict[str, object] = {
        "status": "ok" if not down else "down",
        "checks": {name: "ok" if why is None else f"down: {why}" for name, why in results.items()},
    }
    if down:
        body["error"] = {"code": "dependency_down", "message": "down: " + ", ".join(down)}
    return (503 if down else 200), body


class Readiness:
    """The dependencies' health, checked at most every ``ttl_s`` and shared by callers. With a
    ``registry``, each check also sets ``flashsale_dependency_up{dependency}`` (the scrape of
    ``/metrics`` asks for a check, so alerts see what ``/readyz`` would say)."""

    def __init__(self, probes: Mapping[str, Probe], ttl_s: float = 1.0,
                 registry: CollectorRegistry | None = None) -> None:  # fmt: skip
        self.probes = probes
        self.ttl_s = ttl_s
        self.up = None if registry is None else Gauge(
            "flashsale_dependency_up", "1 when the dependency answered the last readiness check",
            ["dependency"], registry=registry, multiprocess_mode="min",
        )  # fmt: skip
        self._last: tuple[float, tuple[int, dict[str, object]]] | None = None
        self._running: asyncio.Future[tuple[int, dict[str, object]]] | None = None

    async def check(self) -> tuple[int, dict[str, object]]:
        """(HTTP status, body), as :func:`health` gives them."""
        if self._last is not None and time.monotonic() - self._last[0] < self.ttl_s:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> tuple[int, dict[str, object]]:
        try:
            result = await health(self.probes)
            self._last = (time.monotonic(), result)
            if self.up is not None:
                checks = result[1]["checks"]
                assert isinstance(checks, dict)
                for name, verdict in checks.items():
                    self.up.labels(name).set(1 if verdict == "ok" else 0)
            return result
        finally:
            self._running = None


LIVE = {"status": "ok"}
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


def metrics_text(registry: CollectorRegistry) -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
    return generate_latest(registry)


async def name_the_server(_request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers every answer carries."""
    response.headers.update(EVERY_ANSWER)


PROBES = "the probes /livez, /readyz (also /healthz) and /metrics"
SERVES = web.AppKey("serves", str)  # what the address serves, said of an address it does not


@web.middleware
async def _unrouted_in_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A path the ops port does not serve, or a method it does not take, answered in JSON
    naming what it serves: it was aiohttp's "404: Not Found", as text."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        code = "not_found" if exc.status == 404 else "method_not_allowed"
        error = {"code": code, "message": unrouted(request, exc, request.app[SERVES])}
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return web.Response(body=orjson.dumps({"error": error}), status=exc.status,
                            content_type="application/json", headers=allow)  # fmt: skip


def ops_app(readiness: Readiness, registry: CollectorRegistry,
            serves: str = f"this address serves {PROBES}") -> web.Application:  # fmt: skip
    """A small app with only the probes and ``/metrics``, for services without an API
    (``serves``: what it serves, if routes are added)."""

    async def livez(_request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(LIVE), content_type="application/json")

    async def readyz(_request: web.Request) -> web.Response:
        status, body = await readiness.check()
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    async def metrics(_request: web.Request) -> web.Response:
        await readiness.check()  # flashsale_dependency_up, at most one check a second
        return web.Response(
            body=metrics_text(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(middlewares=[_unrouted_in_json])
    app[SERVES] = serves
    app.on_response_prepare.append(name_the_server)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


_CANNOT_LISTEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


async def listen(runner: web.AppRunner, host: str, port: int, **options: Any) -> None:
    """Start ``runner`` on ``host:port`` (``options``: aiohttp's ``TCPSite``'s). A port another
    process holds, an address not of this machine or a port this user may not take is a
    ConfigError naming the address: nothing the service depends on is down."""
    try:
        await web.TCPSite(runner, host, port, **options).start()
    except socket.gaierror:  # a name or number that is no address (a typo of --host)
        raise ConfigError(f"cannot listen on {host}:{port}: no such address") from None
    except OSError as exc:
        if exc.errno not in _CANNOT_LISTEN:
            raise
        reason = os.strerror(exc.errno).lower()
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from exc


async def serve_ops(
    host: str, port: int, probes: Mapping[str, Probe], registry: CollectorRegistry
) -> web.AppRunner:
    """Start :func:`ops_app` on ``host:port``; the caller cleans the runner up."""
    runner = web.AppRunner(ops_app(Readiness(probes, registry=registry), registry),
                           access_log=None)  # fmt: skip
    await runner.setup()
    assert runner.server is not None
    answer_malformed_in_json(runner.server)
    await listen(runner, host, port)
    return runner
