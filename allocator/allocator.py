"""Per-SKU allocators: coalesce concurrent reservations for one SKU into one script call.

A caller awaits :meth:`SkuAllocator.reserve` and gets its own :class:`ReserveResult` or its own
exception. Requests that arrive within ``window`` seconds of the first waiting one, or as soon
as ``max_batch`` are waiting, go to Redis as one ``reserve`` call. At most ``max_waiting``
requests may wait; beyond that :class:`~flashsale.errors.Overloaded` is raised at once, so a
spike becomes fast refusals instead of an unbounded queue.

A Redis timeout leaves the outcome unknown: the whole batch is retried with the *same*
idempotency keys, so a request that was granted before the timeout is replayed, never
decremented twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import redis.exceptions

from allocator.scripts import MAX_RESERVE_BATCH, HoldScripts, ReserveRequest, ReserveResult
from flashsale.errors import Overloaded, Unavailable
from flashsale.keys import SkuKeys

log = logging.getLogger("flashsale.allocator")

# Outcome unknown: the script may or may not have run. Safe to retry thanks to idempotency keys.
RETRYABLE = (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)

_Waiter = tuple[ReserveRequest, "asyncio.Future[ReserveResult]"]


class SkuAllocator:
    """The coalescer for one SKU. Create one per SKU per process; share it across requests."""

    def __init__(
        self,
        scripts: HoldScripts,
        keys: SkuKeys,
        *,
        window: float = 0.001,
        max_batch: int = 256,
        max_waiting: int = 10_000,
        attempts: int = 3,
        retry_backoff: float = 0.05,
    ) -> None:
        if not 0 < max_batch <= MAX_RESERVE_BATCH:
            raise ValueError(f"max_batch must be within 1..{MAX_RESERVE_BATCH}")
        self.scripts = scripts
        self.keys = keys
        self.window = window
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.attempts = attempts
        self.retry_backoff = retry_backoff
        self._waiting: list[_Waiter] = []
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # script calls made (for metrics and tests)

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Decide one request. Raises Overloaded when the wait queue is full, Unavailable when
        Redis stays unreachable after retries, InvalidInput for a malformed request."""
        if self._closed:
            raise Unavailable("allocator is closed", code="allocator_closed")
        request.validate()
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} reservations already waiting for {self.keys.sku}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ReserveResult] = loop.create_future()
        self._waiting.append((request, future))
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
            batch, self._waiting = (
                self._waiting[: self.max_batch],
                self._waiting[self.max_batch :],
            )
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _run(self, batch: list[_Waiter]) -> None:
        requests = [request for request, _ in batch]
        try:
            results = await self._call(requests)
        except BaseException as exc:
            _fail(batch, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _call(self, requests: list[ReserveRequest]) -> list[ReserveResult]:
        self.batches += 1
        for attempt in range(1, self.attempts + 1):
            try:
                return await self.scripts.reserve(self.keys, requests)
            except RETRYABLE as exc:
                if attempt == self.attempts:
                    raise Unavailable(
                        f"Redis did not answer for {self.keys.sku} after {attempt} attempts"
                    ) from exc
                log.warning(
                    "reserve outcome unknown for %s (%r); retrying %d requests with the same keys",
                    self.keys.sku, exc, len(requests),
                )  # fmt: skip
                await asyncio.sleep(self.retry_backoff * attempt)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Stop taking requests, decide what is waiting, and wait for batches in flight."""
        self._closed = True
        if self._waiting:
            self._flush()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)


def _fail(batch: Iterable[_Waiter], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)


class Allocators:
    """One :class:`SkuAllocator` per SKU, created on first use."""

    def __init__(self, scripts: HoldScripts, **options: float) -> None:
        self.scripts = scripts
        self.options = options
        self._by_sku: dict[SkuKeys, SkuAllocator] = {}

    def for_sku(self, sale_id: str, sku: str) -> SkuAllocator:
        keys = SkuKeys(sale_id, sku)
        allocator = self._by_sku.get(keys)
        if allocator is None:
            allocator = SkuAllocator(self.scripts, keys, **self.options)  # type: ignore[arg-type]
            self._by_sku[keys] = allocator
        return allocator

    async def aclose(self) -> None:
        await asyncio.gather(*(a.aclose() for a in self._by_sku.values()))
