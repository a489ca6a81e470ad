"""The admission pump: moves a sale's serving position forward, one leader per sale.

Every tick the leader reads the sale (stock of every SKU, waiting-room counters, used
admissions) and admits the next buyers, bounded by

* **rate**: the sale's ``admission_rate`` per second (a token bucket: no burst beyond 0.5 s,
  or beyond what accrued since the last tick when ticks are further apart, up to 1 s);
* **capacity**: admitted buyers who have neither reserved nor lapsed (``admission_capacity``);
* **inventory**: expected takers never exceed the units available, using the learned no-show
  rate (admitted buyers whose window lapsed without a reservation);
* **the cutoff**: the last position that may ever be admitted. Status pages tell every buyer
  beyond it ``sold_out`` at once, so the pump promises never to pass it, and it only moves
  back. It assumes at most ``noshow_ceiling`` of the admitted buyers do not show up.

The stock it plans with is counted by :class:`~allocator.stock_count.StockCounter`: in the
tick's own read while that is quick, beside the ticks for a sale of many SKUs.

A buyer who lets the admission window lapse stops counting against capacity and inventory, so
the next ticks admit someone else in their place (compensation). With no units left, available
or held, the sale is marked sold out and the pump stops admitting.

Leadership is a Redis lease with a fencing token (``lua/lease.lua``); every write the pump
makes is checked against the token (``lua/advance.lua``, ``lua/assign.lua``), so a paused
former leader cannot publish after a new one took over.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import asyncpg

from allocator.queue_scripts import QueueScripts
from allocator.queue_view import QueueView, Step, still_waiting
from allocator.stock_count import Count, StockCounter
from flashsale.errors import QueueLost
from flashsale.fairness import record, record_lost
from flashsale.keys import SaleKeys
from flashsale.outages import log_failure
from flashsale.queue_marks import Mark, QueueMarks
from flashsale.records import text
from flashsale.shuffle import member_of, shuffle_order

log = logging.getLogger("flashsale.pump")

NOSHOW_PRIOR = 0.2  # assumed before any admission window has closed
PRIOR_WEIGHT = 20  # ... with the weight of this many observed admissions
RATE_HISTORY_MS = 5_000  # short enough for the ETAs to follow a change of the rate
ASSIGN_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Inputs:
    serving: int
    tail: int
    cutoff: int | None
    available: int  # units free now, summed over the sale's SKUs
    held: int  # units in active or paying holds: they may still come back
    outstanding: int  # admitted, not reserved, window still open
    noshow: float
    credit: float  # admissions the rate allows now
    capacity: int
    noshow_ceiling: float
    all_preloaded: bool


@dataclass(frozen=True, slots=True)
class Plan:
    serving: int
    cutoff: int | None
    sold_out: bool
    admitted: int


def plan(s: Inputs) -> Plan:
    """One tick's decision, as a pure function of what the pump read."""
    units = s.available + s.held
    if s.all_preloaded and units == 0:
        return Plan(s.serving, s.serving, True, 0)
    show = max(0.05, 1.0 - s.noshow)
    room_capacity = s.capacity - s.outstanding
    room_inventory = math.ceil(max(0.0, s.available - s.outstanding * show) / show)
    waiting = still_waiting(s.tail, s.serving, s.cutoff, False)
    admit = max(0, min(int(s.credit), room_capacity, room_inventory, waiting))
    serving = s.serving + admit
    # Positions beyond this could only be reached if more than noshow_ceiling of the admitted
    # buyers walked away; slack absorbs rounding and a few more.
    floor_show = max(0.05, 1.0 - s.noshow_ceiling)
    reach = math.ceil(max(0.0, units - (s.outstanding + admit) * floor_show) / floor_show)
    offer = serving + reach + max(5, math.ceil(0.1 * units))
    cutoff = offer if s.cutoff is None else min(s.cutoff, offer)
    return Plan(serving, cutoff, False, admit)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SaleSnapshot:
    view: QueueView
    available: int
    held: int
    preloaded: bool
    claimed: int
    claimed_lapsed: int
    lapsed_through: int


@dataclass
class AdmissionPump:
    """The pump of one sale. Call :meth:`tick` periodically; it is a no-op unless this
    process holds the sale's lease."""

    queue: QueueScripts
    pool: asyncpg.Pool
    sale_id: str
    skus: list[str]
    owner: str
    lease_ms: int = 2000
    noshow_ceiling: float = 0.5
    token: int = 0
    steps: list[Step] = field(default_factory=list)
    credit: float = 0.0
    last_tick: float = 0.0
    history: deque[tuple[int, int, bool]] = field(default_factory=deque)
    last: Plan | None = None
    noshow: float = NOSHOW_PRIOR
    outstanding: int = 0
    view: QueueView | None = None  # the sale as last read (its admission window, its pauses)
    clock_offset_ms: int = 0  # Redis TIME minus this host's clock, as of the last step
    seed: str | None = None
    lost: bool = False  # the waiting room was not live at the last tick
    marks: QueueMarks | None = None  # counters seen, checkpointed for a restore
    next_tick: float = 0.0  # time.monotonic() before which the service skips this pump
    busy: bool = True  # buyers are waiting or the sale is opening (see tick)
    buckets: dict[str, int] = field(default_factory=dict)  # SKUs split into stock buckets
    recorded: bool = False  # the pre-queue's order is recorded in Postgres (fairness)
    recording: asyncio.Task[None] | None = None  # the record being written
    seeding: asyncio.Task[None] | None = None  # the seed being read ahead of the opening
    tail: int = 0  # the last position handed out, as of the last step
    counter: StockCounter = field(default_factory=StockCounter)  # its stock, as last counted

    @property
    def count(self) -> Count | None:
        return self.counter.count

    @property
    def counting(self) -> asyncio.Task[None] | None:
        return self.counter.counting

    @property
    def stock(self) -> dict[str, tuple[int, int]]:
        """SKU: (available, held), as last counted."""
        return self.count.by_sku if self.count is not None else {}

    @property
    def keys(self) -> SaleKeys:
        return SaleKeys(self.sale_id)

    async def tick(self) -> Plan | None:
        """Renew (or take) the lease, then make one step. None when not the leader."""
        token = await self.queue.acquire(self.keys, self.owner, self.lease_ms)
        if token == 0:
            self.token = 0
            return None
        if self.token and token == self.token + 1:
            # Its own lease, taken again once lapsed: the next token is this one's, so nobody
            # led between, and what it measured (the rate the ETAs quote, its steps) holds.
            log.warning("pump for %s renewed its lease late, past %d ms (the allocator's "
                        "loop was busy): fencing token %d", self.sale_id, self.lease_ms,
                        token)  # fmt: skip
            self.token = token
        elif token != self.token:  # newly elected: start from what Redis says
            log.info("pump for %s is leader (fencing token %d)", self.sale_id, token)
            self.token = token
            self.steps = await self.queue.steps_after(self.keys, 0)
            self.credit = 0.0
            self.history.clear()
        now = time.monotonic()
        elapsed = min(1.0, now - self.last_tick) if self.last_tick else 0.0
        self.last_tick = now
        snap = await self._read()
        view = snap.view
        # Busy: buyers wait, or the sale opens within 2 s or opened 10 s ago or less. An idle
        # sale's pump can tick slowly: nobody is kept waiting by it.
        redis_now = int(time.time() * 1000) + self.clock_offset_ms
        self.busy = (view.tail > view.serving or (view.pre > 0 and not view.shuffled)
                     or -2000 <= redis_now - view.starts_at_ms <= 10_000)  # fmt: skip
        if not view.preloaded or view.status == "ended":
            self.busy = False
            return None
        if self.count is None:  # the first count of a sale of many SKUs, beside (see _read)
            return None
        if self.seed is None and not view.shuffled and self.seeding is None:
            # Read ahead of the opening, in the background: the draw then needs no Postgres,
            # and an outage at the opening does not keep the pre-queue waiting.
            self.seeding = asyncio.create_task(self._read_seed())
        if view.sealed and not view.shuffled:
            # Draw the pre-queue and admit its first buyers in the same step: the front of
            # the queue is admitted one step after the opening, as the ETAs promise.
            if not await self._shuffle():
                return None
            snap = await self._read()
            view = snap.view
        if view.shuffled and not self.recorded and self.recording is None:
            # In the background: admission does not wait for Postgres.
            self.recording = asyncio.create_task(self._record(view.pre))
        rate = max(1, view.admission_rate)
        # Up to half a second's worth, or what accrued since the last tick if more: slow ticks
        # keep the rate, and no tick spends more than a second's worth.
        self.credit = min(self.credit + rate * elapsed, max(1.0, rate * max(0.5, elapsed)))
        self.view = view
        lapsed = snap.lapsed_through
        noshow_count = lapsed - snap.claimed_lapsed
        self.noshow = (noshow_count + NOSHOW_PRIOR * PRIOR_WEIGHT) / (lapsed + PRIOR_WEIGHT)
        self.outstanding = max(0, view.serving - snap.claimed - noshow_count)
        started = view.sealed
        inputs = Inputs(
            serving=view.serving, tail=view.tail if started else 0, cutoff=view.cutoff,
            available=snap.available, held=snap.held, outstanding=self.outstanding,
            noshow=self.noshow, credit=self.credit if view.status == "active" else 0.0,
            capacity=view.capacity, noshow_ceiling=self.noshow_ceiling,
            all_preloaded=snap.preloaded,
        )  # fmt: skip
        decided = plan(inputs) if started else Plan(view.serving, None, False, 0)
        # Nothing measured (no buyer waited long enough): the configured rate, as at the start.
        measured = self._rates()
        p50, p10 = measured or (rate, rate / 2)
        try:
            result = await self.queue.advance(
                self.keys, self.token, serving=decided.serving, cutoff=decided.cutoff,
                sold_out=decided.sold_out,
                published={
                    "rate_p50": f"{p50:.3f}", "rate_p10": f"{p10:.3f}",
                    "rate_measured": "1" if measured else "0",
                    "noshow": f"{self.noshow:.4f}", "outstanding": str(self.outstanding),
                    "available": str(snap.available), "held": str(snap.held),
                },
            )  # fmt: skip
        except QueueLost:
            # Admitting now could pass positions Redis forgot; the reconciler restores them.
            if not self.lost:
                log.warning("the waiting room of %s is not live in Redis; waiting for the "
                            "reconciler to restore it", self.sale_id)  # fmt: skip
            self.lost = True
            return None
        self.lost = False
        if result is not None and self.marks is not None:
            self.marks.note(self.sale_id, Mark(
                result.tail, result.serving, view.pre, result.cutoff, view.sealed,
                view.shuffled, decided.sold_out or view.sold_out,
            ))  # fmt: skip
        if result is None:
            log.warning("pump for %s was fenced out (token %d)", self.sale_id, self.token)
            self.token = 0
            return None
        self.clock_offset_ms = result.now_ms - int(time.time() * 1000)
        admitted = result.serving - view.serving
        self.credit = max(0.0, self.credit - admitted)
        if admitted > 0:
            self.steps.append(Step(result.serving, result.now_ms))
        self.tail = result.tail
        self.history.append((result.now_ms, result.serving, result.tail > result.serving))
        while self.history and self.history[0][0] < result.now_ms - RATE_HISTORY_MS:
            self.history.popleft()
        self.last = Plan(result.serving, result.cutoff, decided.sold_out, admitted)
        return self.last

    async def _read(self) -> SaleSnapshot:
        """The sale as it is, with the last stock count (none before the first one of a sale
        counted beside its ticks lands: ``count`` stays None)."""
        lapsed = self._lapsed_through()
        snap = await self.counter.read(self.queue, self.keys, self.skus, self.buckets,
                                       claims_through=lapsed, busy=self.busy)  # fmt: skip
        count = self.count or Count(0, 0, False, {}, 0.0)
        return SaleSnapshot(snap.view, count.available, count.held,
                            bool(self.skus) and count.preloaded, snap.claimed,
                            snap.claimed_through, lapsed)  # fmt: skip

    def _lapsed_through(self) -> int:
        """The last position whose admission window has closed, judged on Redis's clock (the
        steps carry Redis times; the offset comes from the last step)."""
        now_ms = int(time.time() * 1000) + self.clock_offset_ms
        view = self.view
        if view is None:
            return 0

        def closes(step: Step) -> int:  # as the gateways judge it: not while paused
            return view.window_closes_ms(step.at_ms, now_ms)

        closed = bisect.bisect_left(self.steps, now_ms, key=closes)
        return self.steps[closed - 1].to if closed else 0

    def _rates(self) -> tuple[float, float] | None:
        """Admissions per second over 1 s windows of the last ``RATE_HISTORY_MS`` with buyers
        waiting at both ends (the pump, not the arrivals, set the pace): median and 10th
        percentile, for the ETAs the gateways quote. None without such a window."""
        samples: list[float] = []
        points = list(self.history)
        j = 0
        for i, (t, serving, waiting) in enumerate(points):
            while j < i and t - points[j + 1][0] >= 1000:
                j += 1
            t0, serving0, waiting0 = points[j]
            if t - t0 >= 1000 and waiting0 and waiting:
                samples.append((serving - serving0) * 1000 / (t - t0))
        return (quantile(samples, 0.5), quantile(samples, 0.1)) if samples else None

    async def _read_seed(self) -> None:
        try:
            self.seed = await self.pool.fetchval(
                "SELECT shuffle_seed FROM sales WHERE id = $1", self.sale_id
            )
        except Exception as exc:  # noqa: BLE001 - read again at a later tick, or at the draw
            log_failure(log, f"could not read the shuffle seed of {self.sale_id} yet", exc)
        finally:
            self.seeding = None

    async def _shuffle(self) -> bool:
        """Assign positions 1..pre to the pre-queue by the seeded permutation; False when it
        could not (no seed, or fenced out)."""
        if self.seed is None:
            self.seed = await self.pool.fetchval(
                "SELECT shuffle_seed FROM sales WHERE id = $1", self.sale_id
            )
        if self.seed is None:
            log.error("sale %s has no shuffle seed in Postgres", self.sale_id)
            return False
        members = await self.queue.client.hgetall(self.keys.members)
        buyers = [text(b) for b, p in members.items() if int(p) == 0]
        order = shuffle_order(self.seed, self.sale_id, buyers)
        chunks = [order[i : i + ASSIGN_CHUNK] for i in range(0, len(order), ASSIGN_CHUNK)] or [[]]
        for number, chunk in enumerate(chunks):
            start = number * ASSIGN_CHUNK
            pairs = [(buyer, start + i + 1) for i, buyer in enumerate(chunk)]
            if not await self.queue.assign(
                self.keys, self.token, pairs, last=number == len(chunks) - 1
            ):
                log.warning("shuffle of %s fenced out", self.sale_id)
                self.token = 0
                return False
        log.info("shuffled the pre-queue of %s: %d buyers", self.sale_id, len(order))
        return True

    async def _record(self, pre: int) -> None:
        """Record the shuffled pre-queue (members in position order, their Merkle root) for
        the public fairness check, once per sale, by whichever leader gets to it: from the
        positions Redis holds, so a leader that did not shuffle records the same. An outage
        only delays it to a later tick; admission does not wait for it."""
        try:
            members = await self.queue.client.hgetall(self.keys.members)
            placed = sorted((int(p), text(b)) for b, p in members.items() if 1 <= int(p) <= pre)
            if [p for p, _ in placed] != list(range(1, pre + 1)):
                log.warning(
                    "pre-queue of %s: %d of %d positions in Redis (a restored room); its order "
                    "cannot be recorded", self.sale_id, len(placed), pre,
                )  # fmt: skip
                await record_lost(self.pool, self.sale_id)  # the public record says why
                self.recorded = True  # said once; nothing later can complete it
                return
            await record(self.pool, self.sale_id, [member_of(self.sale_id, b) for _, b in placed])
            self.recorded = True
        except Exception as exc:  # noqa: BLE001 - a later tick records it
            log_failure(log, f"could not record the pre-queue of {self.sale_id} yet", exc)
        finally:
            self.recording = None

    async def resign(self) -> None:
        for task in (self.seeding, self.counting):
            if task is not None:
                task.cancel()
        if self.recording is not None:  # let the fairness record finish (it is idempotent)
            await asyncio.wait([self.recording], timeout=5)
        if self.token:
            await self.queue.release(self.keys, self.owner)
            self.token = 0
