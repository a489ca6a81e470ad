"""``flashsale bench gateway``: the waiting room's two hot routes against a bare endpoint.

Three rows, each driven for the same time by the same closed-loop HTTP client, against servers
with the same number of processes (SO_REUSEPORT):

* ``bare_aiohttp``: a trivial aiohttp + uvloop endpoint returning a small JSON body. The
  ceiling: what this machine does for an HTTP request with nothing behind it.
* ``queue_status``: ``GET /v1/sales/{sale}/queue/status`` with a real ticket (a signature
  check and the per-process counters; no Redis round trip).
* ``queue_join``: ``POST /v1/sales/{sale}/queue``, one new buyer per request (a buyer token
  check and one Lua call).

Targets: status >= 70 % and join >= 40 % of the bare endpoint's requests per second. The
client runs on the same 2 cores as the servers, so only the ratios mean anything.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from allocator.pump import quantile
from flashsale.settings import Settings
from flashsale.tokens import Signer
from loadtest.bench import Report, Row, Target, drive, machine, table

STATUS_TARGET = 0.70
JOIN_TARGET = 0.40
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    seconds: float = 5.0
    concurrency: int = 64
    workers: int = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the bare endpoint ----------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """One process of the bare endpoint (run with ``python -m loadtest.bench_gateway PORT``)."""
    import uvloop  # noqa: PLC0415

    body = orjson.dumps({"state": "waiting", "position": 1, "ahead": 0})

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=4096).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    uvloop.run(main())


# -- the run --------------------------------------------------------------------------------


class Servers:
    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.processes.append(
            subprocess.Popen(argv, env={**os.environ, **(env or {})}, stderr=subprocess.DEVNULL)
        )

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


async def _ready(session: aiohttp.ClientSession, url: str, patience: float = 20) -> None:
    deadline = time.monotonic() + patience
    while True:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up within {patience:g}s")
        await asyncio.sleep(0.1)


async def _row(
    name: str, what: str, request: Callable[[], Any], options: Options, progress: Progress
) -> Row:
    latencies: list[float] = []
    failures = 0

    async def op() -> None:
        nonlocal failures
        began = time.perf_counter()
        async with request() as response:
            await response.read()
            if response.status != 200:
                failures += 1
        latencies.append(time.perf_counter() - began)

    done, elapsed = await drive(op, concurrency=options.concurrency, seconds=options.seconds)
    row = Row(name, what, done / elapsed, done, elapsed)
    row.extra.update(
        p50_ms=round(quantile(latencies, 0.5) * 1000, 2),
        p99_ms=round(quantile(latencies, 0.99) * 1000, 2),
        non_200=failures,
    )
    progress(f"  {name:14} {row.per_second:>10,.0f} req/s  p50 {row.extra['p50_ms']} ms"
             f"  p99 {row.extra['p99_ms']} ms")  # fmt: skip
    return row


async def run(settings: Settings, options: Options, progress: Progress, command: str) -> Report:
    gateway_port, bare_port = _free_port(), _free_port()
    servers = Servers()
    env = {"FLASHSALE_RATE_PER_IP": "off", "FLASHSALE_RATE_PER_BUYER": "off",
           "FLASHSALE_LOG_LEVEL": "WARNING"}  # fmt: skip
    python = sys.executable
    servers.start([python, "-m", "flashsale", "gateway", "--port", str(gateway_port),
                   "--workers", str(options.workers)], env)  # fmt: skip
    for _ in range(options.workers):
        servers.start([python, "-m", "loadtest.bench_gateway", str(bare_port)])
    progress(f"bench gateway: {options.workers} processes per server, {options.concurrency} "
             f"concurrent requests, {options.seconds:g}s per row")  # fmt: skip
    connector = aiohttp.TCPConnector(limit=options.concurrency * 2)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            base, bare = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{bare_port}/"
            await _ready(session, f"{base}/healthz")
            await _ready(session, bare)
            sale_id, ticket = await _prepare(session, base, settings)
            buyers = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer")
            serial = itertools.count()
            run_id = os.urandom(4).hex()
            status_url = f"{base}/v1/sales/{sale_id}/queue/status"
            join_url = f"{base}/v1/sales/{sale_id}/queue"
            rows = [
                await _row("bare_aiohttp", "trivial aiohttp + uvloop JSON endpoint",
                           lambda: session.get(bare), options, progress),
                await _row("queue_status", "GET queue/status with a ticket (no Redis)",
                           lambda: session.get(status_url, headers={"X-Queue-Ticket": ticket}),
                           options, progress),
                await _row("queue_join", "POST queue, a new buyer per request (one Lua call)",
                           lambda: session.post(join_url, headers={"Authorization": "Bearer " +
                               buyers.sign({"sub": f"b{run_id}-{next(serial)}"}, 600)}),
                           options, progress),
            ]  # fmt: skip
    finally:
        servers.stop()
    ceiling = rows[0].per_second
    for row in rows:
        row.extra["ratio_to_bare"] = round(row.per_second / ceiling, 3)
    status_ratio, join_ratio = rows[1].extra["ratio_to_bare"], rows[2].extra["ratio_to_bare"]
    targets = [
        Target("queue_status vs bare", f">= {STATUS_TARGET:.0%}", f"{status_ratio:.0%}",
               status_ratio >= STATUS_TARGET),
        Target("queue_join vs bare", f">= {JOIN_TARGET:.0%}", f"{join_ratio:.0%}",
               join_ratio >= JOIN_TARGET),
    ]  # fmt: skip
    return Report(
        benchmark="gateway",
        command=command,
        rows=rows,
        targets=targets,
        machine=machine(),
        config={
            "seconds": options.seconds,
            "concurrency": options.concurrency,
            "workers": options.workers,
        },
    )


async def _prepare(
    session: aiohttp.ClientSession, base: str, settings: Settings
) -> tuple[str, str]:
    """A live, preloaded sale with room for every join, and one buyer's ticket."""
    admin = {"Authorization": f"Bearer {settings.admin_token.reveal()}"}
    now = datetime.now(UTC)
    spec = {
        "name": "bench gateway", "starts_at": (now - timedelta(seconds=1)).isoformat(),
        "ends_at": (now + timedelta(hours=1)).isoformat(), "max_queue": 100_000_000,
        "skus": [{"sku": "B1", "stock": 1_000_000, "price": 100, "currency": "EUR"}],
    }  # fmt: skip
    async with session.post(f"{base}/admin/v1/sales", json=spec, headers=admin) as response:
        sale_id = (await response.json())["id"]
    async with session.post(f"{base}/admin/v1/sales/{sale_id}/preload", headers=admin):
        pass
    token = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer").sign(
        {"sub": "bench-status"}, 600
    )
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{base}/v1/sales/{sale_id}/queue", headers=headers) as response:
        ticket = (await response.json())["ticket"]
    return str(sale_id), str(ticket)


def render(report: Report) -> str:
    rows = [
        (r.name, r.per_second, r.extra["p50_ms"], r.extra["p99_ms"], r.extra["ratio_to_bare"],
         r.extra["non_200"])
        for r in report.rows
    ]  # fmt: skip
    targets = [(t.name, t.goal, t.measured, "met" if t.met else "MISSED") for t in report.targets]
    return "\n\n".join([
        table(("row", "req/s", "p50 ms", "p99 ms", "x bare", "non-200"), rows),
        table(("target", "goal", "measured", ""), targets),
    ])  # fmt: skip


if __name__ == "__main__":
    serve_bare(int(sys.argv[1]))
