"""Running the engine's coroutines: on uvloop where it is installed (CPython on Linux and
macOS, where its wheels exist), on asyncio's own loop elsewhere. Everything works on both;
uvloop is faster.

A process given ``FLASHSALE_HEARTBEAT`` (a file; the supervisor of ``flashsale up`` gives one
to each of its processes) touches it from its loop every ``BEAT_S``: a file that grows old
tells the supervisor the loop no longer turns (blocked, or the process paused)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

_uvloop: ModuleType | None
try:
    import uvloop as _uvloop
except ImportError:  # a platform without uvloop: asyncio's loop does the same work
    _uvloop = None


HEARTBEAT_ENV = "FLASHSALE_HEARTBEAT"
BEAT_S = 1.0


def run(main: Coroutine[Any, Any, T]) -> T:
    """``main`` to completion on a new event loop (uvloop's when available), beating the
    heartbeat file ``FLASHSALE_HEARTBEAT`` names, if it names one."""
    beat = os.environ.get(HEARTBEAT_ENV)
    if beat:
        main = _beating(main, Path(beat))
    if _uvloop is None:
        return asyncio.run(main)
    result: T = _uvloop.run(main)
    return result


async def _beating(main: Coroutine[Any, Any, T], path: Path) -> T:
    async def beat() -> None:
        while True:
            # On the loop itself, on purpose (a microsecond's syscall): a blocked loop misses it.
            with contextlib.suppress(OSError):  # the supervisor's folder gone: it is stopping
                path.touch()  # noqa: ASYNC240
            await asyncio.sleep(BEAT_S)

    beating = asyncio.create_task(beat())
    try:
        return await main
    finally:
        beating.cancel()


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
