"""flashsale.event_loop.LoopThread: a coroutine run on a loop of its own, so its steps do not
queue behind a busy main loop (the gateway's announcer runs its Kafka producer there)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from flashsale.event_loop import LoopThread


async def test_a_call_runs_on_another_thread_and_returns_or_raises_there() -> None:
    runner = LoopThread("test")

    async def where() -> tuple[int, asyncio.AbstractEventLoop]:
        return threading.get_ident(), asyncio.get_running_loop()

    async def fails() -> None:
        raise KeyError("from the thread")

    try:
        ident, loop = await runner.call(where())
        assert ident != threading.get_ident()
        assert loop is not asyncio.get_running_loop()
        with pytest.raises(KeyError, match="from the thread"):
            await runner.call(fails())
    finally:
        await runner.stop()


async def test_cancelling_the_caller_cancels_the_coroutine_and_stop_runs_the_last_step() -> None:
    runner = LoopThread("test")
    started, cancelled, closed = threading.Event(), threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def close() -> None:
        closed.set()

    caller = asyncio.create_task(runner.call(forever()))
    assert await asyncio.to_thread(started.wait, 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.to_thread(cancelled.wait, 5)
    assert cancelled.is_set()
    thread = threading.enumerate()
    await runner.stop(close())
    assert closed.is_set()
    assert not [
        t for t in threading.enumerate() if t.name == "test" and t in thread and t.is_alive()
    ]


async def test_its_steps_go_on_while_the_main_loop_is_busy() -> None:
    """Ten awaited steps finish while the main thread is busy for a second: on the main loop
    they could not even begin until it was free again."""
    runner = LoopThread("test")
    done: list[float] = []

    async def steps() -> None:
        for _ in range(10):
            await asyncio.sleep(0.005)
        done.append(time.monotonic())

    try:
        call = asyncio.create_task(runner.call(steps()))
        await asyncio.sleep(0)  # the call is handed to the thread
        busy_until = time.monotonic() + 1.0
        while time.monotonic() < busy_until:  # pure Python: the GIL is let go every 5 ms
            pass
        await call
        assert done and done[0] < busy_until
    finally:
        await runner.stop()
