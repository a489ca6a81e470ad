"""Queue marks: the highest waiting-room counters a process has seen, checkpointed to Postgres.

Redis holds a sale's waiting room (tail, serving position, cutoff). If Redis loses it, the
reconciler restores it to at least the highest values any gateway or pump has seen, so no
position is handed out twice and no admitted buyer loses the admission. Each gateway process
and each pump notes what it sees (counter refreshes, join answers, pump steps) and upserts it
into ``queue_marks`` about once a second, and at once when it sees the counters go back (Redis
lost them). The upsert only moves each value the safe way: tail, serving and pre up, the
cutoff down, flags on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace

import asyncpg

from flashsale.outages import log_failure

log = logging.getLogger("flashsale.queue_marks")

_UPSERT = """
INSERT INTO queue_marks AS m (sale_id, source, tail, serving, pre, cutoff, sealed, shuffled,
                              sold_out, updated_at)
SELECT t.sale_id, $1, t.tail, t.serving, t.pre, t.cutoff, t.sealed, t.shuffled, t.sold_out,
       now()
FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bool[],
            $8::bool[], $9::bool[])
     AS t(sale_id, tail, serving, pre, cutoff, sealed, shuffled, sold_out)
ON CONFLICT (sale_id, source) DO UPDATE SET
    tail = greatest(m.tail, excluded.tail),
    serving = greatest(m.serving, excluded.serving),
    pre = greatest(m.pre, excluded.pre),
    cutoff = least(m.cutoff, excluded.cutoff),
    sealed = m.sealed OR excluded.sealed,
    shuffled = m.shuffled OR excluded.shuffled,
    sold_out = m.sold_out OR excluded.sold_out,
    updated_at = now()
"""

_HIGHEST = """
SELECT max(tail) AS tail, max(serving) AS serving, max(pre) AS pre, min(cutoff) AS cutoff,
       bool_or(sealed) AS sealed, bool_or(shuffled) AS shuffled, bool_or(sold_out) AS sold_out,
       count(*) AS sources
FROM queue_marks WHERE sale_id = $1
"""


@dataclass(frozen=True, slots=True)
class Mark:
    tail: int = 0
    serving: int = 0
    pre: int = 0
    cutoff: int | None = None  # the smallest cutoff seen; None: none published yet
    sealed: bool = False
    shuffled: bool = False
    sold_out: bool = False

    def merge(self, other: Mark) -> Mark:
        cutoffs = [c for c in (self.cutoff, other.cutoff) if c is not None]
        return Mark(
            max(self.tail, other.tail), max(self.serving, other.serving),
            max(self.pre, other.pre), min(cutoffs) if cutoffs else None,
            self.sealed or other.sealed, self.shuffled or other.shuffled,
            self.sold_out or other.sold_out,
        )  # fmt: skip

    def behind(self, seen: Mark) -> bool:
        """True when these counters are below what was seen before: Redis lost some."""
        return self.tail < seen.tail or self.serving < seen.serving


class QueueMarks:
    """What one process has seen, per sale; :meth:`flush` upserts what changed."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.seen: dict[str, Mark] = {}
        self._flushed: dict[str, Mark] = {}
        self.urgent = asyncio.Event()  # set when a regression was seen: flush now

    def note(self, sale_id: str, mark: Mark) -> None:
        before = self.seen.get(sale_id)
        if before is not None and mark.behind(before):
            self.urgent.set()
        self.seen[sale_id] = mark if before is None else before.merge(mark)

    def note_position(self, sale_id: str, position: int) -> None:
        """A join answer: ``position`` was handed out."""
        before = self.seen.get(sale_id, Mark())
        if position > before.tail:
            self.seen[sale_id] = replace(before, tail=position)

    async def flush(self, pool: asyncpg.Pool) -> int:
        """Upsert every mark that changed since the last flush; the number written."""
        changed = {s: m for s, m in self.seen.items() if self._flushed.get(s) != m}
        self.urgent.clear()
        if not changed:
            return 0
        sales = list(changed)
        marks = [changed[s] for s in sales]
        await pool.execute(
            _UPSERT, self.source, sales, [m.tail for m in marks], [m.serving for m in marks],
            [m.pre for m in marks], [m.cutoff for m in marks], [m.sealed for m in marks],
            [m.shuffled for m in marks], [m.sold_out for m in marks],
        )  # fmt: skip
        self._flushed.update(changed)
        return len(changed)

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Flush every ``interval`` seconds, at once after a regression, and once more when
        ``stop`` is set. A failed flush is logged and retried: marks only accumulate."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop, self.urgent), interval)
            try:
                await self.flush(pool)
            except Exception as exc:  # noqa: BLE001 - the loop outlives any flush
                log_failure(log, "could not checkpoint queue marks", exc)
            if stop.is_set():
                return


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def highest(pool: asyncpg.Pool | asyncpg.Connection, sale_id: str) -> Mark:
    """The highest counters any process has checkpointed for the sale (zeros if none)."""
    row = await pool.fetchrow(_HIGHEST, sale_id)
    if row is None or not row["sources"]:
        return Mark()
    return Mark(
        int(row["tail"]), int(row["serving"]), int(row["pre"]),
        None if row["cutoff"] is None else int(row["cutoff"]), bool(row["sealed"]),
        bool(row["shuffled"]), bool(row["sold_out"]),
    )  # fmt: skip
