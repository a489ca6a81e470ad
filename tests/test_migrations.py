"""Migrations on a fresh database: applied once, re-runnable, recorded; schema guards hold."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from flashsale.errors import ConfigError
from flashsale.migrate import available, migrate, require_current

from .conftest import Cli
from .engine_users import postgres_user


async def test_migrations_apply_once_and_rerun_cleanly(fresh_dsn: str) -> None:
    conn = await asyncpg.connect(fresh_dsn)
    try:
        lines: list[str] = []
        first = await migrate(conn, progress=lines.append)
        assert first == [m.version for m in available()]
        assert first, "at least one migration ships"
        second = await migrate(conn, progress=lines.append)
        assert second == []
        assert lines[-1] == "schema up to date"
        recorded = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        assert {r["version"]: r["checksum"] for r in recorded} == {
            m.version: m.checksum for m in available()
        }
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {
            "sales", "sale_skus", "orders", "order_events", "payments", "inbox", "outbox",
        } <= tables  # fmt: skip
    finally:
        await conn.close()


async def test_a_database_migrated_by_a_newer_release_is_said_to_be(fresh_dsn: str) -> None:
    """After a rollback of the engine, `migrate` said "schema up to date" of a database with
    migrations this release does not know; it still applies nothing, and the engine runs."""
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await migrate(conn, progress=lambda _: None)
        await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES"
                           " (9998, 'from_later', 'x'), (9999, 'and_another', 'y')")  # fmt: skip
        lines: list[str] = []
        assert await migrate(conn, progress=lines.append) == []
        assert lines == [
            "schema up to date for this release; the database also has 2 migrations it does "
            "not know (9998_from_later, 9999_and_another), applied by a newer release"
        ], lines
        await require_current(conn)  # a rolling upgrade's older processes keep serving
    finally:
        await conn.close()


async def test_concurrent_runners_take_turns_and_apply_each_migration_once(
    fresh_dsn: str,
) -> None:
    """Three runners at once on a fresh database (several services starting together): each
    migration is applied by exactly one of them, and none fails."""
    conns = [await asyncpg.connect(fresh_dsn) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(migrate(c, progress=lambda _: None) for c in conns))
        versions = sorted(v for one in applied for v in one)
        assert versions == [m.version for m in available()]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(versions)
    finally:
        for conn in conns:
            await conn.close()


async def test_schema_guards(fresh_dsn: str) -> None:
    conn = await asyncpg.connect(fresh_dsn)
    try:
        await migrate(conn, progress=lambda _l: None)
        await conn.execute(
            "INSERT INTO sales (id, name, starts_at, ends_at, admission_rate, max_queue)"
            " VALUES ('s1', 'n', now(), now() + interval '1 hour', 10, 10)"
        )
        await conn.execute(
            "INSERT INTO sale_skus (sale_id, sku, title, stock_total, price, currency,"
            " per_buyer_limit, hold_ttl_seconds) VALUES ('s1', 'A', 'A', 5, 100, 'EUR', 1, 60)"
        )
        await conn.execute("UPDATE sale_skus SET sold = 5 WHERE sku = 'A'")
        # The last guard against oversell: sold can never exceed stock_total.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE sale_skus SET sold = 6 WHERE sku = 'A'")
        with pytest.raises(asyncpg.UniqueViolationError):
            for _ in range(2):
                await conn.execute(
                    "INSERT INTO payments (idempotency_key, order_id, amount, currency, state)"
                    " VALUES ('r1', 'r1', 100, 'EUR', 'PENDING')"
                )
        await conn.execute(
            "INSERT INTO orders (id, sale_id, sku, buyer_id, quantity, amount, currency,"
            " admission_id, payment_token, state)"
            " VALUES ('r1', 's1', 'A', 'b1', 1, 100, 'EUR', 'adm', 'tok', 'PENDING')"
        )
        await conn.execute(
            "INSERT INTO order_events (order_id, seq, type, to_state, cause)"
            " VALUES ('r1', 1, 'order.created', 'PENDING', 'test')"
        )
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE order_events SET cause = 'x'")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("DELETE FROM order_events")
    finally:
        await conn.close()


def test_migrate_command_is_rerunnable(cli: Cli) -> None:
    result = cli("migrate")
    assert result.code == 0
    assert "schema up to date" in result.out


async def test_the_engines_user_is_told_a_current_schema_is_up_to_date(fresh_dsn: str) -> None:
    """The documented user has no CREATE on the schema: `flashsale migrate` (the demo, a
    deploy's step) failed on it with "permission denied for schema public" even with nothing
    to apply; with something to apply, that is the owner's work and is said so."""
    owner = await asyncpg.connect(fresh_dsn)
    try:
        await migrate(owner, progress=lambda _: None)
        engine = await asyncpg.connect(await postgres_user(fresh_dsn))
        try:
            lines: list[str] = []
            assert await migrate(engine, progress=lines.append) == []
            assert lines == ["schema up to date"], lines
            last = available()[-1].version
            await owner.execute("DELETE FROM schema_migrations WHERE version = $1", last)
            with pytest.raises(ConfigError) as refused:
                await migrate(engine, progress=lines.append)
            said = str(refused.value)  # why Postgres refused depends on what the migration does
            assert (
                said.startswith(
                    f"migration {last:04d}_{available()[-1].name} needs the owner of the schema's "
                    "tables, and DATABASE_URL's user was refused ("
                )
                and "): run `flashsale migrate` as the owner" in said
            ), said
        finally:
            await engine.close()
    finally:
        await owner.close()
