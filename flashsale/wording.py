"""How a count reads in what the engine prints and answers: "1 SKU", "2 SKUs", "1,000 units";
how a value reads in a line of text; and a command to run next, as the reader's shell can."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from typing import Any


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` (with thousands separators) and ``noun``, in the plural unless ``n`` is 1: a final
    s, or ``plural`` for a noun whose plural is not that ("process", "processes")."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {plural or noun + 's'}"


def span(seconds: float) -> str:
    """A length of time as a person says it, rounded: "45 s", "10 min", "5 h", "3 days"."""
    for unit, size, past in (("s", 1, 120), ("min", 60, 120), ("h", 3600, 48)):
        if seconds < past * size:
            return f"{round(seconds / size)} {unit}"
    return counted(round(seconds / 86400), "day")


def said(value: Any) -> str:
    """``value`` in a line of text: a mapping or a list as JSON (not Python's notation), None
    as "-", anything else as itself."""
    if value is None:
        return "-"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def rerun(*words: str) -> str:
    """``flashsale WORDS`` as the shell this command ran from can run it: the program as it was
    typed (``.venv/bin/flashsale`` from ``make``, ``flashsale`` from the PATH), after the
    stack's folder when FLASHSALE_HOME named it."""
    program = sys.argv[0] if os.path.basename(sys.argv[0]) == "flashsale" else "flashsale"
    found = shutil.which("flashsale")
    if found and os.path.isabs(program) and os.path.realpath(found) == os.path.realpath(program):
        program = "flashsale"
    home = os.environ.get("FLASHSALE_HOME")
    where = f"FLASHSALE_HOME={shlex.quote(home)} " if home else ""
    return f"{where}{program} {shlex.join(words)}"
