"""Per-SKU allocators: coalesce concurrent reservations for one SKU into one script call.

A caller awaits :meth:`SkuAllocator.reserve` and gets its own :class:`ReserveResult` or its own
exception. Batching, back-pressure (:class:`~flashsale.errors.Overloaded`) and the retry of a
batch whose outcome is unknown live in :class:`~allocator.batching.Coalescer`. A retried batch
keeps its idempotency keys, so a request granted before a timeout is replayed, never
decremented twice.

A SKU split into stock buckets has one coalescer per bucket; a buyer's requests go to their
bucket. When that bucket answers ``sold_out`` while others may have stock, the allocator
borrows units for it (:mod:`allocator.stock_buckets`) and asks again, so the SKU answers
``sold_out`` only once no bucket had a unit to lend (with the units it has, when fewer than
asked: by then they are all the SKU has free).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from allocator.batching import Coalescer, PerKey
from allocator.hold_scripts import MAX_RESERVE_BATCH, HoldScripts, ReserveRequest
from allocator.ids import routed_reservation_id
from allocator.stock_buckets import BucketScripts, Lent
from flashsale.keys import SkuKeys, bucket_for, bucket_keys
from flashsale.records import ReserveResult

# Borrow-and-ask-again rounds per request. Each round moves at least one unit (half of a
# lender's) into the bucket, and many requests share it; a request still unserved after this
# many is told sold_out with holds pending (a waitlist it may retry), never a final sold_out.
MAX_BORROWS = 64


class SkuAllocator:
    """The coalescers for one SKU (one per stock bucket). Create one per SKU per process;
    share it across requests."""

    def __init__(
        self,
        scripts: HoldScripts,
        keys: SkuKeys,
        *,
        buckets: int = 1,
        transfers: BucketScripts | None = None,
        on_borrow: Callable[[int], None] | None = None,
        with_holds: bool = False,
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
        self.buckets = buckets
        self.bucket_keys = bucket_keys(keys.sale_id, keys.sku, buckets)
        self.transfers = transfers or BucketScripts(scripts.client)
        self.borrowed = 0  # transfers into this process's buckets (for metrics and tests)
        self.on_borrow = on_borrow  # told the units of every transfer made
        self._borrowing: dict[int, asyncio.Task[Lent]] = {}
        self._short = [0] * buckets  # units wanted by requests waiting for a borrow, per bucket
        self._landing: set[asyncio.Future[str]] = set()  # credits of units lent, not yet landed

        def coalescer(bucket: SkuKeys) -> Coalescer[ReserveRequest, ReserveResult]:
            async def call(requests: list[ReserveRequest]) -> list[ReserveResult]:
                return await scripts.reserve(bucket, requests, with_holds=with_holds)

            name = f"SKU {keys.sku}" + (f" bucket {bucket.bucket}" if buckets > 1 else "")
            return Coalescer(
                call, name, window=window, max_batch=max_batch, max_waiting=max_waiting,
                attempts=attempts, retry_backoff=retry_backoff,
            )  # fmt: skip

        self._coalescers = [coalescer(k) for k in self.bucket_keys]

    @property
    def batches(self) -> int:
        """Script calls made so far (for metrics and tests)."""
        return sum(c.batches for c in self._coalescers)

    def bucket_of(self, buyer_id: str) -> int:
        """The stock bucket ``buyer_id`` reserves from (0 for a SKU in one bucket)."""
        return bucket_for(buyer_id, self.buckets)

    def new_id(self, buyer_id: str) -> str:
        """A fresh reservation id for a request of ``buyer_id``: it names the buyer's bucket."""
        keys = self.keys
        return routed_reservation_id(keys.sale_id, keys.sku, self.bucket_of(buyer_id),
                                     self.buckets)  # fmt: skip

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Decide one request. Raises Overloaded when the wait queue is full, Unavailable when
        Redis stays unreachable after retries, InvalidInput for a malformed request."""
        request.validate()
        if self.buckets == 1:
            return await self._coalescers[0].submit(request)
        bucket = self.bucket_of(request.buyer_id)
        coalescer = self._coalescers[bucket]
        result = await coalescer.submit(request)
        if request.admit is not None:  # passed the gate once: asked again, it is not counted
            request = replace(request, admit=request.admit.passed())
        for _ in range(MAX_BORROWS):
            if result.outcome != "sold_out":
                return result
            if result.left == 0:  # a final refusal remembered for the key (see remember)
                return result
            lent = await self._borrow(bucket, request.quantity)
            if not lent.units and lent.outcome != "moved":
                pending = result.holds_pending or lent.held > 0 or lent.outcome == "unavailable"
                # No other bucket had a unit: this one's are all the SKU has free (units of
                # another process's borrow still on their way aside), fewer than asked.
                left = result.left if lent.outcome == "empty" else None
                return ReserveResult("sold_out", holds_pending=pending, left=left)
            result = await coalescer.submit(request)
        if result.outcome == "sold_out":
            return ReserveResult("sold_out", holds_pending=True)
        return result

    async def remember(self, request: ReserveRequest, result: ReserveResult) -> bool:
        """Remember a final ``sold_out`` of a SKU in buckets under the request's key, in the
        buyer's bucket, which does not remember a refusal (it says only that the bucket is
        empty): a replay of the request is then refused again, without a borrow. A cluster
        gateway, whose claim is made apart from the decision, frees the admission for
        another key only then (see gateway.reservations). A replay of it is answered with
        ``left`` 0. False when a replay of the request was decided first."""
        keys = self.bucket_keys[self.bucket_of(request.buyer_id)]
        return await self.scripts.remember(keys, request, replace(result, left=0))

    async def _borrow(self, bucket: int, wanted: int) -> Lent:
        """Units for ``bucket`` from the others, one borrow in flight per bucket: requests that
        find the bucket dry meanwhile wait for it and ask again."""
        self._short[bucket] += wanted
        try:
            task = self._borrowing.get(bucket)
            if task is None:
                task = asyncio.ensure_future(self._take(bucket))
                self._borrowing[bucket] = task
                task.add_done_callback(lambda _: self._borrowing.pop(bucket, None))
            return await asyncio.shield(task)
        finally:
            self._short[bucket] -= wanted

    async def _take(self, bucket: int) -> Lent:
        """Ask the other buckets in turn (the next one first) until one lends; the answer
        says how many units came, and whether held units anywhere may still return. It asks
        for what every request now waiting on the bucket wants (those of one batch all join
        before it starts), so a burst needs one borrow, not one per halving. Units lent to
        another bucket and not yet credited are in no bucket: when every other bucket was dry
        while some were on their way, it waits for them to land and asks again."""
        await asyncio.sleep(0)
        wanted = self._short[bucket]
        receiver = self.bucket_keys[bucket]
        held, unavailable = 0, False
        for _ in range(MAX_BORROWS):  # each round waits for credits that landed meanwhile
            held, unavailable = 0, False
            for step in range(1, self.buckets):
                lender = self.bucket_keys[(bucket + step) % self.buckets]
                tid, lent = await self.transfers.lend(lender, receiver, wanted)
                if lent.units:
                    completing = self.transfers.complete(lender, receiver, tid, lent.units,
                                                         lent.incarnation)  # fmt: skip
                    landing = asyncio.ensure_future(completing)
                    self._landing.add(landing)
                    landing.add_done_callback(self._landing.discard)
                    await asyncio.shield(landing)
                    self.borrowed += 1
                    if self.on_borrow is not None:
                        self.on_borrow(lent.units)
                    return lent
                held += lent.held
                unavailable = unavailable or lent.outcome == "unavailable"
            if self._landing:
                await asyncio.wait(list(self._landing))  # credits only: they wait on nothing
                continue
            if held or unavailable:
                break
            return await self._settled(held)
        return Lent("unavailable" if unavailable else "empty", 0, held)

    async def _settled(self, held: int) -> Lent:
        """Every other bucket said it had nothing, and nothing held: the SKU is sold out for
        good, unless a transfer made whole between two of those asks (another process's,
        perhaps into this very bucket) was seen by none. A consistent cut of every bucket
        says: ``moved`` when a unit is free or on its way somewhere (ask again), else what
        is held."""
        cut = await self.transfers.snapshot(self.bucket_keys)
        stock = [units for units in cut.stock() if units is not None]
        if any(available for available, _ in stock) or cut.in_transfer:
            return Lent("moved", 0, held)
        return Lent("empty", 0, held + sum(h for _, h in stock))

    async def aclose(self) -> None:
        """Stop taking requests, decide what is waiting, and wait for batches in flight."""
        await asyncio.gather(*(c.aclose() for c in self._coalescers))


class Allocators(PerKey[tuple[str, str, int], SkuAllocator]):
    """One :class:`SkuAllocator` per SKU of this process, created on first use."""

    def __init__(self, scripts: HoldScripts, **options: Any) -> None:
        transfers = BucketScripts(scripts.client)

        def factory(key: tuple[str, str, int]) -> SkuAllocator:
            sale_id, sku, buckets = key
            return SkuAllocator(
                scripts, SkuKeys(sale_id, sku), buckets=buckets, transfers=transfers, **options
            )

        super().__init__(factory)
        self.scripts = scripts

    def for_sku(self, sale_id: str, sku: str, buckets: int = 1) -> SkuAllocator:
        """The allocator of ``sale_id``/``sku``, split into ``buckets`` stock buckets."""
        return self.get((sale_id, sku, buckets))
