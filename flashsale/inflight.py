"""One read in flight per key: concurrent callers asking for the same thing share one call.

For a per-process copy that every request of a spike may find due at the same moment (a
sale's public summary, its SKUs' limits, the storefront's signing keys): the first caller
starts the read, the others wait for its result or its exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, NamedTuple, TypeVar

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


class Copy(NamedTuple, Generic[Value]):
    """A process's copy of something read elsewhere, and how long it took to read."""

    expires: float  # time.monotonic() from which it is due
    read_at: float  # ... at which its read began
    took: float  # seconds the read took
    value: Value


class InFlight(Generic[Key, Value]):
    """The reads in flight, by key."""

    def __init__(self) -> None:
        self._reads: dict[Key, asyncio.Future[Value]] = {}

    async def once(self, key: Key, read: Callable[[], Awaitable[Value]]) -> Value:
        """``read()``'s result, shared with every caller of ``key`` while it runs."""
        # Shielded: a caller that goes away does not cancel the read the others wait for.
        return await asyncio.shield(self.start(key, read))

    def start(self, key: Key, read: Callable[[], Awaitable[Value]]) -> asyncio.Future[Value]:
        """``read()`` started for ``key`` unless it runs already, without waiting for it (a
        copy refreshed while the old one is served); its outcome is collected either way."""
        running = self._reads.get(key)
        if running is None:
            running = self._reads[key] = asyncio.ensure_future(read())
            running.add_done_callback(lambda done: self._done(key, done))
        return running

    def _done(self, key: Key, done: asyncio.Future[Value]) -> None:
        self._reads.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every caller may have gone away
