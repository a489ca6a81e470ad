"""The faults: each one breaks one thing once and returns when it is over, as a
:class:`Window` (when it began, when it ended: a server is back and answering, a pause is
resumed, a storm has calmed). :func:`repeated` turns a fault into a schedule.

Servers are stopped and started through the embedded stack (same port, same data), never
restarted in place: the broker keeps its data in memory only, so it is paused, not restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from flashsale.cli.devstack.processes import free_port, pid_alive, stop_pid
from flashsale.clients import redis_client
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.records import text
from loadtest.chaos.rig import SKU, FaultFailed, NotHere, Rig
from loadtest.processes import tree

Fault = Callable[[Rig, str], Awaitable["Window"]]


@dataclass(frozen=True, slots=True)
class Window:
    began: float  # time.monotonic()
    ended: float


@dataclass(frozen=True, slots=True)
class Timing:
    first_at: float  # time.monotonic() of the first injection
    period_s: float
    times: int

    def at(self, index: int) -> float:
        return self.first_at + index * self.period_s

    @property
    def last_ends(self) -> float:
        return self.at(self.times)


@dataclass
class Injected:
    windows: list[Window] = field(default_factory=list)
    count: int = 0  # faults injected
    notes: list[str] = field(default_factory=list)


Injector = Callable[[Rig, str, Timing], Coroutine[Any, Any, Injected]]


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


def repeated(fault: Fault) -> Injector:
    """Inject ``fault`` at each time of the schedule (or as soon as the one before is over)."""

    async def inject(rig: Rig, sale: str, timing: Timing) -> Injected:
        done = Injected()
        for index in range(timing.times):
            await _sleep_until(timing.at(index))
            done.windows.append(await fault(rig, sale))
            done.count += 1
        return done

    return inject


async def _start_servers(rig: Rig) -> None:
    try:
        await asyncio.to_thread(rig.servers.start_stopped)
    except Exception as exc:
        raise FaultFailed(f"the stack did not come back: {exc}") from exc


async def _stop(pid: int, sig: signal.Signals) -> None:
    await asyncio.to_thread(stop_pid, pid, sig, 60.0)


# -- Postgres ------------------------------------------------------------------------------


async def postgres_restart(rig: Rig, _sale: str, *, sig: signal.Signals, down_s: float = 0.0
                           ) -> Window:  # fmt: skip
    """Stop Postgres with ``sig`` (SIGINT: fast shutdown; SIGQUIT: immediate, a crash that
    recovery replays), keep it down ``down_s``, start it again."""
    pid = rig.server_pid("postgres")
    began = time.monotonic()
    await _stop(pid, sig)
    await asyncio.sleep(down_s)
    await _start_servers(rig)
    return Window(began, time.monotonic())


_TERMINATE = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""


async def postgres_terminate(rig: Rig, _sale: str) -> Window:
    """``pg_terminate_backend`` of every other connection to the engine's database."""
    conn = await asyncpg.connect(rig.settings.require_database(), timeout=10)
    try:
        began = time.monotonic()
        killed = await conn.fetchval(_TERMINATE)
    finally:
        await conn.close()
    if not killed:
        raise FaultFailed("pg_terminate_backend found no engine connection to end")
    return Window(began, time.monotonic())


async def postgres_exhaust(rig: Rig, _sale: str, *, hold_s: float) -> Window:
    """Another client takes every free connection slot (``max_connections``) for ``hold_s``."""
    dsn = rig.settings.require_database()
    taken: list[asyncpg.Connection] = []
    try:
        while len(taken) < 2000:
            tries = await asyncio.gather(*(asyncpg.connect(dsn, timeout=10) for _ in range(20)),
                                         return_exceptions=True)  # fmt: skip
            taken += [c for c in tries if isinstance(c, asyncpg.Connection)]
            refused = [e for e in tries if isinstance(e, BaseException)]
            if any(isinstance(e, asyncpg.TooManyConnectionsError) for e in refused):
                break
            if refused:
                raise FaultFailed(f"taking Postgres connections failed: {refused[0]!r}")
        began = time.monotonic()
        await asyncio.sleep(hold_s)
        return Window(began, time.monotonic())
    finally:
        await asyncio.gather(*(c.close(timeout=5) for c in taken), return_exceptions=True)


# -- Redis ---------------------------------------------------------------------------------


async def redis_kill(rig: Rig, _sale: str, *, keep_data: bool) -> Window:
    """SIGKILL Redis; start it again from its AOF, or (``keep_data`` False) with nothing, as
    a server run without persistence comes back."""
    pid = rig.server_pid("redis")
    began = time.monotonic()
    await _stop(pid, signal.SIGKILL)
    if not keep_data:
        folder = rig.servers.data_dir("redis")
        for name in ("appendonly.aof", "dump.rdb"):
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / "appendonlydir", ignore_errors=True)
    await _start_servers(rig)
    return Window(began, time.monotonic())


async def _redis_command(rig: Rig, *args: str) -> object:
    client = aioredis.Redis.from_url(rig.settings.require_redis(), socket_timeout=10)
    try:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def redis_flushall(rig: Rig, _sale: str) -> Window:
    began = time.monotonic()
    await _redis_command(rig, "FLUSHALL")
    return Window(began, time.monotonic())


async def redis_client_kill(rig: Rig, _sale: str) -> Window:
    """``CLIENT KILL`` of every other connection (the engine's)."""
    began = time.monotonic()
    killed = await _redis_command(rig, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    if not killed:
        raise FaultFailed("CLIENT KILL found no engine connection to end")
    return Window(began, time.monotonic())


async def _failover(rig: Rig, sale: str) -> tuple[Window, float]:
    """SIGKILL the Redis Cluster primary that serves the sale's SKU; the cluster's own failure
    detection promotes its replica. Then the killed node starts again from its AOF and
    rejoins as a replica of the new primary. The window ends when the cluster is whole; the
    seconds until a replica served the slot come with it."""
    if not rig.settings.redis_cluster:
        raise NotHere("needs a Redis Cluster with replicas: dev up --redis-cluster 3 --replicas 1")
    client = redis_client(rig.settings)
    assert isinstance(client, aioredis.RedisCluster)
    try:
        await client.initialize()
        slot = client.keyslot(SkuKeys(sale, SKU).stock)
        primary = client.nodes_manager.get_node_from_slot(slot)
        if not [n for n in client.get_replicas() if _replica_of(n.name, primary.name, client)]:
            raise NotHere(f"the primary {primary.name} has no replica to take over")
        pid = rig.servers.redis_pid_on(int(primary.port))
        if pid is None:
            raise NotHere(f"{primary.name} is not an embedded node of this stack")
        survivor = next(n for n in client.get_primaries() if n.name != primary.name)
    finally:
        await client.aclose()
    began = time.monotonic()
    await _stop(pid, signal.SIGKILL)
    watcher = aioredis.Redis(host=survivor.host, port=int(survivor.port), socket_timeout=5,
                             password=urlsplit(rig.settings.require_redis()).password)  # fmt: skip
    try:
        while await _slot_owner(watcher, slot) in (None, primary.name):
            if time.monotonic() - began > 60:
                raise FaultFailed(f"no replica took over slot {slot} within 60 s")
            await asyncio.sleep(0.1)
        promoted_s = time.monotonic() - began
    finally:
        await watcher.aclose()
    await _start_servers(rig)  # waits for cluster_state:ok on every node
    return Window(began, time.monotonic()), promoted_s


async def redis_primary_failover(rig: Rig, sale: str, timing: Timing) -> Injected:
    """:func:`_failover` on the schedule; notes how long each promotion took."""
    done = Injected()
    took = []
    for index in range(timing.times):
        await _sleep_until(timing.at(index))
        window, promoted_s = await _failover(rig, sale)
        done.windows.append(window)
        done.count += 1
        took.append(promoted_s)
    if took:
        done.notes.append("a replica served the killed primary's slot after "
                          + ", ".join(f"{t:.1f}" for t in took) + " s")  # fmt: skip
    return done


def _replica_of(replica: str, primary: str, client: aioredis.RedisCluster) -> bool:
    """Whether the node ``replica`` serves the slots of ``primary`` (redis-py lists a slot's
    primary first, then its replicas)."""
    for nodes in client.nodes_manager.slots_cache.values():
        names = [n.name for n in nodes]
        if names and names[0] == primary and replica in names[1:]:
            return True
    return False


async def _slot_owner(node: aioredis.Redis, slot: int) -> str | None:
    """The ``host:port`` of the primary serving ``slot``, as ``node`` sees the cluster; None
    while no healthy primary does."""
    nodes: dict[str, dict[str, Any]] = await node.cluster("NODES")
    for address, info in nodes.items():
        flags = str(info.get("flags", ""))
        if "master" not in flags or "fail" in flags:
            continue
        for span in info.get("slots", []):
            if int(span[0]) <= slot <= int(span[-1]):
                return address.split("@")[0]
    return None


# -- pauses: a stalled server or process ---------------------------------------------------


async def pause_pid(pid: int, seconds: float, *, with_children: bool = False) -> Window:
    """SIGSTOP ``pid`` (and its descendants) for ``seconds``, then SIGCONT (always)."""
    began = time.monotonic()
    pids = tree(pid) if with_children else [pid]
    for each in pids:
        with contextlib.suppress(ProcessLookupError):  # a backend that just ended
            os.kill(each, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGCONT)
    return Window(began, time.monotonic())


async def pause_server(rig: Rig, _sale: str, *, name: str, seconds: float) -> Window:
    """A stalled server. Postgres is a process per connection: the postmaster and every
    backend are paused, so that open connections hang too, not only new ones."""
    return await pause_pid(rig.server_pid(name), seconds, with_children=name == "postgres")


async def pause_pump_leader(rig: Rig, sale: str, *, seconds: float) -> Window:
    """SIGSTOP the allocator process that holds the sale's pump lease, longer than the lease
    lasts, as a long GC pause would: another allocator takes over, and the fencing token
    must keep the paused one from publishing when it wakes."""
    owner = await _redis_command(rig, "GET", SaleKeys(sale).lease)
    if owner is None:
        raise FaultFailed(f"nobody holds the pump lease of {sale}")
    pid = int(text(owner).split(":")[1])  # the owner is host:pid:clock
    if not pid_alive(pid):
        raise FaultFailed(f"the pump leader {text(owner)} is not a process here")
    return await pause_pid(pid, seconds)


# -- the engine's processes ----------------------------------------------------------------


async def kill_role(rig: Rig, _sale: str, *, role: str, patience: float = 30.0) -> Window:
    """SIGKILL the oldest process of ``role`` under ``flashsale up`` (which restarts it),
    after waiting for one to be running if the last kill's restart is still pending."""
    deadline = time.monotonic() + patience
    while not (pids := rig.pids(role)):
        if time.monotonic() > deadline:
            raise FaultFailed(f"no {role} process came back within {patience:g}s")
        await asyncio.sleep(0.1)
    began = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pids[0], signal.SIGKILL)
    return Window(began, began)


# -- the payment provider ------------------------------------------------------------------


async def provider_storm(rig: Rig, _sale: str, *, knobs: dict[str, float], seconds: float
                         ) -> Window:  # fmt: skip
    """Turn the payment simulator's ``knobs`` for ``seconds``, then back to what they were."""
    url = f"{rig.url('psp')}/v1/knobs"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url) as before:
            calm = {k: v for k, v in (await before.json()).items() if k in knobs}
        async with session.put(url, json=knobs) as r:
            if r.status != 200:
                raise FaultFailed(f"the payment simulator refused {knobs}: {await r.text()}")
        began = time.monotonic()
        try:
            await asyncio.sleep(seconds)
        finally:
            async with session.put(url, json=calm) as r:
                if r.status != 200:
                    raise FaultFailed(f"the payment simulator kept {knobs}: {await r.text()}")
    return Window(began, time.monotonic())


# -- the network, through the fault proxies ------------------------------------------------


async def network(rig: Rig, _sale: str, *, command: str, seconds: float = 0.0) -> Window:
    """Send ``command`` to every proxy, and after ``seconds`` (if any) let bytes flow again."""
    if not rig.proxies:
        raise FaultFailed("the engine does not reach its servers through fault proxies")
    began = time.monotonic()
    await asyncio.gather(*(p.command(command) for p in rig.proxies.values()))
    if seconds:
        try:
            await asyncio.sleep(seconds)
        finally:
            await asyncio.gather(*(p.command("latency 0") for p in rig.proxies.values()))
    return Window(began, time.monotonic())


# -- races ---------------------------------------------------------------------------------


async def racing_reconciler(rig: Rig, sale: str, timing: Timing) -> Injected:
    """A second reconciler making passes over the sale back to back (every 50 ms) for the
    whole schedule, while buyers reserve and the workers confirm. Its passes are counted."""
    port = free_port()
    process = rig.spawn(["reconcile", "--interval", "0.05", "--sale", sale,
                         "--ops-port", str(port)])  # fmt: skip
    done = Injected()
    try:
        await _sleep_until(timing.last_ends)
        passes = await _metric(f"http://127.0.0.1:{port}/metrics", "flashsale_reconcile_passes")
        done.count = int(passes)
        done.notes.append(f"{done.count} reconcile passes raced the buyers and the workers")
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait)
        rig.extras.remove(process)
    done.windows.append(Window(timing.first_at, timing.first_at))
    return done


async def _metric(url: str, name: str) -> float:
    """The sum of a Prometheus counter's ``_total`` samples at ``url``."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        body = await response.text()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(f"{name}_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def with_second_allocator(inject: Injector) -> Injector:
    """Run ``inject`` with a second allocator service beside the engine's, so a paused pump
    leader has someone to take over from it."""

    async def run(rig: Rig, sale: str, timing: Timing) -> Injected:
        process = rig.spawn(["allocator"])
        try:
            return await inject(rig, sale, timing)
        finally:
            process.terminate()
            await asyncio.to_thread(process.wait)
            rig.extras.remove(process)

    return run
