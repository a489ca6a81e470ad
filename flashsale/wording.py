"""How a count reads in what the engine prints and answers: "1 SKU", "2 SKUs", "1,000 units"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` (with thousands separators) and ``noun``, in the plural unless ``n`` is 1: a final
    s, or ``plural`` for a noun whose plural is not that ("process", "processes")."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {plural or noun + 's'}"
