"""The Postgres rows of ``flashsale bench allocate``: the same decision ("may this buyer have
one unit?") made three ways on one row of a scratch table, for the ratios to the Redis rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from flashsale.settings import Settings
from loadtest.bench import Row

PG_TABLE = "bench_allocate_stock"

# Bench.measure: (name, what, operation, granted=units moved so far) -> the measured row
Measure = Callable[..., Awaitable[Row]]


async def postgres_rows(
    settings: Settings, sku: str, measure: Measure, *, stock: int, connections: int
) -> str:
    """Measure the three Postgres rows on a scratch table of ``stock`` units, over a pool of
    ``connections``; returns the server version."""
    pool = await asyncpg.create_pool(
        settings.require_database(), min_size=connections, max_size=connections, timeout=10
    )
    try:
        version = str(await pool.fetchval("SHOW server_version"))
        await pool.execute(
            f"CREATE TABLE IF NOT EXISTS {PG_TABLE} ("
            "sku text PRIMARY KEY, stock bigint NOT NULL CHECK (stock >= 0),"
            " version bigint NOT NULL DEFAULT 0)"
        )

        async def reset() -> None:
            await pool.execute(
                f"INSERT INTO {PG_TABLE} (sku, stock) VALUES ($1, $2) ON CONFLICT (sku)"
                " DO UPDATE SET stock = excluded.stock, version = 0",
                sku, stock,
            )  # fmt: skip

        async def sold() -> int:
            return stock - int(await pool.fetchval(
                f"SELECT stock FROM {PG_TABLE} WHERE sku = $1", sku
            ))  # fmt: skip

        async def for_update() -> None:
            async with pool.acquire() as conn, conn.transaction():
                left = await conn.fetchval(
                    f"SELECT stock FROM {PG_TABLE} WHERE sku = $1 FOR UPDATE", sku
                )
                if left >= 1:
                    await conn.execute(
                        f"UPDATE {PG_TABLE} SET stock = stock - 1 WHERE sku = $1", sku
                    )

        retries = 0

        async def optimistic() -> None:
            nonlocal retries
            async with pool.acquire() as conn:
                while True:
                    left, version = await conn.fetchrow(
                        f"SELECT stock, version FROM {PG_TABLE} WHERE sku = $1", sku
                    )
                    if left < 1:
                        return
                    status = await conn.execute(
                        f"UPDATE {PG_TABLE} SET stock = $2, version = version + 1"
                        " WHERE sku = $1 AND version = $3",
                        sku, left - 1, version,
                    )  # fmt: skip
                    if status == "UPDATE 1":
                        return
                    retries += 1

        async def conditional() -> None:
            await pool.fetchval(
                f"UPDATE {PG_TABLE} SET stock = stock - 1 WHERE sku = $1 AND stock >= 1"
                " RETURNING stock",
                sku,
            )

        rows = (
            ("pg_for_update", "SELECT ... FOR UPDATE, then UPDATE, in a transaction",
             for_update),
            ("pg_optimistic", "version column, compare-and-set UPDATE, retry", optimistic),
            ("pg_conditional_update", "UPDATE ... SET stock = stock - 1 WHERE stock >= 1",
             conditional),
        )  # fmt: skip
        for name, what, op in rows:
            await reset()
            retries = 0
            row = await measure(name, what, op, granted=sold)
            if name == "pg_optimistic":
                row.extra["retries_per_decision"] = round(retries / max(row.decisions, 1), 2)
        await pool.execute(f"DROP TABLE IF EXISTS {PG_TABLE}")
    finally:
        await pool.close()
    return version
