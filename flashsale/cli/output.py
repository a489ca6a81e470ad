"""What commands print: lines as they happen (flushed, so progress shows under a pipe) and JSON."""

from __future__ import annotations

import sys
from typing import Any

import orjson


def out(line: str = "") -> None:
    print(line, flush=True)


def dump_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def fail(message: str) -> None:
    """One ``flashsale: error:`` line on stderr (the caller chooses the exit code)."""
    print(f"flashsale: error: {message}", file=sys.stderr)
