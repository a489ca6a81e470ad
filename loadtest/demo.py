"""``flashsale demo``: the whole engine on the embedded stack, with buyers going through it.

1. Applies migrations and creates the Kafka topics.
2. Starts ``flashsale up`` (gateway x2, allocator with pumps, sweeper and outbox relay, order
   workers, payment simulator) on free loopback ports, and waits until every service's
   ``/healthz`` answers.
3. Creates a sale through the admin API and preloads it.
4. Sends ``buyers`` buyers through the real journey (join, poll, reserve), one in ten paying
   with a card that is declined.
5. Shows reservations becoming orders (CONFIRMED or PAYMENT_FAILED) until every hold is
   resolved, then the sale's status.
6. Ends with the post-sale audit (every invariant of DESIGN §7, through the admin API) once
   the pipeline has drained, and stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from flashsale.devstack import free_ports
from flashsale.kafka import ensure_topics
from flashsale.migrate import migrate
from flashsale.settings import Settings
from flashsale.tokens import Signer
from loadtest.driver import Buyers, DriverStats

Progress = Callable[[str], None]
SKU = "SNK-42"


@contextlib.contextmanager
def engine(settings: Settings, port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``flashsale up`` in the background; stopped with SIGTERM (and waited for) on exit."""
    env = {**os.environ, "FLASHSALE_RATE_PER_IP": "off", "FLASHSALE_LOG_LEVEL": "WARNING"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flashsale", "up", "--port", str(port), "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _healthy(session: aiohttp.ClientSession, url: str, patience: float = 60) -> None:
    deadline = time.monotonic() + patience
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy within {patience:g}s")
        await asyncio.sleep(0.2)


async def _orders(pool: asyncpg.Pool, sale_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM orders WHERE sale_id = $1 GROUP BY state", sale_id
    )
    return {r["state"]: int(r["n"]) for r in rows}


async def run(settings: Settings, *, buyers: int, stock: int, progress: Progress) -> int:
    conn = await asyncpg.connect(settings.require_database(), timeout=5)
    try:
        progress("== applying migrations")
        await migrate(conn, progress=lambda line: progress(f"   {line}"))
    finally:
        await conn.close()
    progress("== Kafka topics")
    await ensure_topics(settings, progress=lambda line: progress(f"   {line}"))
    port = free_ports(5)
    base = f"http://127.0.0.1:{port}"
    log_path = settings.home / "demo-engine.log"
    progress(f"== starting the engine: flashsale up --port {port} (log: {log_path})")
    with engine(settings, port, log_path) as up:
        async with aiohttp.ClientSession() as session:
            names = ("gateway", "allocator", "workers", "payments", "reconciler")
            for offset, name in enumerate(names):
                await _healthy(session, f"http://127.0.0.1:{port + offset}/healthz")
                progress(f"   {name:10} healthy on :{port + offset}")
            sale_id = await _create_sale(session, base, settings, stock)
        progress(f"== sale {sale_id}: {stock} units of {SKU}; {buyers} buyers arrive at once")
        code = await _drive(settings, base, sale_id, buyers, progress)
        async with aiohttp.ClientSession() as session:
            passed = await _audit(session, base, settings, sale_id, progress)
        code = code or (0 if passed else 1)
        if up.poll() is not None:
            progress(f"the engine stopped early (exit {up.returncode}); see {log_path}")
            return 1
    progress("== engine stopped")
    return code


async def _create_sale(session: aiohttp.ClientSession, base: str, settings: Settings,
                       stock: int) -> str:  # fmt: skip
    admin = {"Authorization": f"Bearer {settings.admin_token.reveal()}"}
    now = datetime.now(UTC)
    spec = {
        "name": "Demo sneaker drop", "starts_at": now.isoformat(),
        "ends_at": (now + timedelta(hours=1)).isoformat(), "admission_rate": 500,
        "skus": [{"sku": SKU, "title": "Sneaker 42", "stock": stock, "price": 12900,
                  "currency": "EUR", "per_buyer_limit": 1, "hold_ttl_seconds": 120}],
    }  # fmt: skip
    async with session.post(f"{base}/admin/v1/sales", json=spec, headers=admin) as response:
        if response.status != 201:
            raise RuntimeError(f"creating the sale failed: {await response.text()}")
        sale_id = str((await response.json())["id"])
    async with session.post(f"{base}/admin/v1/sales/{sale_id}/preload", headers=admin) as r:
        if r.status != 200:
            raise RuntimeError(f"preloading the sale failed: {await r.text()}")
    return sale_id


async def _drive(settings: Settings, base: str, sale_id: str, count: int,
                 progress: Progress) -> int:  # fmt: skip
    signer = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer")
    run_id = os.urandom(3).hex()
    people = [(signer.sign({"sub": f"demo-{run_id}-{i}"}, 3600),
               "tok_decline" if i % 10 == 9 else "tok_visa") for i in range(count)]  # fmt: skip
    driver = Buyers(base, sale_id, SKU)
    started = time.monotonic()
    last = [0.0]

    def on_answer(stats: DriverStats) -> None:
        now = time.monotonic()
        answered = sum(stats.outcomes.values())
        if now - last[0] >= 1.0 or answered == count:
            last[0] = now
            progress(f"   {now - started:5.1f}s  answered {answered}/{count}: "
                     f"{stats.outcomes['reserved']} reserved, "
                     f"{stats.outcomes['sold_out']} sold out")  # fmt: skip

    stats = await driver.run(people, on_answer=on_answer)
    answered_in = max(stats.answered_at, default=started) - started
    errors = {k: v for k, v in stats.outcomes.items() if k.startswith("error")}
    progress(f"== every buyer answered in {answered_in:.1f}s: {stats.outcomes['reserved']} "
             f"reserved, {stats.outcomes['sold_out']} sold out, {sum(errors.values())} errors"
             + (f" {errors}" if errors else ""))  # fmt: skip
    for route, figures in stats.routes().items():
        progress(f"   {route:8} {figures['requests']:>6} requests  p50 {figures['p50_ms']} ms  "
                 f"p99 {figures['p99_ms']} ms")  # fmt: skip
    progress("== reservations becoming orders (payment saga over Kafka)")
    pool = await asyncpg.create_pool(settings.require_database(), min_size=1, max_size=2)
    try:
        states = await _follow(pool, sale_id, len(stats.reservations), progress)
        sold, total = await pool.fetchrow(
            "SELECT sold, stock_total FROM sale_skus WHERE sale_id = $1 AND sku = $2",
            sale_id, SKU,
        )  # fmt: skip
    finally:
        await pool.close()
    progress(f"== result: {states.get('CONFIRMED', 0)} orders confirmed, "
             f"{states.get('PAYMENT_FAILED', 0)} payments declined (stock given back), "
             f"{sold}/{total} units sold, oversold {max(0, sold - total)}")  # fmt: skip
    ok = not errors and sold <= total and sum(states.values()) == len(stats.reservations)
    return 0 if ok and stats.outcomes["reserved"] > 0 else 1


async def _audit(session: aiohttp.ClientSession, base: str, settings: Settings, sale_id: str,
                 progress: Progress, *, patience: float = 60) -> bool:  # fmt: skip
    """The post-sale audit through the admin API, once the pipeline has drained (the last
    offsets committed, the outboxes empty); printed one invariant per line."""
    admin = {"Authorization": f"Bearer {settings.admin_token.reveal()}"}
    deadline = time.monotonic() + patience
    while True:
        async with session.get(f"{base}/admin/v1/sales/{sale_id}/audit", headers=admin) as r:
            if r.status != 200:
                raise RuntimeError(f"the audit failed: {r.status} {await r.text()}")
            report = await r.json()
        drained = report["facts"].get("drained")
        if report["passed"] or drained or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)  # offsets still being committed: not drained yet
    progress(f"== post-sale audit: {'PASSED' if report['passed'] else 'FAILED'} "
             f"({report['facts']})")  # fmt: skip
    for invariant in report["invariants"]:
        mark = "pass" if invariant["passed"] else "FAIL"
        progress(f"   [{mark}] {invariant['name']}")
        if not invariant["passed"]:
            for key, value in invariant["details"].items():
                progress(f"          {key}: {value}")
    return bool(report["passed"])


async def _follow(pool: asyncpg.Pool, sale_id: str, reserved: int, progress: Progress,
                  patience: float = 120) -> dict[str, int]:  # fmt: skip
    terminal = ("CONFIRMED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED")
    deadline = time.monotonic() + patience
    shown: Any = None
    while True:
        states = await _orders(pool, sale_id)
        if states != shown:
            shown = states
            parts = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none yet"
            progress(f"   orders: {parts}")
        if sum(states.get(s, 0) for s in terminal) >= reserved:
            return states
        if time.monotonic() > deadline:
            progress(f"   not every order is final after {patience:g}s")
            return states
        await asyncio.sleep(0.5)
