"""What a reconcile pass reports: every repair and flag (as ``reconcile_events`` records
them, and how they are read back), what it could not decide, and the reconciler's metrics;
and what the post-sale audit reports, invariant by invariant."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from flashsale.ops_endpoints import build_info
from flashsale.outages import describe, is_outage
from flashsale.timefmt import iso
from flashsale.wording import said

log = logging.getLogger("flashsale.reconciler")

SHOWN = 20  # offending ids an audit lists per invariant


# Every kind of repair (and, ``flag_…``, of flag for a person) a pass records, with what it
# means: what `flashsale repairs --kind` accepts and the runbook's table explains.
KINDS = {
    "rebuild_sku": "a SKU's (or stock bucket's) Redis counts and holds, lost or drifted, "
                   "rebuilt from Postgres",
    "status": "a SKU's status in Redis (active, paused, ended) set back to Postgres's",
    "recount_sold": "a SKU's sold counter in Postgres, apart from its confirmed orders, "
                    "counted again from them",
    "restore_sale": "the sale's record, lost from Redis, written again from Postgres",
    "relist_skus": "the sale's list of SKUs in Redis written again from Postgres's",
    "restore_queue": "a waiting room lost from Redis restored from its marks",
    "grant_stock": "units added in Postgres to a SKU in stock buckets, granted in Redis",
    "finish_transfer": "a move of units between stock buckets left half done, finished",
    "expire_overdue": "holds past their deadline no sweeper expired, expired",
    "release_orderless": "a paying hold with no order, released (a capture refunded)",
    "resolve_stuck": "an order stuck paying settled as the provider says",
    "record_payment": "a payment recorded as the provider has it (declined, refunded, none)",
    "refund_orphan": "a capture with no confirmed order, refunded",
    "flag_uncaptured": "a confirmed order the provider has no capture of",
    "flag_sold_uncaptured": "a hold sold whose payment the provider never captured",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Repair:
    """One change the reconciler made (or a flag it raised), as recorded in
    ``reconcile_events``."""

    sale_id: str
    sku: str | None
    kind: str
    subject: str | None = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {"sale_id": self.sale_id, "sku": self.sku, "kind": self.kind,
                "subject": self.subject, "before": self.before, "after": self.after}  # fmt: skip


_RECORDED = """
SELECT id, created_at, sale_id, sku, kind, subject, before, after FROM reconcile_events
WHERE ($1::text IS NULL OR sale_id = $1) AND ($2::text IS NULL OR kind = $2)
  AND ($3::timestamptz IS NULL OR created_at >= $3)
ORDER BY id DESC LIMIT $4
"""


async def recorded(
    db: asyncpg.Connection, *, sale: str | None, kind: str | None, since: datetime | None,
    limit: int,
) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
    """The newest ``limit`` repairs and flags recorded (of ``sale``, of ``kind``, ``since``),
    oldest first, and whether older ones match too."""
    rows = await db.fetch(_RECORDED, sale, kind, since, limit + 1)
    return [{"id": r["id"], "at": iso(r["created_at"]), **Repair(
                r["sale_id"], r["sku"], r["kind"], r["subject"], orjson.loads(r["before"]),
                orjson.loads(r["after"])).json()}
            for r in reversed(rows[:limit])], len(rows) > limit  # fmt: skip


@dataclass
class PassReport:
    """What one pass looked at and did. ``unresolved``: what it could not decide now
    (provider down, a hold that moved meanwhile); the next pass tries again."""

    skus: int = 0
    seconds: float = 0.0
    repairs: list[Repair] = field(default_factory=list)
    flags: list[Repair] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    failures: int = 0  # items whose repair raised (each also in ``unresolved``)

    @property
    def changed(self) -> int:
        return len(self.repairs)

    def json(self) -> dict[str, Any]:
        return {"skus": self.skus, "seconds": round(self.seconds, 4), "changed": self.changed,
                "repairs": [r.json() for r in self.repairs],
                "flags": [f.json() for f in self.flags], "unresolved": self.unresolved}  # fmt: skip


async def isolated(report: PassReport, item: str, repair: Callable[[], Awaitable[None]]) -> None:
    """Run one item's repair. If it raises, the failure is logged, counted and reported as
    unresolved (the next pass tries again) and the pass goes on with the other items; an
    outage stops the pass instead, since every other item would meet it too."""
    try:
        await repair()
    except Exception as exc:
        if is_outage(exc):
            raise
        log.warning("reconcile: %s failed: %s", item, describe(exc), exc_info=True)
        report.failures += 1
        report.unresolved.append(f"{item}: {type(exc).__name__}: {exc}"[:500])


async def several_at_a_time(jobs: Sequence[Callable[[], Awaitable[None]]], most: int) -> None:
    """Run ``jobs``, at most ``most`` at a time. The first exception (an outage: ``isolated``
    keeps the others) stops the jobs still running and is raised as it is."""
    queue = iter(jobs)

    async def worker() -> None:
        for job in queue:  # shared: each job is taken by one worker
            await job()

    workers = [asyncio.ensure_future(worker()) for _ in range(min(most, len(jobs)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise


class ReconcileMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        build_info(registry, "reconciler")
        self.repairs = Counter("flashsale_reconcile_repairs", "Repairs made, by kind", ["kind"],
                               registry=registry)  # fmt: skip
        self.flags = Counter("flashsale_reconcile_flags", "Problems flagged for a human, by kind",
                             ["kind"], registry=registry)  # fmt: skip
        self.passes = Counter("flashsale_reconcile_passes", "Reconcile passes run",
                              registry=registry)  # fmt: skip
        self.failures = Counter("flashsale_reconcile_pass_failures",
                                "Passes that stopped on an error", registry=registry)  # fmt: skip
        self.seconds = Gauge("flashsale_reconcile_pass_duration_seconds",
                             "Duration of the last pass", registry=registry)  # fmt: skip
        self.skus = Gauge(
            "flashsale_reconcile_skus",
            "SKUs the last pass over each sale read (an ended sale's untouched ones only once)",
            registry=registry,
        )
        self.unresolved = Gauge(
            "flashsale_reconcile_unresolved",
            "Items the last pass over each sale could not decide", registry=registry,
        )  # fmt: skip
        # The service's passes take a turn of sales each (reconciler/service.py): the last
        # pass over each sale in scope, by sale, so that the gauges count each such pass once.
        self._last: dict[str, tuple[int, int, int]] = {}  # sale -> (pass, SKUs, unresolved)
        self._serial = 0
        self.lag = Gauge(
            "flashsale_consumer_lag_messages",
            "Messages the workers' consumer group has not committed, by topic (read by the "
            "reconciler, so it keeps counting when the workers are down)",
            ["topic", "group"], registry=registry,
        )  # fmt: skip
        self.webhook_lag = Gauge(
            "flashsale_webhook_lag_messages",
            "Order events the storefront has not taken yet: the webhooks' consumer group's lag "
            "on order-events (read by the reconciler when FLASHSALE_WEBHOOK_URL is set)",
            ["group"], registry=registry,
        )  # fmt: skip
        self.dead_letters = Gauge(
            "flashsale_dead_letter_messages",
            "Messages ever parked on the dead-letter topic (its end offsets: one more is one "
            "more parked; read by the reconciler)", ["topic"], registry=registry,
        )  # fmt: skip
        self.lag_failures = Counter(
            "flashsale_consumer_lag_read_failures", "Lag readings the broker did not answer",
            registry=registry,
        )  # fmt: skip
        self.archives = Counter(
            "flashsale_sales_archived", "Attempts to archive an ended sale, by outcome: "
            "archived, refused (its audit fails, or it is not over yet), failed",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.item_failures = Counter(
            "flashsale_reconcile_item_failures", "Items whose repair raised (the pass went on)",
            registry=registry,
        )  # fmt: skip

    def count(self, report: PassReport, turn: Sequence[str] | None = None) -> None:
        """Count one finished pass; ``turn``: the sales it was over, when it was over some of
        the sales in scope (the gauges then add up the last pass over each sale)."""
        self.passes.inc()
        self.seconds.set(report.seconds)
        if turn is None:
            self._last.clear()
            self.skus.set(report.skus)
            self.unresolved.set(len(report.unresolved))
        else:
            self._serial += 1
            self._last.update((sale, (self._serial, report.skus, len(report.unresolved)))
                              for sale in turn)  # fmt: skip
            self._set_last()
        self.item_failures.inc(report.failures)
        for repair in report.repairs:
            self.repairs.labels(repair.kind).inc()
        for flag in report.flags:
            self.flags.labels(flag.kind).inc()

    def keep(self, sales: Collection[str]) -> None:
        """Forget the last passes over the sales not in ``sales``: they left the scope."""
        gone = [sale for sale in self._last if sale not in sales]
        for sale in gone:
            del self._last[sale]
        if gone:
            self._set_last()

    def _set_last(self) -> None:
        passes = set(self._last.values())
        self.skus.set(sum(skus for _, skus, _ in passes))
        self.unresolved.set(sum(unresolved for _, _, unresolved in passes))


@dataclass
class Invariant:
    name: str
    passed: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def fail(self, what: str, ids: list[str] | int | str) -> None:
        self.passed = False
        if isinstance(ids, list):
            self.details[what] = {"count": len(ids), "ids": sorted(ids)[:SHOWN]}
        else:
            self.details[what] = ids

    def check(self, what: str, offending: list[str]) -> None:
        """Fail with ``offending`` under ``what``, if there is any."""
        if offending:
            self.fail(what, offending)

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "details": self.details}


@dataclass
class AuditReport:
    sale_id: str
    invariants: list[Invariant]
    facts: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(i.passed for i in self.invariants)

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> AuditReport:
        """The report :meth:`json` wrote."""
        invariants = [Invariant(i["name"], i["passed"], i["details"]) for i in doc["invariants"]]
        return cls(doc["sale_id"], invariants, doc["facts"])

    def json(self) -> dict[str, Any]:
        return {"sale_id": self.sale_id, "passed": self.passed,
                "invariants": [i.json() for i in self.invariants], "facts": self.facts}  # fmt: skip

    def text(self) -> str:
        state = self.facts.get("sale_state", "ended")
        verdict = "PASSED" if self.passed else "FAILED"
        if state != "ended":
            verdict += f" (the sale is {state}: this holds as of now; audit it again after its end)"
        lines = [f"audit of sale {self.sale_id}: {verdict}"]
        lines += [f"  {k}: {said(v)}" for k, v in self.facts.items()]
        for inv in self.invariants:
            lines.append(f"  [{'pass' if inv.passed else 'FAIL'}] {inv.name}")
            lines += [f"        {k}: {detail_text(v)}" for k, v in inv.details.items()]
        return "\n".join(lines)


def detail_text(value: Any) -> str:
    """An invariant's detail in a line, as the live page shows it: the offending ids it
    counted (``Invariant.fail``) as "25: id, id, …", anything else as
    :func:`~flashsale.wording.said` puts it."""
    if isinstance(value, dict) and "count" in value:
        ids = [str(i) for i in value.get("ids", [])]
        more = ", …" if value["count"] > len(ids) else ""
        return f"{value['count']:,}: {', '.join(ids)}{more}"
    return said(value)
