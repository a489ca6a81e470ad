"""What commands print: lines as they happen (flushed, so progress shows under a pipe) and JSON."""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Any

import orjson


def out(line: str = "") -> None:
    print(line, flush=True)


def dump_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


PROGRESS_EVERY_S = 2.0  # a long operation says how far it has got this often


class Progress:
    """How far a long operation has got, on stderr, for whoever waits for it: a line at most
    every ``PROGRESS_EVERY_S``, once it has run that long (rewritten in place on a terminal,
    and cleared at the end); a short one says nothing."""

    def __init__(self, what: str, unit: str) -> None:
        self.what, self.unit = what, unit
        self.said = time.monotonic()
        self.in_place = sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.said < PROGRESS_EVERY_S:
            return
        self.said = now
        line = f"{self.what}: {done:,} of {total:,} {self.unit}"
        if self.in_place:
            sys.stderr.write(f"\r{line}\x1b[K")
            sys.stderr.flush()
            self.shown = True
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


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
