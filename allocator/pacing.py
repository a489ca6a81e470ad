"""How often the background loops visit each SKU in scope.

The outbox relay, the hold sweeper and the outbox backlog gauge each look at every SKU of
every sale in which a hold can still live. Each visit is a Redis command and, on the
allocator's side, Python work for its request and its answer. At a fixed interval per SKU,
that cost grows with the number of SKUs: a 10,000-SKU sale with nothing to do kept one
allocator process at a whole core, for as long as it stayed in scope (live, then a hold TTL
and a minute after it ended). So a loop visits each SKU at its own interval while few are in
scope, and spreads a fixed number of visits a second over them when many are: the interval
grows with the SKU count instead of the cost.

The budget is shared out sale by sale (:func:`sale_periods`): a sale of a few SKUs keeps its
interval beside a catalogue sale of 200,000, whose SKUs share what is left. Paced as one
scope, the hot sale's expired holds came back, and its outbox was read, only as often as the
catalogue's: every 40 s and every 200 s.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

from flashsale.keys import SkuKeys


def period(skus: int, interval_s: float, visits_per_s: float) -> float:
    """Seconds between two visits of each of ``skus`` SKUs: ``interval_s``, or longer so the
    whole scope costs no more than ``visits_per_s`` visits a second."""
    return max(interval_s, skus / visits_per_s)


def share_out(sizes: Mapping[str, int], interval_s: float, visits_per_s: float) -> dict[str, float]:
    """Seconds between two visits of each SKU, per sale of ``sizes`` (its SKUs in scope): the
    smallest sales first, each takes what its SKUs need at ``interval_s`` or an even share of
    the budget left, whichever is less. The whole scope costs no more than ``visits_per_s``
    visits a second, and one sale alone is paced as :func:`period` paces it."""
    periods: dict[str, float] = {}
    left, budget = len(sizes), visits_per_s
    for sale, skus in sorted(sizes.items(), key=lambda item: item[1]):
        share = budget / left
        periods[sale] = period(skus, interval_s, share)
        budget -= skus / periods[sale]
        left -= 1
    return periods


def sale_periods(scope: list[SkuKeys], interval_s: float, visits_per_s: float) -> dict[str, float]:
    """:func:`share_out` for the sales of ``scope``."""
    return share_out(Counter(keys.sale_id for keys in scope), interval_s, visits_per_s)


class SalePace:
    """:func:`sale_periods` of the scope last asked about, worked out again only when the
    scope is another list or has another length (the scopes are replaced when they change,
    and working it out for 200,000 SKUs takes tens of milliseconds)."""

    def __init__(self, interval_s: float, visits_per_s: float) -> None:
        self.interval_s = interval_s
        self.visits_per_s = visits_per_s
        self._scope: list[SkuKeys] | None = None
        self._size = 0
        self.periods: dict[str, float] = {}
        self.longest = interval_s  # the longest of the periods

    def of(self, scope: list[SkuKeys]) -> dict[str, float]:
        """The period of each sale of ``scope``."""
        if scope is not self._scope or len(scope) != self._size:
            self.periods = sale_periods(scope, self.interval_s, self.visits_per_s)
            self.longest = max(self.periods.values(), default=self.interval_s)
            self._scope, self._size = scope, len(scope)
        return self.periods


class SaleTurns:
    """For the loops that visit every SKU of a sale at once (the sweeper, the backlog gauge,
    the reconciler's passes): which sales are due now, each at its own period
    (:func:`share_out`), and how long until the next one is. A sale new to the scope is due
    at once; after that its turns fall on ticks a whole number of intervals apart, the same
    for every sale, so sales that came at different moments share their visits (fifty small
    sales: one sweep call every interval, not fifty). A sale's ticks are at least its period
    apart, so the budget holds."""

    def __init__(self, interval_s: float, visits_per_s: float) -> None:
        self.interval_s = interval_s
        self.visits_per_s = visits_per_s
        self.periods: dict[str, float] = {}
        self.longest = interval_s  # the longest of the periods
        self._next: dict[str, float] = {}

    def due(self, sizes: Mapping[str, int] | None, now: float) -> list[str]:
        """The sales due at ``now``, each due again a period later; ``sizes``: the SKUs of each
        sale in scope now (None: as last given)."""
        if sizes is not None:
            self.periods = share_out(sizes, self.interval_s, self.visits_per_s)
            self.longest = max(self.periods.values(), default=self.interval_s)
            self._next = {sale: self._next.get(sale, now) for sale in sizes}
        sales = [sale for sale, at in self._next.items() if at <= now]
        for sale in sales:
            # From the tick it was due at (a loop wakes a little after it), or from now when
            # it is a period behind or more.
            was, period = self._next[sale], self.periods[sale]
            self._next[sale] = self._after(now if now - was >= period else was, period)
        return sales

    def _after(self, base: float, period: float) -> float:
        """The tick of the turn after one at ``base``: the first at least ``period`` later.
        After a turn off the ticks (a sale new to the scope, a retry, a loop far behind) the
        one before it, so that joining the ticks costs no wait: a sale that had just entered
        waited up to a period and an interval for its second turn (a reconciler pass, 10 s)."""
        if self.interval_s <= 0:
            return base + period
        after = self._tick(base + period)
        if abs(self._tick(base) - base) > 1e-6:  # off the ticks
            after = max(after - self.interval_s, self._tick(base))
        return after

    def _tick(self, at: float) -> float:
        """The first tick at or after ``at``."""
        return math.ceil(at / self.interval_s - 1e-9) * self.interval_s

    def retry(self, sales: Sequence[str], at: float) -> None:
        """``sales`` due again at ``at``, not a period later (their visit failed)."""
        for sale in sales:
            if sale in self._next:
                self._next[sale] = min(self._next[sale], at)

    @property
    def sales(self) -> list[str]:
        """The sales in scope, as last given."""
        return list(self._next)

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until the next sale is due (the interval when none is known)."""
        if not self._next:
            return self.interval_s
        return max(0.0, min(self._next.values()) - now)


class SaleRounds(SaleTurns):
    """:class:`SaleTurns` over a scope of SKUs: the SKUs of the sales due."""

    def __init__(self, interval_s: float, visits_per_s: float) -> None:
        super().__init__(interval_s, visits_per_s)
        self._groups: dict[str, list[SkuKeys]] = {}
        self._scope: list[SkuKeys] | None = None
        self._size = 0
        self._looked = 0.0

    def due_skus(self, scope: list[SkuKeys], now: float) -> list[SkuKeys]:
        """The SKUs of the sales due at ``now`` (:meth:`due_groups`)."""
        return [keys for skus in self.due_groups(scope, now).values() for keys in skus]

    def due_groups(self, scope: list[SkuKeys], now: float) -> dict[str, list[SkuKeys]]:
        """The sales due at ``now`` and the SKUs of each. The scope is looked at in full when
        it is another list or has another length, and at least once every longest period (a
        scope edited in place)."""
        sizes = None
        if (
            scope is not self._scope
            or len(scope) != self._size
            or now >= self._looked + self.longest
        ):
            groups: dict[str, list[SkuKeys]] = {}
            for keys in scope:
                groups.setdefault(keys.sale_id, []).append(keys)
            self._groups, self._scope, self._size, self._looked = groups, scope, len(scope), now
            sizes = {sale: len(skus) for sale, skus in groups.items()}
        return {sale: self._groups[sale] for sale in self.due(sizes, now)}


# SKUs a schedule looks at in one stretch of the loop (see Schedule.look).
LOOKED_AT_ONCE = 10_000


class Schedule:
    """When each SKU of a scope is next due, earliest first (a heap), so a loop that runs
    every few milliseconds takes only the SKUs due instead of looking at every one.

    A SKU that had work is due again at once (:meth:`busy`); one that had none waits a delay
    that starts at ``first_s`` and doubles up to the ceiling the loop gives (:meth:`idle`).
    One that never had work waits a delay drawn between ``first_s`` and the ceiling, then the
    ceiling: the SKUs of a large scope spread their visits over it from the start, instead of
    being visited all together in each of the doubling's first rounds (100,000 quiet SKUs: all
    of them in each of fifteen rounds, two seconds of the allocator's loop each).

    The scope is looked at in full when it is another list than last time or has another
    length, and at least every ``rescan_s`` (a scope edited in place): a SKU new to it is due
    at once, one gone from it is dropped. A SKU taken by :meth:`due` is off the schedule until
    :meth:`busy` or :meth:`idle` puts it back; after a round that failed half-way,
    :meth:`forget` makes every SKU not put back due at the next look."""

    def __init__(self, rescan_s: float, first_s: float = 0.01, seed: int | None = None) -> None:
        self.rescan_s = rescan_s
        self.first_s = first_s
        self._heap: list[tuple[float, int, SkuKeys]] = []
        # The last delay of a SKU that had no work (0.0: it had work at its last visit).
        self._delay: dict[SkuKeys, float] = {}
        self._random = random.Random(seed)  # noqa: S311 - spreads visits; nothing secret
        self._scope: list[SkuKeys] | None = None
        self._size = 0
        self._looked = 0.0
        self._serial = itertools.count()

    def stale(self, skus: list[SkuKeys], now: float) -> bool:
        """Whether ``skus`` is to be looked at in full before the next :meth:`due`."""
        return skus is not self._scope or len(skus) != self._size or (
            now >= self._looked + self.rescan_s)  # fmt: skip

    async def look(self, skus: list[SkuKeys], now: float) -> None:
        """The full look :meth:`due` takes at a stale scope, ``LOOKED_AT_ONCE`` SKUs at a
        time, the loop's other tasks let run between: 240,000 SKUs looked at in one stretch
        held the allocator's loop for 1.4 s."""
        if self.stale(skus, now):
            for _ in self._looking(skus, now):
                await asyncio.sleep(0)

    def _looking(self, skus: list[SkuKeys], now: float) -> Iterator[None]:
        """The scope looked at in full (a SKU new to it due at ``now``, one gone from it
        dropped), yielding after each ``LOOKED_AT_ONCE`` SKUs."""
        when: dict[SkuKeys, float] = {}
        for start in range(0, len(self._heap), LOOKED_AT_ONCE):
            when.update((keys, at) for at, _, keys in self._heap[start : start + LOOKED_AT_ONCE])
            yield
        heap: list[tuple[float, int, SkuKeys]] = []
        delay: dict[SkuKeys, float] = {}
        for start in range(0, len(skus), LOOKED_AT_ONCE):
            part = skus[start : start + LOOKED_AT_ONCE]
            heap += [(when.get(keys, now), next(self._serial), keys) for keys in part]
            delay.update((keys, self._delay[keys]) for keys in part if keys in self._delay)
            yield
        heapq.heapify(heap)
        self._heap, self._delay = heap, delay
        self._scope, self._size, self._looked = skus, len(skus), now

    def due(self, skus: list[SkuKeys], now: float, most: int | None = None) -> list[SkuKeys]:
        """The SKUs of ``skus`` due at ``now``, earliest first, at most ``most`` of them (the
        rest stay due). A stale scope is looked at here in one stretch, unless :meth:`look`
        did it first."""
        if self.stale(skus, now):
            for _ in self._looking(skus, now):
                pass
        taken: list[SkuKeys] = []
        while self._heap and self._heap[0][0] <= now and len(taken) != most:
            taken.append(heapq.heappop(self._heap)[2])
        return taken

    def busy(self, keys: SkuKeys, now: float) -> None:
        self._delay[keys] = 0.0
        heapq.heappush(self._heap, (now, next(self._serial), keys))

    def idle(self, keys: SkuKeys, now: float, ceiling_s: float) -> None:
        last = self._delay.get(keys)
        if last is None:  # never had work: at the ceiling from a point drawn within it
            delay = self._random.uniform(min(self.first_s, ceiling_s), ceiling_s)
            self._delay[keys] = ceiling_s
        else:
            delay = min(ceiling_s, max(self.first_s, 2 * last))
            self._delay[keys] = delay
        heapq.heappush(self._heap, (now + delay, next(self._serial), keys))

    def forget(self) -> None:
        self._scope = None
