"""Versioned SQL migrations: ``flashsale/migrations/NNNN_name.sql``, applied in order.

Re-runnable: applied versions are recorded in ``schema_migrations`` (with a checksum, so an
edited migration that was already applied is reported instead of silently diverging), each
migration runs in its own transaction, and a transaction-level advisory lock taken in each
serialises concurrent runners.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import asyncpg

from flashsale.errors import ConfigError, SchemaBehind
from flashsale.wording import counted

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x666C617368  # "flash": any constant shared by every runner

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    found = []
    for entry in importlib.resources.files("flashsale.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


@cache
def _shipped() -> tuple[Migration, ...]:
    return tuple(available())


async def require_current(db: asyncpg.Connection | asyncpg.Pool) -> None:
    """Raise SchemaBehind, naming the first missing migration, unless the database has applied
    every migration this version of the engine ships: the readiness probes' Postgres check,
    one query. A database ahead of the engine (migrated by a newer version) is current."""
    try:
        rows = await db.fetch("SELECT version FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        rows = []
    applied = {row["version"] for row in rows}
    missing = [m for m in _shipped() if m.version not in applied]
    if missing:
        first = missing[0]
        raise SchemaBehind(
            f"{len(missing)} of {len(_shipped())} migrations not applied (the "
            f"first: {first.version:04d}_{first.name}): run `flashsale migrate`"
        )


async def migrate(conn: asyncpg.Connection, progress: Callable[[str], None] = print) -> list[int]:
    """Apply every pending migration; return the versions applied by this call.

    Each step is one transaction that first takes a transaction-level advisory lock, so
    concurrent runners take turns and each sees what the one before it applied. Nothing is
    held between transactions, which a transaction pooler (``FLASHSALE_PG_POOL_MODE``) may run
    on different server connections. On a current schema nothing is created or written, so
    the engine's own user, granted the tables and not the schema, is told it is up to date."""
    applied_now: list[int] = []
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        async with conn.transaction():  # the owner's: a user granted the tables may not create
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute(_BOOTSTRAP)
    for migration in available():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            checksum = await conn.fetchval(
                "SELECT checksum FROM schema_migrations WHERE version = $1", migration.version
            )
            if checksum is not None:
                if checksum != migration.checksum:
                    raise ConfigError(
                        f"migration {migration.version:04d}_{migration.name} was edited after it "
                        "was applied; add a new migration instead"
                    )
                continue
            try:
                await conn.execute(migration.sql)
            except asyncpg.InsufficientPrivilegeError as exc:
                raise ConfigError(
                    f"migration {migration.version:04d}_{migration.name} needs the owner of the "
                    f"schema's tables, and DATABASE_URL's user was refused ({exc}): run `flashsale "
                    'migrate` as the owner (docs/PRODUCTION.md, "The engine\'s users")'
                ) from exc
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        progress(f"applied {migration.version:04d}_{migration.name}")
        applied_now.append(migration.version)
    later = await _unknown(conn)
    if not applied_now:
        progress("schema up to date" + (f" for this release; {later}" if later else ""))
    elif later:
        progress(later)
    return applied_now


async def _unknown(conn: asyncpg.Connection) -> str:
    """What the database has applied that this release does not ship (a newer release
    migrated it, and this one was rolled back to), said in a line; "" when nothing."""
    rows = await conn.fetch(
        "SELECT version, name FROM schema_migrations WHERE NOT version = ANY($1::int[])"
        " ORDER BY version", [m.version for m in _shipped()],
    )  # fmt: skip
    if not rows:
        return ""
    names = ", ".join(f"{r['version']:04d}_{r['name']}" for r in rows[:5])
    more = ", …" if len(rows) > 5 else ""
    return (f"the database also has {counted(len(rows), 'migration')} it does not know "
            f"({names}{more}), applied by a newer release")  # fmt: skip
