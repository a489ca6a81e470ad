"""``flashsale demo``: the whole engine on the embedded stack, with a spike of buyers.

1. Applies migrations and creates the Kafka topics.
2. Starts ``flashsale up`` (gateway x2, the reservations listener, allocator with pumps,
   sweeper and outbox relay, order workers, payment simulator, reconciler) on free loopback
   ports, and waits until every service's ``/healthz`` answers.
3. Creates a sale opening a few seconds later, through the admin API, and preloads it.
4. Sends every buyer (50,000 by default, 100 units) through the real journey (join, poll,
   reserve) with the fast asyncio driver: a share of them (20 %) join before the opening, so
   the pre-queue is drawn, the rest arrive over the first seconds. One in ten pays with a card
   that is declined; a share may abandon while waiting or never use their admission, and the
   admission rate may change mid-queue (:class:`Scenario`). Each second it shows the queue
   depth, the admitted, held and sold units and the answers.
5. Shows reservations becoming orders (CONFIRMED or PAYMENT_FAILED) until every hold is
   resolved.
6. Ends the sale (so it costs the stack's services nothing after the demo), runs the
   post-sale audit (every invariant of DESIGN §7, through the admin API) once the pipeline
   has drained, archives the sale (its per-buyer Redis state deleted), stops the engine, and
   prints the report: seconds until every buyer had a definitive answer, sold, oversold,
   p50/p99 per route, the admission order, how honest the ETAs were, the audit (``--json
   PATH`` writes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from allocator.queue_scripts import QueueScripts
from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.clients import pg_connect, pg_pool, redis_client
from flashsale.kafka import ensure_topics
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.migrate import migrate
from flashsale.settings import Settings
from flashsale.tokens import Signer
from flashsale.wording import counted, rerun
from loadtest import admin_api
from loadtest.demo_report import (
    DemoReport,
    admission_order,
    bucket_quantile,
    eta_accuracy,
    kendall_tau,
    summary,
)
from loadtest.driver import Buyers, DriverStats, Person, Plan
from loadtest.engine_log import EngineLog, Stalled
from loadtest.processes import engine, histogram_buckets, wait_consuming, wait_healthy
from reconciler.report import AuditReport

Progress = Callable[[str], None]
SKU = "SNK-42"
LEAD_S = 5.0  # the sale opens this long after it is created: the pre-queue joins meanwhile
GATEWAY_LATENCY = "flashsale_gateway_request_duration_seconds"
CONCURRENCY = 500  # buyers with a request in flight at once (connections to the gateway)


@dataclass(frozen=True)
class Scenario:
    """Who arrives when, and what they do (``flashsale demo`` flags)."""

    buyers: int = 50_000
    stock: int = 100
    pre_queue: float = 0.2  # share joining before the opening (the pre-queue is drawn)
    arrival_s: float = 5.0  # the others arrive evenly over this long after the opening
    admission_rate: int = 500
    rate_change: tuple[float, int] | None = None  # (seconds after the opening, new rate)
    decline: float = 0.1  # share paying with a card that is declined
    no_show: float = 0.0  # share who never use their admission
    abandon: float = 0.0  # share who close the tab while waiting
    window_s: int = 60  # the sale's admission window

    def json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rate_change"] = None if self.rate_change is None else {
            "at_s": self.rate_change[0], "rate": self.rate_change[1]}  # fmt: skip
        return data

    def people(self, tokens: list[str], opened: float, lead_s: float) -> list[Person]:
        """Each buyer's arrival (monotonic; ``opened`` is the opening) and plan, drawn from a
        seeded generator so that two runs of a scenario meet the same crowd."""
        rng = random.Random(0x5EED)  # noqa: S311 - a reproducible crowd, not a secret
        early = round(len(tokens) * self.pre_queue)
        late = max(1, len(tokens) - early)
        people = []
        for i, token in enumerate(tokens):
            if i < early:  # over the lead, ending a second before the opening
                at = opened - lead_s + 0.5 + (lead_s - 1.5) * i / max(1, early)
            else:
                at = opened + self.arrival_s * (i - early) / late
            draw = rng.random()
            plan: Plan = "buy"
            if draw < self.abandon + self.no_show:
                plan = "abandon" if draw < self.abandon else "no_show"
            payment = "tok_decline" if rng.random() < self.decline else "tok_visa"
            people.append(Person(token, payment, at, plan))
        return people


async def _orders(pool: asyncpg.Pool, sale_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM orders WHERE sale_id = $1 GROUP BY state", sale_id
    )
    return {r["state"]: int(r["n"]) for r in rows}


async def run(settings: Settings, *, scenario: Scenario, progress: Progress,
              json_path: str | None = None, lead_s: float = LEAD_S) -> int:  # fmt: skip
    report = DemoReport(scenario.buyers, scenario.stock, scenario=scenario.json())
    conn = await pg_connect(settings)
    try:
        progress("== applying migrations")
        await migrate(conn, progress=lambda line: progress(f"   {line}"))
    finally:
        await conn.close()
    progress("== Kafka topics")
    await ensure_topics(settings, progress=lambda line: progress(f"   {line}"))
    port = free_ports(UP_PORTS)
    base = f"http://127.0.0.1:{port}"
    log_path = settings.home / "demo-engine.log"
    progress(f"== starting the engine: flashsale up --port {port} (log: {log_path})")
    with engine(settings, port, log_path) as up:
        async with aiohttp.ClientSession() as session:
            names = ("gateway", "allocator", "workers", "payments", "reconciler",
                     "reservations")  # fmt: skip
            for offset, name in enumerate(names):
                await wait_healthy(session, f"http://127.0.0.1:{port + offset}/healthz")
                progress(f"   {name:12} healthy on :{port + offset}")
            tokens = _sign(settings, scenario.buyers, progress)
            waited = await wait_consuming(session, f"http://127.0.0.1:{port + 2}/metrics")
            progress(f"   {'workers':12} consuming ({waited:.1f}s more for the broker to rebalance "
                     "their group)")  # fmt: skip
            starts_at = datetime.now(UTC) + timedelta(seconds=lead_s)
            opened = time.monotonic() + lead_s
            report.sale = await admin_api.create_sale(
                session, base, settings.admin_token.current(), sale_spec(scenario, starts_at)
            )
            early = round(scenario.buyers * scenario.pre_queue)
            progress(
                f"== sale {report.sale}: {counted(scenario.stock, 'unit')} of {SKU}, opening at "
                f"{starts_at:%H:%M:%S}; {early:,} of {scenario.buyers:,} buyers join "
                f"before the opening, the rest over its first {scenario.arrival_s:g}s"
            )
            progress(
                f"   watch it on the operators' page: {base}/admin/#sale={report.sale} "
                f"(the admin token: FLASHSALE_ADMIN_TOKEN in `{rerun('dev', 'env')}`)"
            )
            people = scenario.people(tokens, opened, lead_s)
            code = await _drive(settings, session, base, people, scenario, opened=opened,
                                report=report, progress=progress,
                                log=EngineLog(log_path))  # fmt: skip
            report.reserve_in_gateway = await _reserve_in_gateway(session, base)
            # The sale would run for its hour: ended, it stops costing this stack's services
            # anything (a pump, the sweeper, the relay), so a later demo meets the same engine,
            # and the audit is the post-sale one.
            await admin_api.end_sale(session, base, settings.admin_token.current(), report.sale)
            progress(f"== sale {report.sale} ended")
            report.audit_passed = await _audit(session, base, settings, report.sale, progress)
            if report.audit_passed:  # its per-buyer Redis state is of no more use
                archived = await admin_api.archive(session, base, settings.admin_token.current(),
                                                   report.sale)  # fmt: skip
                report.archived_kb = archived["freed_bytes"] / 1024
                progress(f"== sale archived: {report.archived_kb:,.0f} KB of per-buyer Redis "
                         "state deleted (the audit's report is kept in Postgres)")  # fmt: skip
        code = code or (0 if report.audit_passed else 1)
        if up.poll() is not None:
            progress(f"the engine stopped early (exit {up.returncode}); see {log_path}")
            code = 1
    progress("== engine stopped")
    summary(report, progress)
    if json_path:
        data = orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2)
        await asyncio.to_thread(Path(json_path).write_bytes, data)
        progress(f"   wrote {json_path}")
    return code


def _sign(settings: Settings, count: int, progress: Progress) -> list[str]:
    signer = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer")
    run_id = os.urandom(3).hex()
    progress(f"   signing {count:,} buyer tokens (the storefront's job)")
    return [signer.sign({"sub": f"demo-{run_id}-{i}"}, 3600) for i in range(count)]


def sale_spec(scenario: Scenario, starts_at: datetime) -> dict[str, Any]:
    return {
        "name": "Demo sneaker drop", "starts_at": starts_at.isoformat(),
        "ends_at": (starts_at + timedelta(hours=1)).isoformat(),
        "admission_rate": scenario.admission_rate,
        "admission_window_seconds": scenario.window_s,
        "max_queue": 1_000_000,
        "skus": [{"sku": SKU, "title": "Sneaker 42", "stock": scenario.stock, "price": 12900,
                  "currency": "EUR", "per_buyer_limit": 1, "hold_ttl_seconds": 120}],
    }  # fmt: skip


async def _watch(settings: Settings, sale_id: str, stats: DriverStats, *, total: int,
                 opened: float, progress: Progress, stop: asyncio.Event,
                 stalled: Stalled) -> None:  # fmt: skip
    """Each second: the waiting room and the stock as Redis has them (registered: the buyers
    who joined before the opening, for the draw; the queue: buyers in line who may still be
    admitted), and the answers; what the engine warned of once units stay held unsold."""
    client = redis_client(settings)
    room, stock = QueueScripts(client), SkuKeys(sale_id, SKU).stock
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            snap, k = await asyncio.gather(
                room.snapshot(SaleKeys(sale_id), redis_time=True),
                client.hmget(stock, "active", "paying", "sold"),
            )
            active, paying, sold = (int(v or 0) for v in k)
            answered = sum(stats.outcomes.values())
            v = snap.view
            progress(f"   {time.monotonic() - opened:5.1f}s  registered {v.pre:>6,}"
                     f"  queue {v.waiting(snap.redis_ms):>6,}"
                     f"  admitted {v.serving:>5,}  held {active + paying:>4}  sold {sold:>4}  "
                     f"answers {answered:>6,}/{total:,} ({stats.outcomes['reserved']} "
                     f"reserved, {stats.outcomes['sold_out']:,} sold out)")  # fmt: skip
            stalled.note(active + paying, sold, time.monotonic())
    finally:
        await client.aclose()


async def _drive(settings: Settings, session: aiohttp.ClientSession, base: str,
                 people: list[Person], scenario: Scenario, *, opened: float,
                 report: DemoReport, progress: Progress, log: EngineLog) -> int:  # fmt: skip
    sale_id = report.sale
    driver = Buyers(base, sale_id, SKU, window_ms=scenario.window_s * 1000)
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(
        settings, sale_id, driver.stats, total=len(people), opened=opened, progress=progress,
        stop=stop, stalled=Stalled(log, sale_id, progress, ("unit sold", "held")),
    ))  # fmt: skip
    changer = asyncio.create_task(_change_rate(session, base, settings, sale_id,
                                               scenario=scenario, opened=opened,
                                               progress=progress))  # fmt: skip
    opening = asyncio.create_task(_announce(opened, progress))
    try:
        stats = await driver.run(people, concurrency=CONCURRENCY)
    finally:
        stop.set()
        for task in (changer, opening):
            task.cancel()
        await watcher
    errors = {k: v for k, v in stats.outcomes.items() if k.startswith("error")}
    answered_all = max(stats.answered_at, default=opened) - opened
    report.seconds_to_answer_all = round(answered_all, 2) if not errors else None
    report.outcomes = dict(stats.outcomes)
    report.routes = stats.routes()
    report.driver_loop_lag = stats.lag()
    report.reserved_via = dict(stats.reserved_via)
    report.pre_queue_joins = stats.pre_queue_joins
    report.admission_kendall_tau = kendall_tau(stats.admissions)
    report.admission_order = admission_order(stats.admissions)
    report.eta_p50_abs_pct_error, report.eta_p90_coverage, report.eta_past_p50 = eta_accuracy(
        stats.etas
    )
    report.eta_buyers = len(stats.etas)
    report.eta_buyers_pre_queue = sum(1 for e in stats.etas if e.pre_queue)
    for kind, pre in (("before_draw", True), ("placed", False)):
        etas = [e for e in stats.etas if e.pre_queue is pre]
        error, coverage, past = eta_accuracy(etas)
        report.eta_by_kind[kind] = {"buyers": len(etas), "p50_abs_pct_error": error,
                                    "p90_coverage": coverage, "past_p50": past}  # fmt: skip
    gone = stats.outcomes["abandoned"] + stats.outcomes["no_show"]
    progress(f"== every buyer answered {answered_all:.1f}s after the sale opened: "
             f"{stats.outcomes['reserved']} reserved, {stats.outcomes['sold_out']:,} sold out, "
             + (f"{gone:,} abandoned or never reserved, " if gone else "")
             + f"{sum(errors.values())} errors" + (f" {errors}" if errors else ""))  # fmt: skip
    progress("== reservations becoming orders (payment saga over Kafka)")
    pool = await pg_pool(settings, min_size=1, max_size=2)
    try:
        stalled = Stalled(log, sale_id, progress, ("order ended", "open"))
        states = await _follow(pool, sale_id, len(stats.reservations), progress, stalled=stalled)
        sold, total = await pool.fetchrow(
            "SELECT sold, stock_total FROM sale_skus WHERE sale_id = $1 AND sku = $2",
            sale_id, SKU,
        )  # fmt: skip
    finally:
        await pool.close()
    report.sold, report.oversold, report.orders = sold, max(0, sold - total), states
    progress(f"== result: {counted(states.get('CONFIRMED', 0), 'order')} confirmed, "
             f"{counted(states.get('PAYMENT_FAILED', 0), 'payment')} declined (stock given back), "
             f"{sold}/{total} units sold, oversold {max(0, sold - total)}")  # fmt: skip
    ok = not errors and sold <= total and sum(states.values()) == len(stats.reservations)
    return 0 if ok and stats.outcomes["reserved"] > 0 else 1


async def _reserve_in_gateway(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The reservations' p50 and p99 (ms) as the gateway processes timed them (their latency
    histogram, from the middleware's start to the answer): a check on the driver's figures."""
    buckets = await histogram_buckets(session, f"{base}/metrics", GATEWAY_LATENCY,
                                      {"route": "/v1/sales/{sale}/reservations"})  # fmt: skip
    found = {name: bucket_quantile(buckets, q) for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99))}
    return {name: round(v * 1000, 1) for name, v in found.items() if v is not None}


async def _announce(opened: float, progress: Progress) -> None:
    await asyncio.sleep(max(0.0, opened - time.monotonic()))
    progress("== the sale is open")


async def _change_rate(session: aiohttp.ClientSession, base: str, settings: Settings,
                       sale_id: str, *, scenario: Scenario, opened: float,
                       progress: Progress) -> None:  # fmt: skip
    """The operator's change of the admission rate mid-queue, if the scenario has one."""
    if scenario.rate_change is None:
        return
    at_s, rate = scenario.rate_change
    await asyncio.sleep(max(0.0, opened + at_s - time.monotonic()))
    await admin_api.set_admission_rate(session, base, settings.admin_token.current(), sale_id,
                                       rate)  # fmt: skip
    progress(f"== admission rate changed to {rate}/s")


async def _audit(session: aiohttp.ClientSession, base: str, settings: Settings, sale_id: str,
                 progress: Progress) -> bool:  # fmt: skip
    """The post-sale audit through the admin API, printed as ``flashsale audit`` prints it."""
    report = AuditReport.parse(
        await admin_api.audit(session, base, settings.admin_token.current(), sale_id)
    )
    progress("== post-sale audit")
    for line in report.text().splitlines():
        progress(f"   {line}")
    return report.passed


async def _follow(pool: asyncpg.Pool, sale_id: str, reserved: int, progress: Progress, *,
                  stalled: Stalled, patience: float = 120) -> dict[str, int]:  # fmt: skip
    terminal = ("CONFIRMED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED")
    deadline = time.monotonic() + patience
    shown: Any = None
    while True:
        states = await _orders(pool, sale_id)
        if states != shown:
            shown = states
            parts = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none yet"
            progress(f"   orders: {parts}")
        ended = sum(states.get(s, 0) for s in terminal)
        if ended >= reserved:
            return states
        stalled.note(reserved - ended, ended, time.monotonic())
        if time.monotonic() > deadline:
            progress(f"   not every order is final after {patience:g}s")
            return states
        await asyncio.sleep(0.5)
