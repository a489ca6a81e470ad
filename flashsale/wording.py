"""How a count reads in what the engine prints and answers: "1 SKU", "2 SKUs", "1,000 units";
and how a value reads in a line of text."""

from __future__ import annotations

import json
from typing import Any


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` (with thousands separators) and ``noun``, in the plural unless ``n`` is 1: a final
    s, or ``plural`` for a noun whose plural is not that ("process", "processes")."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {plural or noun + 's'}"


def said(value: Any) -> str:
    """``value`` in a line of text: a mapping or a list as JSON (not Python's notation), None
    as "-", anything else as itself."""
    if value is None:
        return "-"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)
