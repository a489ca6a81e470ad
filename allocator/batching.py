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

:class:`PackedCalls` sends the packed commands of the callers of one turn of the loop together,
each call its own replies: nothing is retried there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import redis.exceptions
from redis.commands.core import AsyncScript

from allocator.redis_calls import Command, send_packed
from flashsale.clients import RedisClient
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


class PackedCalls:
    """Packed commands of concurrent callers sent together: every call made in one turn of the
    loop goes in one write per node and comes back in one read. The admission pumps of many
    sales tick at the same moments; each tick's three round trips (lease, read, step) cost the
    allocator more in redis-py's machinery than in what they carry, about 0.8 ms of CPU per
    idle sale a second. A call's replies are its own; an error answer among them is raised
    to it alone, a failed connection to every call of the turn (as it would have been)."""

    def __init__(self, client: RedisClient, script: AsyncScript | None = None) -> None:
        self.client, self.script = client, script
        self._waiting: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((commands, future))
        replies = await future
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                raise reply
        return replies

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> None:
        flat = [command for commands, _ in batch for command in commands]
        try:
            replies = await send_packed(self.client, flat, script=self.script,
                                        raise_on_error=False)  # fmt: skip
        except BaseException as exc:
            _fail((future for _, future in batch), exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        at = 0
        for commands, future in batch:
            if not future.done():
                future.set_result(replies[at : at + len(commands)])
            at += len(commands)
