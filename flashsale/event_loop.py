"""Running the engine's coroutines: on uvloop where it is installed (CPython on Linux and
macOS, where its wheels exist), on asyncio's own loop elsewhere. Everything works on both;
uvloop is faster."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

_uvloop: ModuleType | None
try:
    import uvloop as _uvloop
except ImportError:  # a platform without uvloop: asyncio's loop does the same work
    _uvloop = None


def run(main: Coroutine[Any, Any, T]) -> T:
    """``main`` to completion on a new event loop (uvloop's when available)."""
    if _uvloop is None:
        return asyncio.run(main)
    result: T = _uvloop.run(main)
    return result


def name() -> str:
    """Which loop :func:`run` uses: ``uvloop`` or ``asyncio``."""
    return "asyncio" if _uvloop is None else "uvloop"
