"""How the Redis access layer talks to Redis: the Lua scripts of ``lua/`` loaded once per
client and called by EVALSHA, and commands packed in C (hiredis) for the hot and wide paths.

A script is called by EVALSHA and, where the server answers NOSCRIPT (it restarted, its
scripts were flushed, or a failover promoted a replica: Redis 7 does not replicate ``SCRIPT
LOAD``), given to the server that runs the call: :class:`~flashsale.redis_connection.Script`
sends the call again whole with EVAL, which cannot answer NOSCRIPT and leaves the script
where it ran, and :func:`send_packed` loads it on the connection that answered before
sending the commands again. redis-py's own fallback loads it through any pooled
connection, which after a failover behind one endpoint may still lead to the old primary,
and the call sent again to the new one hears NOSCRIPT once more: an error that is neither an
outage nor the request's.

This is the one place that knows whether Redis is one server or a Redis Cluster. On a cluster,
packed commands are grouped by the node that serves their key's slot and each node's group is
sent on one of its connections, all nodes at once. A command answered ``MOVED``, ``ASK`` or
``TRYAGAIN`` was not run, so it is sent again through redis-py's cluster client, which follows
the redirection; a node that failed makes the client read the cluster's slots afresh before
the next call. Everything else in the layer uses redis-py's own commands and pipelines, which
the cluster client routes and groups by node itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from functools import cache
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.crc import key_slot

from flashsale.clients import CLUSTER_POOL_FACTOR, RedisClient
from flashsale.outages import describe, is_demotion
from flashsale.redis_connection import Script

# The parsers whose hiredis reader :func:`_read_replies` drains itself (redis-py's private
# layout, so another layout falls back to redis-py's own ``read_response``).
try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser

    DRAINABLE: tuple[type, ...] = (_AsyncHiredisParser,)
except ImportError:  # pragma: no cover - another redis-py layout
    NOT_ENOUGH_DATA = object()
    DRAINABLE = ()

# The scripts that get lua/lib.lua prepended.
WITH_LIB = frozenset({
    "reserve", "begin_payment", "confirm", "release", "expire",  # the hold lifecycle
    "join", "claim", "leave", "lease", "advance", "assign",  # the waiting room
    "rebuild_begin", "rebuild_holds", "rebuild_finish", "restore_queue",  # repairs
    "archive", "set_status", "put_sale",  # an ended sale's Redis state; a sale's status
})  # fmt: skip

# Answers that mean the command did not run on that node: sent again through the cluster client.
REDIRECTED = (redis.exceptions.AskError, redis.exceptions.TryAgainError)  # MovedError is an Ask

Command = tuple[str | int | bytes, ...]


def lua_script(client: RedisClient, name: str) -> Script:
    """``lua/<name>.lua`` (with ``lua/lib.lua`` where it needs it) as a script of ``client``."""
    return Script(client, source(name))


_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)


def pack_command(args: Command) -> bytes:
    """One command in the Redis protocol, packed in C (hiredis)."""
    return _pack(args)


def command_key(command: Command) -> str | bytes | None:
    """The key a command is routed by: the first key of EVAL/EVALSHA, the first stream of
    XREAD/XREADGROUP, the key of MEMORY USAGE and XGROUP, else its first argument; None for
    a command without one (``PING``), which any node may answer."""
    name = command[0]
    upper = name.upper() if isinstance(name, str) else ""
    if upper in ("EVALSHA", "EVAL"):
        at = 3
    elif upper in ("MEMORY", "XGROUP"):  # MEMORY USAGE <key>, XGROUP CREATE <key> ...
        at = 2
    elif upper in ("XREADGROUP", "XREAD") and "STREAMS" in command:
        at = command.index("STREAMS") + 1
    else:
        at = 1
    if len(command) <= at:
        return None
    key = command[at]
    return key if isinstance(key, str | bytes) else str(key)


def hash_pairs(raw: Any) -> Iterable[tuple[Any, Any]]:
    """An ``HGETALL`` answer's (field, value) pairs: a dict through redis-py's client, a flat
    list when read packed."""
    return raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)


async def call_packed(client: RedisClient, script: AsyncScript, command: Command) -> Any:
    """EVALSHA ``command`` (packed by hiredis in C) on one pooled connection, the node's that
    serves its key on a cluster; load the script once on NOSCRIPT. The hot paths (reserve,
    join) use this instead of redis-py's packer. An error answer is raised."""
    [reply] = await send_packed(client, [command], script=script)
    return reply


async def read_packed(
    client: RedisClient, commands: Sequence[Command], *, chunk: int = 5000
) -> list[Any]:
    """Send ``commands`` pipelined (packed by hiredis in C, ``chunk`` per write) and return their
    replies in order; the first error answer is raised, after every reply was read. For wide
    reads such as one command per SKU of a sale: redis-py's pipeline packs argument by
    argument in Python."""
    return await send_packed(client, commands, chunk=chunk)


async def send_packed(
    client: RedisClient,
    commands: Sequence[Command],
    *,
    script: AsyncScript | None = None,
    chunk: int = 5000,
    raise_on_error: bool = True,
) -> list[Any]:
    """The engine of :func:`call_packed` and :func:`read_packed`: ``commands`` packed, one
    connection per node, every node at once; replies in the order of ``commands``.

    What may be sent twice here is only what did not run: a ``NOSCRIPT`` answer (``script`` is
    loaded on that connection, then those commands go again on it) and, on a cluster, a
    redirection. A connection that fails mid-way is not retried: some of its commands may
    have run. Raises the first error answer that remains (returns it in its place, with
    ``raise_on_error`` False)."""
    replies: list[Any] = [None] * len(commands)
    if isinstance(client, aioredis.RedisCluster):
        await client.initialize()  # a no-op unless the slots are to be read (afresh)
    groups = _by_node(client, commands)
    if len(groups) == 1:  # one server, or one node: no task to spawn on the hot path
        answers = [await _send_group(client, groups[0][0], list(commands), chunk, script)]
    else:
        answers = await asyncio.gather(*(
            _send_group(client, node, [commands[i] for i in ix], chunk, script)
            for node, ix in groups
        ))  # fmt: skip
    for (_, indexes), answered in zip(groups, answers, strict=True):
        for i, reply in zip(indexes, answered, strict=True):
            replies[i] = reply
    if isinstance(client, aioredis.RedisCluster):
        for i, reply in enumerate(replies):
            if isinstance(reply, REDIRECTED):
                replies[i] = await _redirected(client, commands[i], script)
    for reply in replies if raise_on_error else ():
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
    return replies


async def _redirected(
    client: aioredis.RedisCluster, command: Command, script: AsyncScript | None
) -> Any:
    """``command`` sent again through the cluster client, which follows ``MOVED`` and ``ASK``;
    the node it lands on may not know ``script`` yet. An error answer is returned."""
    try:
        try:
            return await client.execute_command(*command)
        except redis.exceptions.NoScriptError:
            if script is None:
                raise
            return await client.execute_command("EVAL", script.script, *command[2:])
    except redis.exceptions.ResponseError as exc:
        return exc


def _by_node(
    client: RedisClient, commands: Sequence[Command]
) -> list[tuple[ClusterNode | None, list[int]]]:
    """The indexes of ``commands`` grouped by the cluster node serving each one's slot (one
    group with no node on a single server)."""
    if not isinstance(client, aioredis.RedisCluster):
        return [(None, list(range(len(commands))))]
    encode = cast(Callable[[str | bytes], bytes], client.get_encoder().encode)
    manager = client.nodes_manager
    groups: dict[str, tuple[ClusterNode | None, list[int]]] = {}
    for i, command in enumerate(commands):
        key = command_key(command)
        node = (client.get_default_node() if key is None
                else manager.get_node_from_slot(key_slot(encode(key))))  # fmt: skip
        groups.setdefault(node.name, (node, []))[1].append(i)
    return list(groups.values())


async def _send_group(
    client: RedisClient,
    node: ClusterNode | None,
    commands: list[Command],
    chunk: int,
    script: AsyncScript | None,
) -> list[Any]:
    """``commands`` on one connection (of ``node`` on a cluster); an error answer is returned
    in its place, so that every reply is read. Those answered ``NOSCRIPT`` go again on the
    same connection after ``script`` is loaded there, if given. A ``READONLY`` answer (the
    server was demoted by a failover) drops the connection and raises ``ConnectionError``, an
    outage: the next call connects afresh, to the new primary behind the same address."""
    replies: list[Any] = []
    async with _connection(client, node) as conn:
        try:
            for start in range(0, len(commands), chunk):
                part = commands[start : start + chunk]
                if not start and _closed_by_server(conn):
                    # It died while idle in the pool (Redis restarted, the connection was
                    # killed): connect afresh before sending, since nothing may be sent twice.
                    await conn.disconnect()
                await conn.send_packed_command(b"".join(pack_command(c) for c in part),
                                               check_health=False)  # fmt: skip
                replies += await _read_replies(conn, len(part))
            if script is not None:
                await _load_and_resend(conn, script, commands, replies)
        except BaseException as exc:
            await conn.disconnect()  # replies may be left unread on it
            if node is not None and isinstance(
                exc, redis.exceptions.ConnectionError | TimeoutError
            ):
                assert isinstance(client, aioredis.RedisCluster)
                await _relearn_slots(client, node)
            raise
    return replies


async def _load_and_resend(
    conn: Connection, script: AsyncScript, commands: list[Command], replies: list[Any]
) -> None:
    """The commands answered ``NOSCRIPT`` sent again on ``conn`` behind a ``SCRIPT LOAD``, their
    new answers in ``replies``: loaded on the server that lacked the script, whichever it is.
    A load that failed leaves them answered ``NOSCRIPT`` again."""
    again = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
    if not again:
        return
    load = pack_command(("SCRIPT", "LOAD", cast(str, script.script)))
    await conn.send_packed_command(load + b"".join(pack_command(commands[i]) for i in again),
                                   check_health=False)  # fmt: skip
    _loaded, *retried = await _read_replies(conn, 1 + len(again))
    for i, reply in zip(again, retried, strict=True):
        replies[i] = reply


async def _read_replies(conn: Connection, count: int) -> list[Any]:
    """The next ``count`` replies on ``conn``, an error answer in its place (the rest follows
    it, so everything is read). hiredis's reader is drained directly: through redis-py's
    ``read_response`` each reply cost about 6 us of Python, five times the rest of a wide read
    (20,000 ``HMGET``: 141 ms of CPU against 25 ms). Within the connection's socket timeout,
    if it has one, for the lot; a connection that fails raises redis-py's errors."""
    parser = conn._parser
    if not isinstance(parser, DRAINABLE):  # without hiredis: redis-py's own way
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(await conn.read_response())
            except redis.exceptions.ResponseError as exc:
                replies.append(exc)
        return replies
    drained: Any = parser  # a private layout, checked above
    reader = cast(hiredis.Reader, drained._reader)  # set while connected
    replies = []
    try:
        async with asyncio.timeout(conn.socket_timeout):
            while len(replies) < count:
                reply = reader.gets()
                if reply is NOT_ENOUGH_DATA:
                    await drained.read_from_socket()
                elif not isinstance(reply, redis.exceptions.RedisError):
                    replies.append(reply)
                elif isinstance(reply, redis.exceptions.ConnectionError):
                    raise reply
                elif is_demotion(reply):  # as the engine's connections do on read_response
                    raise redis.exceptions.ConnectionError(
                        f"the server is a replica now: {describe(reply)}"
                    ) from reply
                else:
                    replies.append(reply)
    except TimeoutError as exc:
        raise redis.exceptions.TimeoutError(f"Timeout reading from {conn.host}") from exc
    except OSError as exc:
        raise redis.exceptions.ConnectionError(
            f"Error while reading from {conn.host}: {exc}"
        ) from exc
    return replies


@contextlib.asynccontextmanager
async def _connection(client: RedisClient, node: ClusterNode | None) -> AsyncIterator[Connection]:
    """A connection of the single server's pool (waiting for one if all are busy), or of the
    cluster node's."""
    if node is None:
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            yield conn
        finally:
            await pool.release(conn)
    else:
        assert isinstance(client, aioredis.RedisCluster)
        async with _gate(client, node):
            conn = node.acquire_connection()
            try:
                yield conn
            finally:
                node.release(conn)


# redis-py's cluster nodes refuse a connection beyond their pool's size instead of waiting for
# one, so packed calls take at most the client's ``max_connections`` of a node (its pool's
# size over CLUSTER_POOL_FACTOR) and wait their turn beyond, as the single server's blocking
# pool makes them; the rest of the node's pool is left to redis-py's own calls.
_GATES: weakref.WeakKeyDictionary[aioredis.RedisCluster, dict[str, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def _gate(client: aioredis.RedisCluster, node: ClusterNode) -> asyncio.Semaphore:
    gates = _GATES.setdefault(client, {})
    gate = gates.get(node.name)
    if gate is None:
        gate = gates[node.name] = asyncio.Semaphore(
            max(1, node.max_connections // CLUSTER_POOL_FACTOR)
        )
    return gate


# When each cluster client last read the cluster's slots after a node failed, so that a
# burst of failures on one node reads them once, not once per caller.
_RELEARNED: weakref.WeakKeyDictionary[aioredis.RedisCluster, float] = weakref.WeakKeyDictionary()
RELEARN_EVERY_S = 0.5


async def _relearn_slots(client: aioredis.RedisCluster, failed: ClusterNode) -> None:
    """After ``failed`` stopped answering: try it last and read the slots again (a failover
    moves them to its replica), at most every ``RELEARN_EVERY_S``. If no node answers, the
    next call tries again; the caller's error stands either way."""
    now = time.monotonic()
    if now - _RELEARNED.get(client, 0.0) < RELEARN_EVERY_S:
        return
    _RELEARNED[client] = now
    manager = client.nodes_manager
    manager.move_node_to_end_of_cached_nodes(failed.name)
    with contextlib.suppress(redis.exceptions.RedisError, OSError):
        await manager.initialize(last_failed_node_name=failed.name)


def _closed_by_server(conn: Any) -> bool:
    """Whether the server has closed ``conn`` (its reader saw the end of the stream) or the
    network reset it (its transport is closed: under uvloop a write would raise "the handler
    is closed"). redis-py's pool check does not catch this here, and a command sent on a
    closed connection fails only when its reply is read, when it can no longer be known
    whether it ran."""
    reader = getattr(conn, "_reader", None)
    writer = getattr(conn, "_writer", None)
    return (reader is not None and reader.at_eof()) or (
        writer is not None and writer.transport.is_closing()
    )


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
