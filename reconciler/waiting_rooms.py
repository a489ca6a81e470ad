"""Waiting rooms Redis lost, or whose counters went back below what gateways and pumps have
seen: restored to at least the highest checkpointed marks (:mod:`flashsale.queue_marks`),
after a grace in which every gateway flushes its marks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial

import asyncpg

from flashsale.clients import RedisClient
from flashsale.keys import SaleKeys
from flashsale.queue_marks import Mark, highest
from flashsale.records import integer
from reconciler.rebuild import restore_queue
from reconciler.report import PassReport, Repair, isolated

log = logging.getLogger("flashsale.reconciler")

_FIELDS = ("live", "tail", "serving", "pre", "cutoff", "sealed", "shuffled", "sold_out")


class WaitingRooms:
    """Waiting-room drift over one Postgres pool and one Redis client."""

    def __init__(self, pool: asyncpg.Pool, client: RedisClient, *, grace_s: float) -> None:
        self.pool = pool
        self.client = client
        self.grace_s = grace_s
        self._lost_since: dict[str, float] = {}  # sale -> when its waiting room was seen lost

    async def find(self, sales: Sequence[str]) -> list[tuple[str, str, Mark, Mark]]:
        """(sale, why, Redis counters, checkpointed marks) for waiting rooms to restore:
        ``lost`` (not live) or ``behind`` (below what was seen). Writes nothing."""
        pipe = self.client.pipeline(transaction=False)
        for sale in sales:
            pipe.hmget(SaleKeys(sale).queue, *_FIELDS)
        replies = await pipe.execute() if sales else []
        out = []
        for sale, q in zip(sales, replies, strict=True):
            now = Mark(integer(q[1]), integer(q[2]), integer(q[3]),
                       None if integer(q[4], -1) < 0 else integer(q[4]), integer(q[5]) == 1,
                       integer(q[6]) == 1, integer(q[7]) == 1)  # fmt: skip
            seen = await highest(self.pool, sale)
            if integer(q[0]) != 1:
                out.append((sale, "lost", now, seen))
            elif now.behind(seen):
                out.append((sale, "behind", now, seen))
        return out

    async def repair(self, sales: Sequence[str], report: PassReport, *, wait: bool) -> None:
        """Restore what :meth:`find` reports. A room seen lost is restored once the grace has
        passed since it was first seen: at once after waiting it out when ``wait`` (``--once``),
        else by a later pass."""
        drift = await self.find(sales)
        now = time.monotonic()
        for sale, why, _, _ in drift:
            if why == "lost":
                self._lost_since.setdefault(sale, now)
        lost = [self._lost_since[sale] for sale, why, _, _ in drift if why == "lost"]
        left = self.grace_s - (now - min(lost)) if lost else 0.0
        if left > 0 and wait:  # every gateway flushes its marks within the grace
            log.info("waiting %.1fs for the gateways' queue marks before restoring", left)
            await asyncio.sleep(left)
        for sale, why, current, _ in drift:
            if why == "lost" and not wait and now - self._lost_since[sale] < self.grace_s:
                report.unresolved.append(f"{sale}: waiting room lost; restored after "
                                         f"{self.grace_s:g}s of grace")  # fmt: skip
                continue
            await isolated(report, f"{sale}: restore the waiting room ({why})",
                           partial(self._restore, sale, why, current, report))  # fmt: skip

    async def _restore(self, sale: str, why: str, current: Mark, report: PassReport) -> None:
        mark, (tail, serving, cutoff) = await restore_queue(self.pool, self.client, sale)
        self._lost_since.pop(sale, None)
        report.repairs.append(Repair(
            sale, None, "restore_queue", None,
            {"reason": why, "tail": current.tail, "serving": current.serving},
            {"tail": tail, "serving": serving, "cutoff": cutoff, "marks_tail": mark.tail,
             "marks_serving": mark.serving},
        ))  # fmt: skip
