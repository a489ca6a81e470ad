"""The engine under test and the servers under it, as the faults see them.

The engine is ``flashsale up`` (two gateway processes, the reservations listener, the
allocator, the order workers, the payment simulator, the reconciler) on free loopback ports,
started for the run. In the ``proxied`` wiring its Redis and Postgres connections go through
a fault proxy each (:class:`~loadtest.fault_proxy.ProxyProcess`); the broker is reached
directly, because it advertises its own address to its clients, which would go around a
proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import redis.asyncio as aioredis
import redis.exceptions

from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.parent import followed
from flashsale.settings import Settings
from loadtest.fault_proxy import ProxyProcess, through
from loadtest.processes import engine, stop_all, tree

Progress = Callable[[str], None]

# Each role of `flashsale up`: its command and its port (the gateway's + offset).
SKU = "CHAOS-1"  # the one SKU of every scenario's sale

ROLES = {
    "gateway": ("gateway", 0),
    "allocator": ("allocator", 1),
    "workers": ("workers", 2),
    "psp": ("psp", 3),
    "reconciler": ("reconcile", 4),
    "reservations": ("gateway", 5),  # the reservations listener: gateway --reservations-only
}
LISTENER_FLAG = b"--reservations-only"


class Servers(Protocol):
    """The embedded stack, as far as the faults need it."""

    def running_pid(self, name: str) -> int | None:
        """The pid of the embedded server while it runs; None if external or stopped."""

    def start_stopped(self) -> None:
        """Start every embedded server that is not running, and wait until each answers."""

    def aof_bytes(self, name: str) -> int:
        """The size of the embedded Redis ``name``'s AOF."""

    def data_dir(self, name: str) -> Path:
        """Where the embedded server keeps its data."""

    def redis_pid_on(self, port: int) -> int | None:
        """The pid of the embedded Redis (or cluster node) on ``port`` while it runs."""


class FaultFailed(RuntimeError):
    """A fault could not be injected (a server would not stop or start again)."""


class NotHere(RuntimeError):
    """The fault needs something this stack does not have (an external server)."""


@dataclass
class Rig:
    settings: Settings  # the servers themselves: the suite's own connections
    servers: Servers
    port: int  # the gateway's; the other roles follow (ROLES)
    engine: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # the engine's own settings
    proxies: dict[str, ProxyProcess] = field(default_factory=dict)
    extras: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.url("gateway")

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.port + ROLES[role][1]}"

    def pids(self, role: str) -> list[int]:
        """The running processes of one role of the engine, oldest first."""
        command = ROLES[role][0]
        found = []
        for pid in tree(self.engine.pid)[1:]:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:4] == [b"-m", b"flashsale", command.encode()] and (
                command != "gateway" or (LISTENER_FLAG in argv) == (role == "reservations")
            ):
                found.append(pid)
        return sorted(found)

    def server_pid(self, name: str) -> int:
        pid = self.servers.running_pid(name)
        if pid is None:
            raise NotHere(f"{name} is not an embedded server of this stack (or is not running)")
        return pid

    def spawn(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """An extra ``flashsale`` process for one scenario, logging beside the engine."""
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "flashsale", *args], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "FLASHSALE_PSP_URL": self.url("psp"),
                     **(env or {}), **followed()},
            )  # fmt: skip
        self.extras.append(process)
        return process

    def stop_extras(self) -> None:
        stop_all(self.extras, grace_s=15)
        self.extras.clear()

    async def ready(self, patience: float = 90) -> None:
        """Return once every role answers ``/readyz`` 200 (its dependencies checked)."""
        deadline = time.monotonic() + patience
        async with aiohttp.ClientSession() as session:
            for role in ROLES:
                while True:
                    if self.engine.poll() is not None:
                        raise FaultFailed(f"the engine stopped (exit {self.engine.returncode}); "
                                          f"see {self.log}")  # fmt: skip
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(f"{self.url(role)}/readyz") as response:
                            if response.status == 200:
                                break
                    if time.monotonic() > deadline:
                        raise FaultFailed(f"{role} not ready within {patience:g}s; see {self.log}")
                    await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def rigged(settings: Settings, servers: Servers, *, proxied: bool,
                 progress: Progress) -> AsyncIterator[Rig]:  # fmt: skip
    """``flashsale up`` for a run of scenarios, its Redis and Postgres behind fault proxies when
    ``proxied``; stopped (and the proxies with it) on exit."""
    proxies: dict[str, ProxyProcess] = {}
    env: dict[str, str] = {}
    try:
        if proxied:
            for name, var, url in (
                ("redis", "REDIS_URL", settings.require_redis()),
                ("postgres", "DATABASE_URL", settings.require_database()),
            ):
                target = urlsplit(url)
                proxies[name] = await ProxyProcess(target.hostname or "127.0.0.1",
                                                   target.port or 0).start()  # fmt: skip
                env[var] = through(url, proxies[name].port)
        port = free_ports(UP_PORTS)
        log = settings.home / f"chaos-engine{'-proxied' if proxied else ''}.log"
        wiring = "through fault proxies" if proxied else "directly"
        progress(f"== the engine: flashsale up --port {port}, reaching Redis and Postgres "
                 f"{wiring} (log: {log})")  # fmt: skip
        with engine(settings, port, log, env, append=True) as up:
            rig = Rig(settings, servers, port, up, log, env, proxies)
            try:
                await rig.ready()
                yield rig
            finally:
                rig.stop_extras()
    finally:
        for proxy in proxies.values():
            await proxy.stop()


async def compact_aof(settings: Settings, servers: Servers, progress: Progress,
                      *, patience_s: float = 300.0) -> None:  # fmt: skip
    """Rewrite the embedded Redis's AOF (``BGREWRITEAOF``) before faults that restart it from
    there. A dev stack's AOF keeps the writes of every run since the last rewrite, and Redis
    rewrites it only once it has doubled: one that had been through a day of benchmarks held
    50 MB for 12 MB of data and took 8 s to load, longer than ``redis-kill-aof``'s 4 s between
    faults, so every kill after the first found Redis still loading and the engine got no
    service between them (96 s of outage, not twelve crashes). Nothing for an external server
    or a cluster."""
    if settings.redis_cluster or servers.running_pid("redis") is None:
        return
    before = servers.aof_bytes("redis")
    client = aioredis.Redis.from_url(settings.require_redis(), socket_timeout=10)
    try:
        began = time.monotonic()
        with contextlib.suppress(redis.exceptions.ResponseError):  # one already running
            await client.bgrewriteaof()
        while True:
            info = await client.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                break
            if time.monotonic() - began > patience_s:
                raise FaultFailed(f"the AOF rewrite did not finish in {patience_s:g}s")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()
    after = servers.aof_bytes("redis")
    progress(f"== Redis's AOF rewritten, so that a restart loads this stack's data and not "
             f"every write since the last rewrite: {before / 1e6:.1f} MB -> "
             f"{after / 1e6:.1f} MB in {time.monotonic() - began:.1f}s")  # fmt: skip
