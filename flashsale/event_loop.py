"""Running the engine's coroutines: on uvloop where it is installed (CPython on Linux and
macOS, where its wheels exist), on asyncio's own loop elsewhere. Everything works on both;
uvloop is faster.

A process given ``FLASHSALE_HEARTBEAT`` (a file; the supervisor of ``flashsale up`` gives one
to each of its processes) touches it from its loop every ``BEAT_S``: a file that grows old
tells the supervisor the loop no longer turns (blocked, or the process paused).

Every loop :func:`run` runs sets a timer every ``WATCH_S`` and measures how late it runs
(:func:`lag`, the histogram ``flashsale_event_loop_lag_seconds`` of every service's
metrics): a stretch of work that holds the loop delays every request, renewal and read the
process has in hand."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from prometheus_client import Histogram, disable_created_metrics

T = TypeVar("T")

_uvloop: ModuleType | None
try:
    import uvloop as _uvloop
except ImportError:  # a platform without uvloop: asyncio's loop does the same work
    _uvloop = None


HEARTBEAT_ENV = "FLASHSALE_HEARTBEAT"
BEAT_S = 1.0
WATCH_S = 0.25  # the loop's timer, whose lateness is its lag
# Up to a pump's lease (2 s) and beyond: a lag that long lets leases lapse.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


@cache
def lag() -> Histogram:
    """This process's histogram of how late its loop ran the timers it set (registered on
    each service's registry by :func:`flashsale.ops_endpoints.build_info`; in a gateway of
    several processes, summed over them)."""
    # No _created series, as every service's (flashsale.ops_endpoints.build_info).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return Histogram(
        "flashsale_event_loop_lag_seconds",
        "How late the process's event loop ran a timer set every 0.25 s: the time every "
        "request, lease renewal and read in hand waited for a stretch of work to end",
        buckets=LAG_BUCKETS, registry=None,
    )  # fmt: skip


def run(main: Coroutine[Any, Any, T]) -> T:
    """``main`` to completion on a new event loop (uvloop's when available), measuring its
    lag, and beating the heartbeat file ``FLASHSALE_HEARTBEAT`` names, if it names one."""
    beat = os.environ.get(HEARTBEAT_ENV)
    main = _watched(main, Path(beat) if beat else None)
    if _uvloop is None:
        return asyncio.run(main)
    result: T = _uvloop.run(main)
    return result


async def _watched(main: Coroutine[Any, Any, T], beat: Path | None) -> T:
    watches = [asyncio.create_task(_lagging(lag()))]
    if beat is not None:
        watches.append(asyncio.create_task(_beating(beat)))
    try:
        return await main
    finally:
        for watch in watches:
            watch.cancel()


async def _lagging(histogram: Histogram) -> None:
    loop = asyncio.get_running_loop()
    while True:
        began = loop.time()
        await asyncio.sleep(WATCH_S)
        histogram.observe(max(0.0, loop.time() - began - WATCH_S))


async def _beating(path: Path) -> None:
    while True:
        # On the loop itself, on purpose (a microsecond's syscall): a blocked loop misses it.
        with contextlib.suppress(OSError):  # the supervisor's folder gone: it is stopping
            path.touch()  # noqa: ASYNC240
        await asyncio.sleep(BEAT_S)


def name() -> str:
    """Which loop :func:`run` uses: ``uvloop`` or ``asyncio``."""
    return "asyncio" if _uvloop is None else "uvloop"


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind :func:`run` uses."""
    return asyncio.new_event_loop() if _uvloop is None else _uvloop.new_event_loop()


class LoopThread:
    """An event loop in a thread of its own, for a few latency-sensitive round trips that must
    not wait their turn behind a busy main loop: under a spike a gateway's loop has thousands
    of ready callbacks, and each step of a conversation with a server (send, read the answer,
    wake the waiter) would queue behind them. Here each step waits at most for the main
    thread to let go of the GIL (every 5 ms at the latest), and the main loop is woken once,
    with the result.

    Coroutines given to :meth:`call` run on this loop: whatever they use (clients, locks) must
    be made there too."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = new_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result, run on this thread's loop. Cancelling the caller cancels it."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._started()))

    async def stop(self, last: Coroutine[Any, Any, None] | None = None) -> None:
        """Run ``last`` there (a client's close), then stop the loop and its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            if last is not None:
                last.close()
            return
        try:
            if last is not None:
                await self.call(last)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, 5.0)
            loop.close()
            self._loop = self._thread = None
