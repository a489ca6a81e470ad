"""How a count reads in what the engine prints and answers: "1 SKU", "2 SKUs", "1,000 units"."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``n`` (with thousands separators) and ``noun``, in the plural unless ``n`` is 1. For
    the engine's own nouns, whose plural is a final s."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
