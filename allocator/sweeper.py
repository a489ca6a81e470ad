"""The hold-expiry sweeper: gives back the stock of ACTIVE holds whose deadline has passed.

Deadlines are judged by Redis ``TIME`` inside the ``expire`` script, never by this process's
clock. Several sweepers may run at once (one per allocator service, or a spare): the script's
state check makes each hold's stock come back exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from allocator.hold_scripts import HoldScripts
from allocator.pacing import SaleRounds
from flashsale.keys import SkuKeys
from flashsale.outages import log_failure

log = logging.getLogger("flashsale.sweeper")

# SKUs per pipelined call: the loop serves its other tasks between two (one call for 100,000
# SKUs kept it for seconds).
SLICE = 2000


async def sweep_once(scripts: HoldScripts, skus: Iterable[SkuKeys], batch: int = 500) -> int:
    """Expire every overdue hold of ``skus`` now; returns how many this call expired. One
    pipelined expire call per SKU, ``SLICE`` SKUs at a time, then again for the SKUs that had
    more than ``batch``."""
    total = 0
    pending = list(skus)
    while pending:
        more = []
        for start in range(0, len(pending), SLICE):
            part = pending[start : start + SLICE]
            results = await scripts.expire_many(part, batch)
            total += sum(len(result.expired) for result in results)
            more += [keys for keys, result in zip(part, results, strict=True) if result.more]
        pending = more
    return total


async def run_sweeper(
    scripts: HoldScripts,
    skus: Callable[[], Awaitable[list[SkuKeys]]],
    *,
    stop: asyncio.Event,
    interval: float = 0.25,
    batch: int = 500,
    visits_per_s: float = 5000.0,
    on_expired: Callable[[int], None] | None = None,
) -> None:
    """Sweep each sale every ``interval`` seconds until ``stop`` is set; a sale with more
    SKUs than its share of ``visits_per_s`` allows at that pace, less often
    (allocator/pacing.py): a 10,000-SKU sale alone is swept every 2 seconds, and a small sale
    beside it still every ``interval``. The sales due together are swept in one call, but a
    sale of more than ``SLICE`` SKUs is swept beside the others (1.5 to 1.6 s for 100,000 SKUs
    here, which the small sales' turns waited behind), and a sale still being swept is not
    started again. A failed sweep (Redis down, or anything else) is logged and the loop goes
    on: a missed sweep only delays stock coming back, it never loses it. Sweeps still running
    when ``stop`` is set are cancelled: each hold's expiry is one script call, done or not."""
    rounds = SaleRounds(interval, visits_per_s)
    running: dict[str, asyncio.Task[None]] = {}

    async def sweep(sales: list[str], due: list[SkuKeys]) -> None:
        try:
            expired = await sweep_once(scripts, due, batch)
        except Exception as exc:  # noqa: BLE001 - the loop outlives any sweep
            log_failure(log, "sweep failed; each sale is swept again at its next turn", exc)
        else:
            if expired:
                log.info("expired %d holds", expired)
            if on_expired is not None:
                on_expired(expired)
        finally:
            for sale in sales:
                running.pop(sale, None)

    def start(sales: list[str], due: list[SkuKeys]) -> None:
        task = asyncio.create_task(sweep(sales, due))
        running.update((sale, task) for sale in sales)

    try:
        while not stop.is_set():
            try:
                groups = rounds.due_groups(await skus(), time.monotonic())
            except Exception as exc:  # noqa: BLE001 - the loop outlives any round
                log_failure(log, "sweep failed; each sale is swept again at its next turn", exc)
                groups = {}
            together: list[str] = []
            for sale, due in groups.items():
                if sale in running:
                    continue
                if len(due) > SLICE:
                    start([sale], due)
                else:
                    together.append(sale)
            if together:
                start(together, [keys for sale in together for keys in groups[sale]])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rounds.wait(time.monotonic()))
    finally:
        tasks = set(running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
