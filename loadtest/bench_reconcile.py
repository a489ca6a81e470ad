"""``flashsale bench reconcile``: how long one reconcile pass takes over many SKUs.

One sale with ``--skus`` SKUs (10,000 by default) is created and preloaded. Then, each
``--passes`` times (the median is reported):

* **ceiling**: the pass's unavoidable reads and nothing else: the Postgres scope query and
  one pipelined read of every SKU's counters and configuration from Redis;
* **clean**: a service pass (``run_once(full=False)``) when nothing has drifted;
* **full**: a ``--once`` pass, adding the checks that read the sale's open and confirmed
  orders and its payments;
* **status**: the sale's stock per SKU as ``sale status``, the admin API and the public sale
  summary (``GET /v1/sales/{sale}``, refreshed twice a second by each gateway process) read
  it: the same reads as the ceiling, and the sale's orders counted by state;
* **drift**: a pass after 1 % of the SKUs had their counters corrupted: it finds and
  rebuilds exactly those, and the next pass finds nothing.

Targets: a clean pass over 10,000 SKUs in at most 1 s; the status read within 3x the
ceiling (it adds nothing per SKU but a row of the answer).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from allocator.redis_calls import read_packed
from allocator.sale_admin import SaleAdmin
from flashsale.clients import pg_pool, redis_client
from flashsale.keys import SkuKeys
from flashsale.sales import fetch_in_play
from flashsale.salespec import parse_sale
from flashsale.settings import Settings
from loadtest.bench import Report, Row, Target, discard_sales, inconsistent, machine, table
from reconciler.reconcile import Reconciler
from reconciler.skus import SCOPE, sku_reads

TARGET_S = 1.0  # per clean pass over 10,000 SKUs
STATUS_X_CEILING = 3.0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    skus: int = 10_000
    passes: int = 5
    drift_share: float = 0.01

    def command(self) -> str:
        """The command line that reproduces a run with these options."""
        return f"flashsale bench reconcile --skus {self.skus} --passes {self.passes}"


async def _median(passes: int, run: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(passes):
        began = time.perf_counter()
        await run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


FAILURE = "the drift pass did not repair exactly the corrupted SKUs in"


def failed(report: Report) -> list[str]:
    """The rows whose check failed (named after ``FAILURE``)."""
    return inconsistent(report)


async def run(settings: Settings, options: Options, progress: Progress, command: str) -> Report:
    described = machine()
    pool = await pg_pool(settings, min_size=1, max_size=4)
    client = redis_client(settings)
    made: list[str] = []
    now, skus = datetime.now(UTC), [f"B{i:05d}" for i in range(options.skus)]
    spec = {
        "name": f"bench reconcile {options.skus} SKUs",
        "starts_at": (now - timedelta(seconds=1)).isoformat(),
        "ends_at": (now + timedelta(hours=1)).isoformat(),
        "skus": [{"sku": sku, "stock": 100, "price": 100, "currency": "EUR"} for sku in skus],
    }  # fmt: skip
    try:
        admin = SaleAdmin.build(pool, client)
        progress(f"bench reconcile: creating and preloading a sale of {options.skus:,} SKUs")
        sale_id = str((await admin.create(parse_sale(spec)))["id"])
        made.append(sale_id)
        began = time.perf_counter()
        await admin.preload(sale_id)
        progress(f"  preloaded in {time.perf_counter() - began:.1f}s")
        rec = Reconciler(pool, client, None, settings.topics.order_events)
        scope = [sale_id]
        first = await rec.run_once(scope)  # warm: opens the waiting room's checks, caches
        if first.changed:
            raise RuntimeError(f"a fresh sale needed {first.changed} repairs: {first.json()}")

        async def ceiling() -> None:
            await read_packed(client, sku_reads(await fetch_in_play(pool, SCOPE, scope)))

        async def clean() -> None:
            report = await rec.run_once(scope, full=False)
            if report.changed:
                raise RuntimeError(f"a clean pass repaired {report.changed} things")

        async def full() -> None:
            report = await rec.run_once(scope, full=True)
            if report.changed:
                raise RuntimeError(f"a clean full pass repaired {report.changed} things")

        async def status() -> None:
            await admin.status(sale_id)

        results: dict[str, float] = {}
        for name, op in (("ceiling", ceiling), ("clean", clean), ("full", full),
                         ("status", status)):  # fmt: skip
            results[name] = await _median(options.passes, op)
            progress(f"  {name}: {results[name] * 1000:,.0f} ms per pass")

        corrupt = max(1, int(options.skus * options.drift_share))
        pipe = client.pipeline(transaction=False)
        for i in range(corrupt):
            pipe.hincrby(SkuKeys(sale_id, f"B{i * (options.skus // corrupt):05d}").stock,
                         "available", 3)  # fmt: skip
        await pipe.execute()
        began = time.perf_counter()
        drift = await rec.run_once(scope, full=False)
        results["drift"] = time.perf_counter() - began
        after = await rec.run_once(scope, full=True)
        progress(f"  drift: {results['drift'] * 1000:,.0f} ms to rebuild {drift.changed} of "
                 f"{corrupt} corrupted SKUs; the next pass changed {after.changed}")  # fmt: skip
        consistent = drift.changed == corrupt and after.changed == 0
    finally:
        await client.aclose()
        await pool.close()
        if made:  # also after a failed pass: nothing of the run stays on the stack
            progress("  discarding the sale: its rows, its repairs and its Redis state")
            await discard_sales(settings, made, skus)

    ceiling_s = results["ceiling"]
    rows = [
        Row("ceiling", "scope query + one pipelined read of every SKU", options.skus / ceiling_s,
            options.skus, ceiling_s),
        Row("clean", "service pass, nothing to repair", options.skus / results["clean"],
            options.skus, results["clean"]),
        Row("full", "--once pass, nothing to repair (adds order and payment checks)",
            options.skus / results["full"], options.skus, results["full"]),
        Row("status", "the stock of every SKU, as sale status and the sale summary read it",
            options.skus / results["status"], options.skus, results["status"]),
        Row("drift", f"pass rebuilding {corrupt} corrupted SKUs", options.skus / results["drift"],
            options.skus, results["drift"]),
    ]  # fmt: skip
    for row in rows:
        row.extra["ms_per_pass"] = round(row.seconds * 1000, 1)
        row.extra["ratio_to_ceiling"] = round(row.seconds / ceiling_s, 2)
    rows[-1].extra.update(consistent=consistent, repaired=drift.changed, corrupted=corrupt,
                          next_pass_changed=after.changed)  # fmt: skip
    scaled = results["clean"] * 10_000 / options.skus
    targets = [Target("clean pass over 10,000 SKUs", f"<= {TARGET_S:g} s",
                      f"{scaled:.3f} s" + ("" if options.skus == 10_000 else " (scaled)"),
                      scaled <= TARGET_S),
               Target("status read vs the ceiling", f"<= {STATUS_X_CEILING:g}x",
                      f"{results['status'] / ceiling_s:.2f}x",
                      results["status"] <= STATUS_X_CEILING * ceiling_s)]  # fmt: skip
    return Report("reconcile", command, rows, targets, described,
                  {"skus": options.skus, "passes": options.passes,
                   "drift_share": options.drift_share, "sale_id": sale_id})  # fmt: skip


def render(report: Report) -> str:
    rows = [(r.name, r.extra["ms_per_pass"], r.per_second, r.extra["ratio_to_ceiling"], r.what)
            for r in report.rows]  # fmt: skip
    targets = [(t.name, t.goal, t.measured, "met" if t.met else "MISSED") for t in report.targets]
    return "\n\n".join([
        table(("row", "ms/pass", "SKUs/s", "x ceiling", "what"), rows),
        table(("target", "goal", "measured", ""), targets),
    ])  # fmt: skip
