"""A SKU's sold counter in Postgres (``sale_skus.sold``) counted again from its confirmed
orders, when the two disagree.

The workers move an order to CONFIRMED and add its units to the counter in one statement, so
the two part only when one of them was changed by hand or restored from another time. The
orders are the truth. The counter is what ``sale status`` shows as confirmed and what the
``CHECK (sold <= stock_total)`` holds at each confirmation: counting more than the orders,
it refused the last units' confirmations; left apart, each pass also compared Redis with it,
rebuilt the SKU from the orders (which changed nothing) and did so again the next pass.

Found where a SKU's Redis sold count differs from the counter (:mod:`reconciler.skus`,
:mod:`reconciler.buckets`), read with the orders in one statement, so that an order
confirmed meanwhile counts on both sides.
"""

from __future__ import annotations

import asyncpg

from reconciler.report import Repair

# Under the SKU's row: a confirmation waits for this recount, or this recount for it, and
# the count (a statement of its own, so read once the row is held) sees it either way.
_HELD = "SELECT sold, stock_total FROM sale_skus WHERE sale_id = $1 AND sku = $2 FOR UPDATE"
_CONFIRMED_UNITS = """
SELECT coalesce(sum(quantity), 0)::bigint FROM orders
WHERE sale_id = $1 AND sku = $2 AND state = 'CONFIRMED'
"""
_SET = "UPDATE sale_skus SET sold = $3 WHERE sale_id = $1 AND sku = $2"


async def recount_sold(pool: asyncpg.Pool, sale_id: str, sku: str) -> Repair | None:
    """Set the SKU's sold counter to the units of its confirmed orders; the repair, or None
    when they agree by now. Raises RuntimeError when the orders confirm more units than the
    stock: an oversell in Postgres, which a person must look into (``flashsale audit``)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_HELD, sale_id, sku)
        if row is None:
            return None
        confirmed = int(await conn.fetchval(_CONFIRMED_UNITS, sale_id, sku))
        if confirmed == row["sold"]:
            return None
        if confirmed > row["stock_total"]:
            raise RuntimeError(
                f"{sale_id}/{sku}: its confirmed orders hold {confirmed} units, more than its "
                f"stock of {row['stock_total']}: the sold counter cannot count them "
                f"(`flashsale audit {sale_id}`)"
            )
        await conn.execute(_SET, sale_id, sku, confirmed)
    return Repair(sale_id, sku, "recount_sold", None, {"sold": row["sold"]}, {"sold": confirmed})
