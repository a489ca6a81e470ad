"""How the Redis access layer talks to Redis: the Lua scripts of ``lua/`` loaded once per
client and called by EVALSHA, and commands packed in C (hiredis) for the hot and wide paths.

redis-py's ``register_script`` sends EVALSHA and falls back to loading the script on NOSCRIPT,
so a Redis restart or ``SCRIPT FLUSH`` is survived transparently; :func:`call_packed` does the
same for the commands it packs itself.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

# The scripts that get lua/lib.lua prepended.
WITH_LIB = frozenset({
    "reserve", "begin_payment", "confirm", "release", "expire",  # the hold lifecycle
    "join", "claim", "lease", "advance", "assign",  # the waiting room
    "rebuild_begin", "rebuild_holds", "rebuild_finish", "restore_queue",  # repairs
})  # fmt: skip


_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)


def pack_command(args: tuple[str | int | bytes, ...]) -> bytes:
    """One command in the Redis protocol, packed in C (hiredis)."""
    return _pack(args)


async def call_packed(
    client: aioredis.Redis, script: AsyncScript, command: tuple[str | int, ...]
) -> Any:
    """EVALSHA ``command`` (packed by hiredis in C) on one pooled connection; load the script
    once on NOSCRIPT. The hot paths (reserve, join) use this instead of redis-py's packer."""
    packed = pack_command(command)
    pool = client.connection_pool
    for attempt in (1, 2):
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(packed, check_health=False)
            return await conn.read_response()
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
        except BaseException:
            # Timeout or cancellation mid-reply: the connection may still hold the reply.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        await client.script_load(script.script)
    raise AssertionError("unreachable")


async def read_packed(
    client: aioredis.Redis, commands: Sequence[tuple[str | int, ...]], *, chunk: int = 5000
) -> list[Any]:
    """Send read-only ``commands`` pipelined (packed by hiredis in C, ``chunk`` per write) on
    one pooled connection; their replies in order. For wide reads such as one command per
    SKU of a sale: redis-py's pipeline packs argument by argument in Python."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    replies: list[Any] = []
    try:
        for start in range(0, len(commands), chunk):
            part = commands[start : start + chunk]
            if not start and _closed_by_server(conn):
                # It died while idle in the pool (Redis restarted, the connection was killed):
                # connect afresh before sending, since nothing may be sent twice here.
                await conn.disconnect()
            await conn.send_packed_command(b"".join(pack_command(c) for c in part),
                                           check_health=False)  # fmt: skip
            replies += [await conn.read_response() for _ in part]
    except BaseException:
        await conn.disconnect()  # replies may be left unread on it
        raise
    finally:
        await pool.release(conn)
    return replies


def _closed_by_server(conn: Any) -> bool:
    """Whether the server has closed ``conn`` (its reader saw the end of the stream). redis-py's
    pool check does not catch this here, and a command sent on it fails only when its reply
    is read, when it can no longer be known whether it ran."""
    reader = getattr(conn, "_reader", None)
    return reader is not None and reader.at_eof()


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``; the scripts that share ``lua/lib.lua`` (hold records,
    stock return, the pre-queue seal) get it prepended, so each is still one script loaded
    once and called by EVALSHA."""
    files = importlib.resources.files("lua")
    body = files.joinpath(f"{name}.lua").read_text()
    if name in WITH_LIB:
        body = files.joinpath("lib.lua").read_text() + "\n" + body
    return body
