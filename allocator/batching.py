"""Coalesce concurrent calls into one batched call.

A caller awaits :meth:`Coalescer.submit` and gets its own result or its own exception. Items
that arrive within ``window`` seconds of the first waiting one, or as soon as ``max_batch`` are
waiting, go to ``call`` as one list. At most ``max_waiting`` items may wait; beyond that
:class:`~flashsale.errors.Overloaded` is raised at once, so a spike becomes fast refusals
instead of an unbounded queue.

A Redis timeout or lost connection leaves the outcome unknown: the whole batch is retried with
the same items. Only batched calls that are idempotent per item may use this (``reserve`` by
idempotency key, ``join`` by buyer), so an item decided before the timeout is replayed, never
applied twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, Protocol, TypeVar

import redis.exceptions

from flashsale.errors import Overloaded, Unavailable

log = logging.getLogger("flashsale.allocator")

# Outcome unknown: the script may or may not have run. Safe to retry an idempotent batch, on
# a fresh connection. Not after a timeout: a server that did not answer within
# FLASHSALE_REDIS_TIMEOUT is hung or cut off, and asking it twice more tripled the wait for
# the 503 (the callers' own retries, by idempotency key or buyer, settle the outcome).
RETRYABLE = (redis.exceptions.ConnectionError,)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """Batches items for one target (a SKU, a sale). Create one per target per process."""

    def __init__(
        self,
        call: Callable[[list[Item]], Awaitable[list[Result]]],
        name: str,
        *,
        window: float = 0.001,
        max_batch: int = 256,
        max_waiting: int = 10_000,
        attempts: int = 3,
        retry_backoff: float = 0.05,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.call = call
        self.name = name
        self.window = window
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.attempts = attempts
        self.retry_backoff = retry_backoff
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # batched calls made (for metrics and tests)

    async def submit(self, item: Item) -> Result:
        """The result for ``item``. Raises Overloaded when the wait queue is full and
        Unavailable when the target stays unreachable after retries."""
        if self._closed:
            raise Unavailable(f"{self.name}: closed", code="allocator_closed")
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} calls already waiting for {self.name}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, future))
        if len(self._waiting) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            self._waiting = self._waiting[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._call([item for item, _ in batch])
        except BaseException as exc:
            _fail((future for _, future in batch), exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if len(results) != len(batch):  # a broken call: every caller hears of it, none hangs
            _fail((future for _, future in batch), RuntimeError(
                f"{self.name}: {len(results)} results for {len(batch)} items"))  # fmt: skip
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _call(self, items: list[Item]) -> list[Result]:
        self.batches += 1
        for attempt in range(1, self.attempts + 1):
            try:
                return await self.call(items)
            except RETRYABLE as exc:
                if attempt == self.attempts:
                    raise Unavailable(
                        f"Redis did not answer for {self.name} after {attempt} attempts"
                    ) from exc
                log.warning(
                    "outcome unknown for %s (%r); retrying %d items unchanged",
                    self.name, exc, len(items),
                )  # fmt: skip
                await asyncio.sleep(self.retry_backoff * attempt)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Stop taking items, decide what is waiting, and wait for batches in flight."""
        self._closed = True
        if self._waiting:
            self._flush()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)


def _fail(futures: Iterable[asyncio.Future[Result]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)


class Closeable(Protocol):
    async def aclose(self) -> None: ...


Key = TypeVar("Key", bound=Hashable)
Member = TypeVar("Member", bound=Closeable)


class PerKey(Generic[Key, Member]):
    """One batching member per key (per SKU, per sale), created on first use; closed together."""

    def __init__(self, factory: Callable[[Key], Member]) -> None:
        self.factory = factory
        self._members: dict[Key, Member] = {}

    def get(self, key: Key) -> Member:
        member = self._members.get(key)
        if member is None:
            member = self._members[key] = self.factory(key)
        return member

    async def aclose(self) -> None:
        await asyncio.gather(*(member.aclose() for member in self._members.values()))
