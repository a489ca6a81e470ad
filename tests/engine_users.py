"""The engine's least-privileged users exactly as docs/PRODUCTION.md gives them ("The engine's
users"): its Postgres statements and its Redis ``ACL SETUSER`` line, read from the document and
run, so that what the document says is what the tests run as."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from flashsale.settings import Settings

PRODUCTION = Path(__file__).resolve().parent.parent / "docs" / "PRODUCTION.md"
PASSWORD = "engine-user-password-0123"


def _section() -> str:
    text = PRODUCTION.read_text(encoding="utf-8")
    start = text.index("## The engine's users")
    return text[start : text.index("\n## ", start + 1)]


def documented_sql() -> list[str]:
    """The statements of the section's ``sql`` block, ``PASSWORD`` made this module's."""
    block = re.search(r"```sql\n(.*?)```", _section(), re.S)
    assert block is not None, "docs/PRODUCTION.md gives the engine's Postgres user as SQL"
    statements = [s.strip() for s in block.group(1).split(";") if s.strip()]
    return [s.replace("'PASSWORD'", f"'{PASSWORD}'") for s in statements]


def documented_acl() -> list[str]:
    """The words of the section's ``ACL SETUSER`` line, ``>PASSWORD`` made this module's."""
    line = re.search(r"^ACL SETUSER .*$", _section(), re.M)
    assert line is not None, "docs/PRODUCTION.md gives the engine's Redis user as an ACL line"
    return [f">{PASSWORD}" if w == ">PASSWORD" else w for w in shlex.split(line.group(0))]


def _with_login(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{parts.hostname}:{parts.port}"))


async def postgres_user(database_url: str) -> str:
    """DATABASE_URL as the documented user, made (or granted again) on that database."""
    statements = documented_sql()
    role = re.match(r"CREATE ROLE (\w+) ", statements[0])
    assert role is not None, statements[0]
    conn = await asyncpg.connect(database_url)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role.group(1)):
            await conn.execute(f"DROP OWNED BY {role.group(1)}")  # its grants here, given again
            statements = statements[1:]
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()
    return _with_login(database_url, role.group(1))


async def redis_user(settings: Settings) -> str:
    """REDIS_URL as the documented user, set on the server or on every node of the cluster."""
    words = documented_acl()
    url = settings.require_redis()
    if settings.redis_cluster:
        cluster = aioredis.RedisCluster.from_url(url)
        try:
            await cluster.initialize()
            nodes = [f"redis://{urlsplit(url).netloc.rsplit('@', 1)[0]}@{n.host}:{n.port}/0"
                     for n in cluster.get_nodes()]  # fmt: skip
        finally:
            await cluster.aclose()
    else:
        nodes = [url]
    for node in nodes:
        client = aioredis.Redis.from_url(node)
        try:
            await client.execute_command(*words[:3], "reset", *words[3:])  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()
    return _with_login(url, words[2])
