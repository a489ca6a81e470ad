"""What commands print: lines as they happen (flushed, so progress shows under a pipe) and JSON."""

from __future__ import annotations

import asyncio
import os
import select
import sys
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson


def out(line: str = "") -> None:
    print(line, flush=True)


def dump_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


PROGRESS_EVERY_S = 2.0  # a long operation says how far it has got this often
T = TypeVar("T")


class StatusLine:
    """A line on stderr for whoever waits for a long operation: rewritten in place on a
    terminal (and cleared at the end), one line each time otherwise."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.began = time.monotonic()
        self.in_place = sys.stderr.isatty()
        self.shown = False

    def say(self, line: str) -> None:
        if self.in_place:
            sys.stderr.write(f"\r{self.what}: {line}\x1b[K")
            sys.stderr.flush()
            self.shown = True
        else:
            print(f"{self.what}: {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class Progress(StatusLine):
    """How far a long operation has got (it calls this with what is done and the whole), at
    most every ``PROGRESS_EVERY_S``, once it has run that long: a short one says nothing."""

    def __init__(self, what: str, unit: str) -> None:
        super().__init__(what)
        self.unit = unit
        self.said = self.began

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.said >= PROGRESS_EVERY_S:
            self.said = now
            self.say(f"{done:,} of {total:,} {self.unit}")


class Stages(StatusLine):
    """What a long operation is doing, for work that cannot count its way through (it names
    its stages by calling this), every ``PROGRESS_EVERY_S`` while it runs."""

    doing = "starting"

    def __call__(self, doing: str) -> None:
        self.doing = doing

    async def over(self, work: Awaitable[T]) -> T:
        async def tick() -> None:
            while True:
                await asyncio.sleep(PROGRESS_EVERY_S)
                self.say(f"{self.doing} ({time.monotonic() - self.began:.0f} s)")

        ticker = asyncio.ensure_future(tick())
        try:
            return await work
        finally:
            ticker.cancel()
            self.close()


def warn(message: str) -> None:
    """One ``flashsale: warning:`` line on stderr: said, and the command goes on."""
    print(f"flashsale: warning: {message}", file=sys.stderr)


def fail(message: str) -> None:
    """One ``flashsale: error:`` line on stderr (the caller chooses the exit code)."""
    print(f"flashsale: error: {message}", file=sys.stderr)


def reader_gone() -> bool:
    """Whether the reader of stdout has stopped reading (``flashsale sale list | head -1``): the
    write end of a pipe whose reader closed it polls as an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout, or not one that polls
        return False


def after_reader_gone() -> int:
    """Nothing more to say to nobody: stdout goes to /dev/null (so the exit's flush cannot fail
    again) and the exit code is the one a shell shows for a command SIGPIPE ended."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
    return 128 + 13  # SIGPIPE
