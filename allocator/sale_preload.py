"""A sale's preload: its configuration and stock copied from Postgres into Redis.

The first preload opens the sale's waiting room; later ones bring Redis in line with what
changed in Postgres (new SKUs, a new configuration, a SKU's raised total), keeping every held
and sold unit. :class:`allocator.sale_admin.SaleAdmin` builds on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from allocator.sale_reads import SaleReads, in_parts
from allocator.sale_scripts import Preload, PreloadResult, summed
from flashsale.errors import Conflict, listed
from flashsale.keys import SaleKeys, SkuKeys, bucket_keys
from flashsale.sales import fetch_skus, sale_hash, sale_state, sku_meta


@dataclass
class SalePreloads(SaleReads):
    """The preload, and the check that a sale can still sell what is added to it."""

    async def preload(self, sale_id: str, *, force: bool = False,
                      progress: Callable[[int, int], None] | None = None,
                      ) -> list[PreloadResult]:  # fmt: skip
        """Copy configuration and stock into Redis, atomically per SKU; ``progress`` is told
        (SKUs done, SKUs in all) after each part of them.

        Unchanged SKUs are left alone. A SKU with held or sold units is refused unless
        ``force``; even then held and sold units are kept. Raises Conflict when any SKU
        was refused (the others are still brought in line).

        The sale's row is held (``FOR UPDATE``) until the end: a change of the sale (a pause,
        a SKU removed, new settings) waits for the preload, which writes the sale as it
        read it, and a preload waits for a change under way. A sale paused during its first
        preload of 12,000 SKUs was paused on the SKUs Redis had by then only, and the
        preload wrote the others active after it. Two preloads take turns (held ``FOR
        SHARE``, each then waited on the other to update the row: a deadlock).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            sale = await self.sale_row(conn, sale_id, lock=True)
            skus = await fetch_skus(conn, sale_id)
            if sale_state(sale) == "ended":
                raise Conflict(f"sale {sale_id} has ended; nothing to preload", code="sale_ended")
            if sale["preloaded_at"] is not None and any(s["preloaded_at"] is None for s in skus):
                await self._unless_sold_out(sale_id, "SKUs loaded")
            if not skus:
                raise Conflict(
                    f"sale {sale_id} has no SKUs; add some with `flashsale sale import`",
                    code="no_skus",
                )
            # The SKUs in one piece (most) go in pipelined batches, a part of the sale at a
            # time; each bucketed SKU on its own.
            results: list[PreloadResult] = []
            for part in in_parts(skus):
                whole = [_preload(sale, sku) for sku in part if sku["buckets"] == 1]
                batch = iter(await self.scripts.preload_many(whole, force=force))
                results += [next(batch) if sku["buckets"] == 1 else await self._sync_sku(
                            sale, sku, force=force) for sku in part]  # fmt: skip
                if progress is not None:
                    progress(len(results), len(skus))
            await self.scripts.put_sale(
                SaleKeys(sale_id), sale_hash(sale, skus), open_queue=sale["preloaded_at"] is None
            )
            loaded = [r.sku for r in results if not r.outcome.startswith("refused")]
            await conn.execute(
                "UPDATE sale_skus SET preloaded_at = coalesce(preloaded_at, now())"
                " WHERE sale_id = $1 AND sku = ANY($2::text[])", sale_id, loaded,
            )  # fmt: skip
            refusal = _refusal(sale_id, results, force=force)
            if refusal is None:
                await conn.execute(
                    "UPDATE sales SET preloaded_at = now(), updated_at = now() WHERE id = $1",
                    sale_id,
                )
        if refusal is not None:
            raise refusal
        return results

    async def _sync_sku(
        self, sale: asyncpg.Record, sku: asyncpg.Record, *, force: bool
    ) -> PreloadResult:
        if sku["buckets"] == 1:
            [result] = await self.scripts.preload_many([_preload(sale, sku)], force=force)
            return result
        return await self._sync_buckets(sale["id"], sku, sku_meta(sale, sku), force=force,
                                        first=sku["preloaded_at"] is None)  # fmt: skip

    async def _sync_buckets(self, sale_id: str, sku: asyncpg.Record, meta: dict[str, str], *,
                            force: bool, first: bool) -> PreloadResult:  # fmt: skip
        """A SKU split into stock buckets. The first preload spreads the stock evenly and
        records the SKU's total on bucket 0; later ones write the configuration only (the
        buckets' stock moves by transfers) and raise the total on bucket 0
        (``lua/grow.lua``), from where dry buckets borrow the new units."""
        total, count = sku["stock_total"], sku["buckets"]
        keys = bucket_keys(sale_id, sku["sku"], count)
        results = []
        for k in keys:
            share = total // count + (1 if k.bucket < total % count else 0)
            config = {**meta, "stock_total": str(total)} if first and k.bucket == 0 else meta
            results.append(
                await self.scripts.preload(
                    k, total=share if first else None, meta=config, force=force, first=first
                )
            )
        outcomes = [r.outcome for r in results]
        if not first and "refused_lost" not in outcomes:
            grown, _ = await self.transfers.grow(keys, total)
            if grown == "unavailable":
                outcomes.append("refused_lost")
            elif grown == "grown":
                outcomes.append("loaded")
        counts = summed(await self.scripts.stock(keys)) or summed([r.counts for r in results])
        assert counts is not None
        for worst in ("refused_lost", "refused_below_committed", "refused_committed", "loaded"):
            if worst in outcomes:
                return PreloadResult(sku["sku"], worst, counts)
        return PreloadResult(sku["sku"], "unchanged", counts)

    async def _unless_sold_out(self, sale_id: str, what: str) -> None:
        """A Conflict when the sale's waiting room has told its buyers it is sold out, or
        tells every new one so (its queue reached the cutoff): it stays so (a cutoff and a
        verdict only move one way), and ``what`` could never be sold to them."""
        sold_out, cutoff = await self.scripts.closed(SaleKeys(sale_id))
        if sold_out:
            raise Conflict(f"sale {sale_id} is sold out: its waiting room has told every buyer "
                           f"so, and {what} now could never be sold; put them in a new sale",
                           code="sale_sold_out")  # fmt: skip
        if cutoff is not None:
            raise Conflict(f"sale {sale_id} admits nobody after place {cutoff} of its queue, "
                           "which is full up to it: every new buyer is told it is sold out, so "
                           f"{what} now could never be sold to them; put them in a new sale",
                           code="sale_cutoff_reached")  # fmt: skip


def _preload(sale: asyncpg.Record, sku: asyncpg.Record) -> Preload:
    """A SKU in one piece, as its preload sends it."""
    return Preload(SkuKeys(sale["id"], sku["sku"]), sku["stock_total"], sku_meta(sale, sku),
                   sku["preloaded_at"] is None)  # fmt: skip


def _refusal(sale_id: str, results: Sequence[PreloadResult], *, force: bool) -> Conflict | None:
    """What a preload refused, as the Conflict it raises: SKUs Redis lost, or SKUs whose
    held and sold units the new configuration would not cover (None: nothing)."""
    lost = [r.sku for r in results if r.outcome == "refused_lost"]
    if lost:
        return Conflict(
            f"Redis no longer holds {listed(lost, what='SKUs')} of sale {sale_id} (or is "
            "rebuilding it): run `flashsale reconcile --once` to rebuild it from Postgres",
            code="rebuild_needed",
        )  # fmt: skip
    refused = [r for r in results if r.outcome.startswith("refused")]
    if refused:
        detail = listed([
            f"{r.sku}: {r.counts.held} held and {r.counts.sold} sold units"
            + (" exceed the new stock" if r.outcome == "refused_below_committed" else "")
            for r in refused
        ], what="SKUs refused", sep="; ")  # fmt: skip
        hint = "" if force else " (re-run with --force; held and sold units are kept)"
        return Conflict(f"preload refused for {detail}{hint}", code="preload_refused")
    return None
