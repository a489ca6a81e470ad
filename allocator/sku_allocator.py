"""Per-SKU allocators: coalesce concurrent reservations for one SKU into one script call.

A caller awaits :meth:`SkuAllocator.reserve` and gets its own :class:`ReserveResult` or its own
exception. Batching, back-pressure (:class:`~flashsale.errors.Overloaded`) and the retry of a
batch whose outcome is unknown live in :class:`~allocator.batching.Coalescer`. A retried batch
keeps its idempotency keys, so a request granted before a timeout is replayed, never
decremented twice.
"""

from __future__ import annotations

from allocator.batching import Coalescer, PerKey
from allocator.hold_scripts import MAX_RESERVE_BATCH, HoldScripts, ReserveRequest
from flashsale.keys import SkuKeys
from flashsale.records import ReserveResult


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

        async def call(requests: list[ReserveRequest]) -> list[ReserveResult]:
            return await scripts.reserve(keys, requests)

        self._coalescer = Coalescer(
            call, f"SKU {keys.sku}", window=window, max_batch=max_batch,
            max_waiting=max_waiting, attempts=attempts, retry_backoff=retry_backoff,
        )  # fmt: skip

    @property
    def batches(self) -> int:
        """Script calls made so far (for metrics and tests)."""
        return self._coalescer.batches

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Decide one request. Raises Overloaded when the wait queue is full, Unavailable when
        Redis stays unreachable after retries, InvalidInput for a malformed request."""
        request.validate()
        return await self._coalescer.submit(request)

    async def aclose(self) -> None:
        """Stop taking requests, decide what is waiting, and wait for batches in flight."""
        await self._coalescer.aclose()


class Allocators(PerKey[SkuKeys, SkuAllocator]):
    """One :class:`SkuAllocator` per SKU of this process, created on first use."""

    def __init__(self, scripts: HoldScripts, **options: float) -> None:
        super().__init__(lambda keys: SkuAllocator(scripts, keys, **options))  # type: ignore[arg-type]
        self.scripts = scripts

    def for_sku(self, sale_id: str, sku: str) -> SkuAllocator:
        return self.get(SkuKeys(sale_id, sku))
