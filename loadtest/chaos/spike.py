"""One scenario: a sale, a spike of buyers through the real journey, the scenario's faults (or
abuse) while they are served, then the drain, one reconcile pass, the audit and the verdict.

The sale admits ``RATE`` buyers a second and has stock for the whole schedule and a little
more, so reservations are being made before, during and after every fault: that is what lets
"seconds until reservations succeed again" be measured. Half as many buyers again as units
come, so the sale also sells out and the last buyers are told so.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from flashsale.outages import is_outage
from flashsale.tokens import Signer
from flashsale.wording import counted
from loadtest import admin_api
from loadtest.chaos.abuse import AbuseResult, Target
from loadtest.chaos.faults import Injected, Timing, Window
from loadtest.chaos.report import Result
from loadtest.chaos.rig import SKU, FaultFailed, NotHere, Rig
from loadtest.chaos.scenarios import Scenario
from loadtest.driver import Buyers, DriverStats

Progress = Callable[[str], None]
RATE = 10  # buyers admitted per second
LEAD_S = 3.0  # the sale opens this long after it is created
WARMUP_S = 2.0  # the first fault comes this long after the opening
TAIL_S = 3.0  # the stock lasts about this long after the last fault
ABUSE_S = (15.0, 20.0)  # how long the abuse goes on: --quick, full
PATIENCE_S = 120.0  # a buyer gives up this long after the schedule ends
DRAIN_S = 240.0  # every acknowledged reservation is a terminal order within this
CONCURRENCY = 300
TERMINAL = ["CONFIRMED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"]


def _spec(name: str, sku: str, stock: int, starts_at: datetime) -> dict[str, Any]:
    return {
        "name": f"chaos {name}", "starts_at": starts_at.isoformat(),
        "ends_at": (starts_at + timedelta(hours=1)).isoformat(), "admission_rate": RATE,
        "max_queue": 1_000_000,
        "skus": [{"sku": sku, "title": "Chaos sneaker", "stock": stock, "price": 9900,
                  "currency": "EUR", "per_buyer_limit": 1, "hold_ttl_seconds": 60}],
    }  # fmt: skip


def recovery(windows: list[Window], granted: list[float]) -> float | None:
    """The longest wait, over the faults, from a fault's end to the next reservation granted
    (faults after the last grant, when the sale had sold out, are left out)."""
    times = sorted(granted)
    worst: float | None = None
    for window in windows:
        i = bisect.bisect_left(times, window.ended)
        if i < len(times):
            gap = times[i] - window.ended
            worst = gap if worst is None else max(worst, gap)
    return None if worst is None else round(worst, 2)


def during(windows: list[Window], granted: list[float]) -> int:
    """Reservations granted while a fault was in force."""
    return sum(1 for t in granted for w in windows if w.began <= t <= w.ended)


async def run(rig: Rig, scenario: Scenario, *, quick: bool, progress: Progress) -> Result:
    result = Result(scenario.name, scenario.group, scenario.what)
    began = time.monotonic()
    times = scenario.count(quick)
    window_s = times * scenario.period_s if scenario.inject else ABUSE_S[0 if quick else 1]
    stock = int(RATE * (WARMUP_S + window_s + TAIL_S))
    people = stock + stock // 2
    token = rig.settings.admin_token.current()
    starts_at = datetime.now(UTC) + timedelta(seconds=LEAD_S)
    async with aiohttp.ClientSession() as session:
        sale = await admin_api.create_sale(session, rig.base_url, token,
                                           _spec(scenario.name, SKU, stock, starts_at))  # fmt: skip
        other = None
        if scenario.abuse is not None:
            other = await admin_api.create_sale(session, rig.base_url, token, _spec(
                f"{scenario.name} (other)", "CHAOS-OTHER", 1000, starts_at))  # fmt: skip
    progress(f"   sale {sale}: {counted(stock, 'unit')}, {counted(people, 'buyer')}, {RATE} "
             "admitted a second; "
             + (f"{counted(times, 'fault')}, one every {scenario.period_s:g}s" if scenario.inject
                else f"abuse for {window_s:g}s"))  # fmt: skip
    signer = Signer.from_setting(rig.settings.buyer_token_secret.reveal(), "buyer")
    run_id = os.urandom(3).hex()
    buyers = [(signer.sign({"sub": f"chaos-{run_id}-{i}"}, 3600),
               "tok_decline" if i % 10 == 9 else "tok_visa") for i in range(people)]  # fmt: skip
    driver = Buyers(rig.base_url, sale, SKU, patience_s=window_s + PATIENCE_S)
    await asyncio.sleep(max(0.0, (starts_at - datetime.now(UTC)).total_seconds()))
    opened = time.monotonic()
    timing = Timing(opened + WARMUP_S, scenario.period_s, times)
    if scenario.inject is not None:
        work: asyncio.Task[Any] = asyncio.create_task(scenario.inject(rig, sale, timing))
    else:
        assert scenario.abuse is not None and other is not None
        target = Target(rig, sale, other, window_s, quick)
        work = asyncio.create_task(scenario.abuse(target))
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(driver.stats, people, opened, progress, stop))
    try:
        stats = await driver.run(buyers, concurrency=CONCURRENCY)
        outcome = await _outcome(work, result)
    finally:
        stop.set()
        await watcher
        await _heal(rig, progress)
    _judge_buyers(result, stats, people)
    if isinstance(outcome, Injected):
        result.faults = outcome.count
        result.notes += outcome.notes
        result.recovery_seconds = recovery(outcome.windows, stats.reserved_at)
        if scenario.postgres_only:
            result.granted_during_outage = during(outcome.windows, stats.reserved_at)
    elif isinstance(outcome, AbuseResult):
        result.requests += outcome.requests
        result.non_503_5xx += outcome.non_503_5xx
        result.no_retry_after += outcome.no_retry_after
        result.violations += len(outcome.accepted)
        result.problems += outcome.accepted[:5]
        result.notes += outcome.notes
    if result.skipped is None:
        await _settle(rig, sale, sorted(set(stats.reservations)), result, progress)
    async with aiohttp.ClientSession() as session:
        for each in (sale, other):
            if each is not None:
                with contextlib.suppress(RuntimeError, aiohttp.ClientError):
                    await admin_api.end_sale(session, rig.base_url, token, each)
    result.seconds = time.monotonic() - began
    return result


async def _outcome(work: asyncio.Task[Any], result: Result) -> Injected | AbuseResult | None:
    try:
        outcome: Injected | AbuseResult = await work
    except NotHere as exc:
        result.skipped = str(exc)
        return None
    except FaultFailed as exc:
        result.problems.append(f"the fault could not be injected: {exc}")
        return None
    return outcome


async def _heal(rig: Rig, progress: Progress) -> None:
    """Whatever a fault left behind is put back: servers started, proxies passing bytes, and
    the engine ready again, before anything is judged."""
    await asyncio.to_thread(rig.servers.start_stopped)
    for proxy in rig.proxies.values():
        await proxy.command("latency 0")
    try:
        await rig.ready()
    except FaultFailed as exc:
        progress(f"   the engine is not ready again: {exc}")
        raise


def _judge_buyers(result: Result, stats: DriverStats, people: int) -> None:
    result.buyers = people
    result.reserved = stats.outcomes["reserved"]
    result.requests += sum(stats.statuses.values())
    result.non_503_5xx += sum(n for s, n in stats.statuses.items() if s >= 500 and s != 503)
    result.no_retry_after += stats.no_retry_after
    answered = stats.outcomes["reserved"] + stats.outcomes["sold_out"]
    result.unanswered = people - answered
    errors = {k: v for k, v in stats.outcomes.items() if k not in ("reserved", "sold_out")}
    if errors:
        result.problems.append(f"buyers without an answer: {errors}")
    if stats.connection_failures:
        result.notes.append(f"{stats.connection_failures} requests sent again after their "
                            "connection failed")  # fmt: skip


async def _settle(rig: Rig, sale: str, reservations: list[str], result: Result,
                  progress: Progress) -> None:  # fmt: skip
    """Wait until every acknowledged reservation is a terminal order, make one reconcile pass,
    and take the audit's verdict."""
    waited = time.monotonic()
    final, missing = await _terminal_orders(rig, reservations)
    result.lost_reservations = len(reservations) - final
    progress(f"   {final}/{len(reservations)} acknowledged reservations are terminal orders "
             f"({time.monotonic() - waited:.1f}s after the buyers were done)")  # fmt: skip
    if result.lost_reservations:
        result.problems.append(f"{result.lost_reservations} acknowledged reservations did not "
                               f"become terminal orders within {DRAIN_S:g}s: "
                               f"{', '.join(missing[:5])}")  # fmt: skip
    code = await asyncio.to_thread(_reconcile_once, rig, sale)
    if code == 1:
        result.problems.append("the reconcile pass failed (exit 1)")
    elif code == 3:
        result.notes.append("the reconcile pass left something unresolved (exit 3)")
    async with aiohttp.ClientSession() as session:
        audit = await admin_api.audit(session, rig.base_url, rig.settings.admin_token.current(),
                                      sale, patience=120)  # fmt: skip
    failed = [i for i in audit["invariants"] if not i["passed"]]
    result.violations += len(failed)
    for invariant in failed:
        result.problems.append(f"audit: {invariant['name']}: {invariant['details']}")


async def _terminal_orders(rig: Rig, ids: list[str]) -> tuple[int, list[str]]:
    """How many of ``ids`` are terminal orders, and which are not (as ``id: state``), waiting
    up to DRAIN_S for all of them."""
    deadline = time.monotonic() + DRAIN_S
    states: dict[str, str] = {}
    while True:
        try:
            conn = await asyncpg.connect(rig.settings.require_database(), timeout=10)
            try:
                rows = await conn.fetch("SELECT id, state FROM orders WHERE id = ANY($1::text[])",
                                        ids)  # fmt: skip
            finally:
                await conn.close()
            states = {r["id"]: r["state"] for r in rows}
        except Exception as exc:
            if not is_outage(exc):
                raise
        final = sum(1 for i in ids if states.get(i) in TERMINAL)
        if final >= len(ids) or time.monotonic() > deadline:
            missing = [f"{i}: {states.get(i, 'no order')}" for i in ids
                       if states.get(i) not in TERMINAL]  # fmt: skip
            return final, missing
        await asyncio.sleep(1.0)


def _reconcile_once(rig: Rig, sale: str) -> int:
    with rig.log.open("ab") as log:
        return subprocess.run(
            [sys.executable, "-m", "flashsale", "reconcile", "--once", "--sale", sale],
            stdout=log, stderr=subprocess.STDOUT, check=False, timeout=300,
            env={**os.environ, **rig.env, "FLASHSALE_PSP_URL": rig.url("psp")},
        ).returncode  # fmt: skip


async def _watch(stats: DriverStats, people: int, opened: float, progress: Progress,
                 stop: asyncio.Event) -> None:  # fmt: skip
    """Every 5 s: the answers so far, and how many 503s the buyers waited out."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5.0)
        answered = sum(stats.outcomes.values())
        progress(f"   {time.monotonic() - opened:5.1f}s  answered {answered:,}/{people:,} "
                 f"({stats.outcomes['reserved']} reserved, {stats.outcomes['sold_out']:,} sold "
                 f"out)  503s waited out {stats.statuses[503]:,}  reconnects "
                 f"{stats.connection_failures:,}")  # fmt: skip
