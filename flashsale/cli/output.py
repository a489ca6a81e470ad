"""What commands print: lines as they happen (flushed, so progress shows under a pipe) and JSON."""

from __future__ import annotations

import os
import select
import sys
from typing import Any

import orjson


def out(line: str = "") -> None:
    print(line, flush=True)


def dump_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


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
