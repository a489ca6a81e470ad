"""Each gateway process's copy of the waiting-room counters of the sales it serves.

Status polls are answered from here: the counters of a sale are read from Redis at most every
``REFRESH_S`` (one pipelined round trip: sale configuration, queue counters, the admission
steps since the last read, and Redis ``TIME`` to relate this host's clock to Redis's), however
many buyers poll.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field

from allocator.queue_scripts import QueueScripts
from allocator.queue_view import QueueView, Step
from flashsale.keys import SaleKeys
from flashsale.queue_marks import QueueMarks

REFRESH_S = 0.1
JOIN_RATE_S = 5.0  # the join rate is measured over this long


@dataclass
class Counters:
    """This process's copy of one sale's waiting-room counters and admission steps."""

    view: QueueView
    steps: list[Step] = field(default_factory=list)
    fetched: float = 0.0  # time.monotonic() of the read
    offset_ms: int = 0  # Redis TIME minus this host's clock at the read
    joined: list[tuple[float, int]] = field(default_factory=list)  # (read at, buyers who joined)

    @property
    def join_rate(self) -> float:
        """Joins per second over the last ``JOIN_RATE_S`` (as this process's reads saw the
        queue grow; every process sees the same queue)."""
        if len(self.joined) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.joined[0], self.joined[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def redis_now_ms(self) -> int:
        return int(time.time() * 1000) + self.offset_ms

    def admitted_at_ms(self, position: int) -> int | None:
        """Redis time of the step that admitted ``position`` (None: not known here)."""
        index = bisect.bisect_left(self.steps, position, key=lambda s: s.to)
        return self.steps[index].at_ms if index < len(self.steps) else None


class CounterCache:
    """Counters per sale, refreshed on demand at most every ``refresh_s``; concurrent requests
    share one refresh."""

    def __init__(
        self, queue: QueueScripts, refresh_s: float = REFRESH_S, marks: QueueMarks | None = None
    ) -> None:
        self.queue = queue
        self.refresh_s = refresh_s
        self.marks = marks  # what this process has seen, checkpointed for a restore
        self._by_sale: dict[str, Counters] = {}
        self._pending: dict[str, asyncio.Future[Counters]] = {}

    def peek(self, sale_id: str) -> Counters | None:
        """The counters of ``sale_id`` if this process read them within ``refresh_s``, without
        asking Redis (None otherwise)."""
        current = self._by_sale.get(sale_id)
        if current is not None and time.monotonic() - current.fetched < self.refresh_s:
            return current
        return None

    async def get(self, sale_id: str) -> Counters:
        known = self.peek(sale_id)
        if known is not None:
            return known
        current = self._by_sale.get(sale_id)
        pending = self._pending.get(sale_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Counters] = asyncio.get_running_loop().create_future()
        self._pending[sale_id] = future
        try:
            fresh = await self._refresh(sale_id, current)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            self._pending.pop(sale_id, None)
        future.set_result(fresh)
        return fresh

    async def _refresh(self, sale_id: str, current: Counters | None) -> Counters:
        known = current.steps[-1].to if current and current.steps else 0
        before = time.time()
        keys = SaleKeys(sale_id)
        snap = await self.queue.snapshot(keys, steps_after=known, redis_time=True)
        if current is not None and snap.view.restored_ms != current.view.restored_ms and known:
            # Restored after a loss: the admission steps were written again (windows started
            # afresh); the ones kept here are not Redis's any more.
            current, known = None, 0
            snap = await self.queue.snapshot(keys, steps_after=0, redis_time=True)
        local_ms = (before + time.time()) * 500
        view = snap.view
        if self.marks is not None and view.live:
            self.marks.note(sale_id, view.mark())
        elif self.marks is not None and sale_id in self.marks.seen:
            self.marks.urgent.set()  # the waiting room was lost: checkpoint what we saw now
        steps = current.steps if current is not None and view.serving >= known else []
        steps = steps + snap.steps
        if len(self._by_sale) > 1024:
            self._by_sale.clear()
        offset = int(snap.redis_ms - local_ms)
        now = time.monotonic()
        joined = [j for j in (current.joined if current else []) if j[0] >= now - JOIN_RATE_S]
        joined.append((now, view.tail if view.sealed else view.pre))
        fresh = Counters(view, steps, now, offset, joined)
        self._by_sale[sale_id] = fresh
        return fresh
