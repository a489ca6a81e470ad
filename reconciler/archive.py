"""Archiving an ended sale: its passing audit recorded in Postgres, then its per-buyer Redis
state deleted (the waiting room's members, steps and claims; each stock bucket's holds,
deadlines, buyer counts, idempotency answers and received transfers).

What answers for the sale stays in Redis, about 1.3 KB a SKU: the sale, queue, meta and
stock hashes (joins, polls and reserves answer "ended"; the page shows the counts). After
archiving, Postgres answers the rest: a reservation from its order, the audit from the
recorded report. Nothing is lost that Postgres does not have: the audit must pass first, and
it passes only once the pipeline is drained, every hold is final and has its order, and
every reservation traces back to its admission.

The steps, each re-runnable:

1. the sale has ended in Postgres, and in Redis (``lua/archive.lua`` checked, not run: by its
   clock, no reservation can be granted any more; nothing held, in the outbox or lent);
2. the audit passes; it is recorded with ``archived_at`` (the reconciler leaves the sale alone
   from then on);
3. the per-buyer keys are deleted, and ``redis_cleared_at`` recorded.

An archive interrupted after step 2 is finished by the next one (its audit is not run again:
the Redis state it read may be partly gone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial

import asyncpg
import orjson

from allocator.redis_calls import read_packed
from allocator.sale_scripts import SaleScripts, archived_keys
from flashsale.clients import Clients, RedisClient
from flashsale.errors import Conflict, FlashsaleError, listed
from flashsale.keys import SaleKeys, SkuKeys, bucket_keys
from flashsale.outages import is_outage
from flashsale.payments import PaymentProvider
from flashsale.sales import SALE_END, fetch_sale, fetch_skus, sale_state, unknown_sale
from flashsale.settings import Settings
from flashsale.timefmt import iso
from flashsale.wording import counted
from reconciler.audit import audit_sale
from reconciler.report import ReconcileMetrics

log = logging.getLogger("flashsale.reconciler")

_MARK = """
UPDATE sales SET archived_at = now(), archive_audit = $2::jsonb
WHERE id = $1 AND archived_at IS NULL
"""
_CLEARED = "UPDATE sales SET redis_cleared_at = now() WHERE id = $1 RETURNING archived_at"
# Ended sales due for archiving: preloaded (else Redis has nothing of theirs), ended ``$1``
# seconds ago (an ended sale ends when it was ended) and not archived, or archived and not
# cleared yet; of the sales ``$2`` (NULL: any).
DUE = f"""
SELECT s.id FROM sales s
WHERE s.redis_cleared_at IS NULL AND s.preloaded_at IS NOT NULL
  AND ($2::text[] IS NULL OR s.id = ANY($2::text[]))
  AND {SALE_END} + make_interval(secs => $1) < now()
ORDER BY s.ends_at
"""  # noqa: S608 - only constants of this code go in


@dataclass(frozen=True, slots=True)
class Archived:
    sale_id: str
    archived_at: datetime
    buckets: int  # stock buckets cleared (one per SKU in one bucket)
    already: bool  # archived by an earlier call; this one only finished the clearing
    freed_bytes: int  # what Redis reported the deleted keys used (MEMORY USAGE)

    def json(self) -> dict[str, object]:
        return {"sale_id": self.sale_id, "archived_at": iso(self.archived_at),
                "buckets": self.buckets, "already": self.already,
                "freed_bytes": self.freed_bytes}  # fmt: skip

    def text(self) -> str:
        when = iso(self.archived_at, "seconds")
        freed = f"{self.freed_bytes / 1024:,.1f} KB of per-buyer Redis state deleted"
        if self.already:  # this call finished a clearing cut short, or had nothing to do
            done = freed if self.freed_bytes else "nothing left to delete"
            return f"{self.sale_id}: already archived at {when}; {done}"
        return (
            f"{self.sale_id}: archived at {when}: audit passed and recorded; {freed} "
            f"({counted(self.buckets, 'stock bucket')}, the waiting room)"
        )


async def archive_sale(pool: asyncpg.Pool, client: RedisClient, provider: PaymentProvider | None,
                       settings: Settings, sale_id: str, *,
                       stage: Callable[[str], None] = lambda doing: None) -> Archived:  # fmt: skip
    """Archive ``sale_id`` (see the module). Raises NotFound for an unknown sale, and Conflict,
    having deleted nothing, when it has not ended, there is no ``provider`` to audit it with,
    or its audit fails. An archived sale is answered without an audit."""
    sale = await fetch_sale(pool, sale_id)
    if sale is None:
        raise await unknown_sale(pool, sale_id)
    scripts = SaleScripts(client)
    buckets = [k for r in await fetch_skus(pool, sale_id)
               for k in bucket_keys(sale_id, r["sku"], r["buckets"])]  # fmt: skip
    already = sale["archived_at"] is not None
    if not already:
        state = sale_state(sale)
        if state != "ended":
            raise Conflict(f"sale {sale_id} is {state}: archive it once it has ended",
                           code="sale_not_ended")  # fmt: skip
        if sale["redis_cleared_at"] is not None:  # a benchmark's, kept for its orders
            raise Conflict(
                f"sale {sale_id} cannot be archived: its Redis state was deleted on purpose "
                f"at {iso(sale['redis_cleared_at'])} (a benchmark's sale, kept for its "
                "orders), and its audit needs that state", code="redis_cleared",
            )  # fmt: skip
        if provider is None:
            raise Conflict(
                f"sale {sale_id} cannot be archived here: its audit asks the payment provider "
                "for the sale's charges, and FLASHSALE_PSP_URL is not set (run it beside "
                "`flashsale up`, or point it at the provider)",
                code="no_payment_provider",
            )  # fmt: skip
        stage("checking that nothing is held or on its way")
        _refused(sale_id, buckets, await scripts.archive_many(buckets, check=True))
        report = await audit_sale(pool, client, provider, settings, sale_id, stage=stage)
        if not report.passed:
            failed = [i.name.split(".")[0] for i in report.invariants if not i.passed]
            raise Conflict(
                f"sale {sale_id} cannot be archived: its audit fails (invariants "
                f"{', '.join(failed)}); `flashsale audit {sale_id}` shows why",
                code="audit_failed",
            )  # fmt: skip
        await pool.execute(_MARK, sale_id, orjson.dumps(report.json()).decode())
    stage("deleting the per-buyer Redis state")
    room = SaleKeys(sale_id)
    deleted = [*archived_keys(room), *(name for k in buckets for name in archived_keys(k))]
    sizes = await read_packed(client, [("MEMORY", "USAGE", name) for name in deleted])
    _refused(sale_id, buckets, await scripts.archive_many(buckets))
    await scripts.archive_room(room)
    archived_at = await pool.fetchval(_CLEARED, sale_id)
    return Archived(sale_id, archived_at, len(buckets), already, sum(int(n or 0) for n in sizes))


def _refused(sale_id: str, buckets: Sequence[SkuKeys], outcomes: Sequence[str]) -> None:
    """Conflict naming the stock buckets the script refused, with why."""
    refused = [
        f"{b.sku}{f' bucket {b.bucket}' if b.bucket else ''}: {o[len('refused_') :]}"
        for b, o in zip(buckets, outcomes, strict=True)
        if o.startswith("refused")
    ]
    if refused:
        raise Conflict(f"sale {sale_id} cannot be archived yet, Redis refuses "
                       f"{listed(refused, what='stock buckets')}; retry later",
                       code="archive_refused")  # fmt: skip


async def due_sales(pool: asyncpg.Pool, after_s: float,
                    sales: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """The sales (of ``sales``, default any) ended ``after_s`` seconds ago whose Redis state
    is not cleared yet."""
    return [r["id"] for r in await pool.fetch(DUE, after_s, sales)]


class Archiver:
    """The reconciler service's archiving: after each pass, the sales due
    (``FLASHSALE_ARCHIVE_AFTER`` after their end), at most ``PER_PASS`` of them (each audit
    reads every order of its sale). A refused sale is tried again after ``RETRY_S``, twice
    that after a second refusal, and so on up to a day: a sale whose audit keeps failing
    costs little, and its warning comes back."""

    RETRY_S = 600.0
    MAX_RETRY_S = 86_400.0
    PER_PASS = 5

    def __init__(self, c: Clients, settings: Settings, after_s: float,
                 metrics: ReconcileMetrics) -> None:  # fmt: skip
        self.archive = partial(archive_sale, c.pool, c.redis, c.provider, settings)
        self.pool = c.pool
        self.after_s = after_s
        self.metrics = metrics
        self._next_try: dict[str, tuple[float, float]] = {}  # sale -> (when, wait after)

    async def run(self, sales: Sequence[str] | None = None) -> None:
        """Archive what is due (of ``sales``, default any). An outage is raised (the pass's
        handling); a refusal is logged and tried again later, as is a failure of one sale."""
        now = time.monotonic()
        due = [s for s in await due_sales(self.pool, self.after_s, sales)
               if self._next_try.get(s, (0.0, 0.0))[0] <= now]  # fmt: skip
        for sale_id in due[: self.PER_PASS]:
            try:
                archived = await self.archive(sale_id)
            except FlashsaleError as exc:
                self.metrics.archives.labels("refused").inc()
                wait = self._later(sale_id, now)
                log.warning("sale %s is not archived yet (again in %gs): %s", sale_id, wait, exc)
            except Exception as exc:
                if is_outage(exc):
                    raise
                self.metrics.archives.labels("failed").inc()
                wait = self._later(sale_id, now)
                log.exception("archiving sale %s failed (again in %gs)", sale_id, wait)
            else:
                self.metrics.archives.labels("archived").inc()
                self._next_try.pop(sale_id, None)
                log.info(archived.text(), extra={"sale": sale_id})

    def _later(self, sale_id: str, now: float) -> float:
        """Put the sale off (the wait doubling from ``RETRY_S``); how long."""
        wait = self._next_try.get(sale_id, (0.0, self.RETRY_S))[1]
        self._next_try[sale_id] = (now + wait, min(self.MAX_RETRY_S, wait * 2))
        return wait
