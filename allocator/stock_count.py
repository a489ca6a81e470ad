"""A sale's stock, summed over its SKUs and their buckets, as the admission pump plans with it.

Counting the stock of a sale of many SKUs is slow (about 0.5 s for 100,000 SKUs here, more on a
busy machine: a read per SKU, each answer parsed here). Once a count takes ``INLINE_COUNT_S``
or more, the next ones run beside the pump's ticks, each starting ``COUNT_SHARE`` times its
duration after the last began (``IDLE_COUNT_SHARE`` times while nobody waits and the opening is
not near: a catalogue an hour before its opening was counted for nobody, a third of the time),
and the ticks go on at their pace with the last count: the stock they plan with is that much
older, and admission keeps the sale's rate. A sale of more than ``INLINE_COUNT_KEYS`` SKUs (and
buckets) is counted beside from its first count, which the ticks wait for, keeping the lease,
before they admit anyone: inside a tick, a first count longer than the lease let it lapse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from allocator.queue_scripts import QueueScripts, RoomSnapshot
from flashsale.keys import SaleKeys, SkuKeys, bucket_keys
from flashsale.outages import log_failure

log = logging.getLogger("flashsale.pump")

INLINE_COUNT_S = 0.05  # a stock count that took longer runs beside the ticks from then on
INLINE_COUNT_KEYS = 5000  # a sale of more stock keys is counted beside the ticks from the first
COUNT_SHARE = 3  # ... starting at most once per this many times its duration
IDLE_COUNT_SHARE = 30  # ... or this many, while nobody waits and the opening is not near


@dataclass(frozen=True, slots=True)
class Count:
    """The stock of a sale, summed over its SKUs and their buckets."""

    available: int
    held: int
    preloaded: bool  # every SKU (bucket) of the sale is in Redis
    by_sku: dict[str, tuple[int, int]]  # SKU: (available, held)
    took: float  # seconds the count took


class StockCounter:
    """The counts of one sale's stock: the last one, and the one running beside the ticks."""

    def __init__(self) -> None:
        self.count: Count | None = None  # the last stock count
        self.counting: asyncio.Task[None] | None = None  # a count beside the ticks
        self.began = 0.0  # time.monotonic() at which the last count beside began
        # The SKUs' stock keys, and the SKUs and buckets they were made of: 60,000 made
        # afresh took 0.1 to 0.2 s of the loop at each count.
        self._made: tuple[list[str], dict[str, int], list[SkuKeys]] | None = None

    async def read(self, queue: QueueScripts, keys: SaleKeys, skus: list[str],
                   buckets: dict[str, int], *, claims_through: int,
                   busy: bool) -> RoomSnapshot:  # fmt: skip
        """The sale's snapshot, with a count of ``skus`` made in it while counts are quick;
        else one started beside, when due (at the pace of a sale ``busy`` or not)."""
        stock = self._keys(keys.sale_id, skus, buckets)
        count = self.count
        if len(stock) <= INLINE_COUNT_KEYS if count is None else count.took < INLINE_COUNT_S:
            began = time.monotonic()
            snap = await queue.snapshot(keys, claims_through=claims_through, skus=stock)
            self.count = counted(stock, snap.stock, time.monotonic() - began)
            return snap
        share = COUNT_SHARE if busy else IDLE_COUNT_SHARE
        took = count.took if count is not None else 0.0  # a first one that failed
        if self.counting is None and time.monotonic() >= self.began + share * took:
            self.counting = asyncio.create_task(self._count(queue, keys, stock))
        return await queue.snapshot(keys, claims_through=claims_through)

    def _keys(self, sale_id: str, skus: list[str], buckets: dict[str, int]) -> list[SkuKeys]:
        """The stock keys of ``skus``, made again only when they or their ``buckets`` changed:
        each is the same object while they do not (the allocator's discovery keeps them, and
        replaces them rather than change them)."""
        made = self._made
        if made is None or not (made[0] is skus or made[0] == skus) \
                or not (made[1] is buckets or made[1] == buckets):  # fmt: skip
            stock = [k for s in skus for k in bucket_keys(sale_id, s, buckets.get(s, 1))]
            made = self._made = (skus, buckets, stock)
        return made[2]

    async def _count(self, queue: QueueScripts, keys: SaleKeys, stock: list[SkuKeys]) -> None:
        """A count beside the ticks; a failed one is made again."""
        self.began = time.monotonic()
        try:
            snap = await queue.snapshot(keys, skus=stock)
            self.count = counted(stock, snap.stock, time.monotonic() - self.began)
        except Exception as exc:  # noqa: BLE001 - the ticks go on with the last count
            log_failure(log, f"could not count the stock of {keys.sale_id}", exc)
        finally:
            self.counting = None


def counted(stock: list[SkuKeys], counts: list[tuple[int, int] | None], took: float) -> Count:
    by_sku: dict[str, tuple[int, int]] = {}
    for keys, units in zip(stock, counts, strict=True):
        if units is not None:
            available, held = by_sku.get(keys.sku, (0, 0))
            by_sku[keys.sku] = (available + units[0], held + units[1])
    return Count(sum(a for a, _ in by_sku.values()), sum(h for _, h in by_sku.values()),
                 all(units is not None for units in counts), by_sku, took)  # fmt: skip
