"""Benchmark harness: a closed-loop driver, the machine's description, Redis server samples,
tables and JSON reports, and the discarding of a run's sales.

Benchmarks compare rows measured in the same run (this machine is shared and noisy, so only
ratios within one run mean anything). Every report carries the machine it ran on and the
command that reproduces it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from allocator.sale_admin import SaleAdmin
from allocator.sale_reads import in_parts
from flashsale.clients import RedisClient, pg_pool, redis_client
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.ops_endpoints import info_of_primaries
from flashsale.settings import Settings


@dataclass(slots=True)
class Row:
    """One measured configuration. ``extra`` holds per-row figures such as server µs."""

    name: str
    what: str
    per_second: float
    decisions: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": self.what,
            "per_second": round(self.per_second, 1),
            "decisions": self.decisions,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


@dataclass(slots=True)
class Target:
    name: str
    goal: str
    measured: str
    met: bool

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "goal": self.goal, "measured": self.measured, "met": self.met}


@dataclass(slots=True)
class Report:
    benchmark: str
    command: str
    rows: list[Row]
    targets: list[Target]
    machine: dict[str, Any]
    config: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "command": self.command,
            "results": [r.as_json() for r in self.rows],
            "targets": [t.as_json() for t in self.targets],
            "machine": self.machine,
            "config": self.config,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_bytes(orjson.dumps(self.as_json(), option=orjson.OPT_INDENT_2) + b"\n")


async def drive(
    op: Callable[[], Awaitable[Any]], *, concurrency: int, seconds: float
) -> tuple[int, float]:
    """Run ``op`` in a closed loop from ``concurrency`` tasks for ``seconds``.

    Returns (completed calls, elapsed seconds). Calls in flight when time is up are waited for
    and counted, so elapsed covers every counted call.
    """
    loop = asyncio.get_running_loop()
    running = True
    done = 0

    def stop() -> None:
        nonlocal running
        running = False

    async def worker() -> None:
        nonlocal done
        n = 0
        while running:
            await op()
            n += 1
        done += n

    began = time.perf_counter()
    timer = loop.call_later(seconds, stop)
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        timer.cancel()
    return done, time.perf_counter() - began


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine(**servers: str) -> dict[str, Any]:
    """What the numbers were measured on; ``servers`` adds server versions."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "load_average_at_start": load,
        "when": datetime.now(UTC).replace(microsecond=0).isoformat(),
        **servers,
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) or row[i] is None for row in rows)
               for i in range(len(headers))]  # fmt: skip

    def line(values: Sequence[str]) -> str:
        aligned = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in aligned).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def inconsistent(report: Report) -> list[str]:
    """The rows whose consistency check failed (``extra["consistent"]`` False)."""
    return [r.name for r in report.rows if r.extra.get("consistent") is False]


def cpu_seconds(info: dict[str, Any]) -> float:
    """A Redis server's CPU time so far, from its ``INFO cpu``."""
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _summed(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for name, value in count.items():
            total[name] = total.get(name, 0) + value
    return total


@dataclass(slots=True)
class ServerSample:
    """Redis counters read before and after a row."""

    calls: dict[str, int]
    usec: dict[str, int]
    cpu_seconds: float

    @classmethod
    async def take(cls, client: RedisClient) -> ServerSample:
        """The server's counters; on a Redis Cluster, summed over the primaries."""
        if isinstance(client, aioredis.RedisCluster):
            stats = await info_of_primaries(client, "commandstats")
            cpu = await info_of_primaries(client, "cpu")
            nodes = [cls._parse(stats[name], cpu[name]) for name in stats]
            return cls(_summed([n.calls for n in nodes]), _summed([n.usec for n in nodes]),
                       sum(n.cpu_seconds for n in nodes))  # fmt: skip
        return cls._parse(await client.info("commandstats"), await client.info("cpu"))

    @classmethod
    def _parse(cls, stats: dict[str, Any], cpu: dict[str, Any]) -> ServerSample:
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        usec = {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()}
        return cls(calls, usec, cpu_seconds(cpu))

    def since(self, before: ServerSample, command: str, decisions: int) -> dict[str, float]:
        """Redis time per decision: ``command``'s own time (INFO commandstats) and the whole
        server process's CPU (which adds networking, AOF writes and everything else)."""
        usec = self.usec.get(command, 0) - before.usec.get(command, 0)
        cpu = self.cpu_seconds - before.cpu_seconds
        return {
            "server_us_per_decision": round(usec / max(decisions, 1), 3),
            "server_cpu_us_per_decision": round(cpu * 1e6 / max(decisions, 1), 3),
        }


# A discarded sale's rows: what refers to it without a foreign key, then the sale (its SKUs
# and stock change keys go with it), unless an engine made orders of it; the deletion of its
# Redis state is recorded on the sale that stays, as an archive records it.
_UNORDERED = "NOT EXISTS (SELECT 1 FROM orders WHERE sale_id = $1)"
_FORGET = (
    *(f"DELETE FROM {table} WHERE sale_id = $1 AND {_UNORDERED}"  # noqa: S608 - constants
      for table in ("queue_marks", "reconcile_events", "prequeue_members")),
    f"DELETE FROM sales WHERE id = $1 AND {_UNORDERED}",  # noqa: S608 - constants
    "UPDATE sales SET redis_cleared_at = now() WHERE id = $1",
)  # fmt: skip


async def discard_sales(settings: Settings, sale_ids: list[str], skus: Sequence[str]) -> None:
    """End a benchmark's sales (of the SKUs ``skus``), delete their state in Redis (waiting
    room, stock, holds, outbox), then their rows: the engine's next pumps, sweeper, relay and
    workers have nothing of them to do, and `sale list` does not show them. Left live, the
    reserve row's tens of thousands of holds were swept, relayed and turned into orders by the
    next engine, during the first seconds of whatever it ran; left ended, a reconciler took
    their state for lost and wrote it back, and the archive tried them again and again. A sale
    an engine made orders of stays, its Redis state recorded as deleted (``redis_cleared_at``),
    which keeps the services off it, and the archive (whose audit needs that state): ``bench
    pipeline`` keeps each of its sales so, the order log being append-only."""
    pool = await pg_pool(settings, max_size=1)
    client = redis_client(settings)
    try:
        admin = SaleAdmin.build(pool, client)
        for sale_id in sale_ids:
            await admin.set_status(sale_id, "end")
            await client.unlink(*SaleKeys(sale_id).all())
            for part in in_parts(skus):  # a catalogue's keys a part at a time
                await client.unlink(*(k for sku in part for k in SkuKeys(sale_id, sku).all()))
            async with pool.acquire() as conn, conn.transaction():
                for statement in _FORGET:
                    await conn.execute(statement, sale_id)
    finally:
        await client.aclose()
        await pool.close()
