"""The single-node Redis rows of ``flashsale bench allocate``: DECR and restore, the reserve
script per request and batched, and the pipelined ``DECR`` ceiling of the server itself."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis

from allocator.hold_scripts import HoldScripts
from allocator.redis_calls import pack_command
from allocator.sku_allocator import SkuAllocator
from flashsale.clients import RedisClient
from loadtest.bench_allocate_rig import STOCK, Rig

CEILING_DEPTH = 1_000  # DECRs per pipeline in the ceiling row
CEILING_PIPELINES = 4  # pipelines in flight in the ceiling row


async def redis_rows(rig: Rig) -> str:
    client = rig.redis()
    try:
        info: dict[str, Any] = await client.info("server")
        await _decr_restore(rig, client)
        await _lua_per_request(rig, client)
        await _lua_batched(rig, client)
        await _ceiling(rig, client)
        return str(info["redis_version"])
    finally:
        await rig.cleanup(client)
        await client.aclose()


async def _decr_restore(rig: Rig, client: RedisClient) -> None:
    key = f"fs:{{bench-{rig.run_id}:DECR}}:available"
    await client.set(key, STOCK)

    async def op() -> None:
        if await client.decrby(key, 1) < 0:
            await client.incrby(key, 1)

    async def moved() -> int:
        return STOCK - int(await client.get(key) or b"0")

    await rig.measure(
        "redis_decr_restore", "DECRBY per request, INCRBY back when below zero", op,
        client=client, command="decrby", granted=moved,
    )  # fmt: skip
    await client.unlink(key)


async def _lua_per_request(rig: Rig, client: RedisClient) -> None:
    keys = await rig.fresh_sku(client, "PER-REQUEST")
    scripts = HoldScripts(client)

    async def op() -> None:
        await scripts.reserve(keys, [rig.request()])

    await rig.measure(
        "lua_per_request", "one reserve script call per buyer", op,
        client=client, command="evalsha", granted=rig.active(client, keys),
    )  # fmt: skip


async def _lua_batched(rig: Rig, client: RedisClient) -> None:
    keys = await rig.fresh_sku(client, "BATCHED")
    allocator = SkuAllocator(
        HoldScripts(client), keys, window=rig.options.window, max_batch=rig.options.max_batch
    )

    async def op() -> None:
        await allocator.reserve(rig.request())

    batches_before = allocator.batches
    row = await rig.measure(
        "lua_batched_allocator", "one awaited SkuAllocator.reserve per buyer, coalesced", op,
        client=client, command="evalsha", granted=rig.active(client, keys),
    )  # fmt: skip
    await allocator.aclose()
    batches = allocator.batches - batches_before
    row.extra["mean_batch"] = round(row.decisions / max(batches, 1), 1)


async def _ceiling(rig: Rig, client: RedisClient) -> None:
    url = urlsplit(rig.settings.require_redis())
    key = f"fs:{{bench-{rig.run_id}:CEILING}}:available"
    await client.set(key, STOCK)
    host, port = url.hostname, url.port or 6379
    if isinstance(client, aioredis.RedisCluster):  # the node that serves the key
        node = client.get_node_from_key(key)
        assert node is not None
        host, port = node.host, int(node.port)
    blob = pack_command(("DECR", key)) * CEILING_DEPTH
    streams = []
    for _ in range(CEILING_PIPELINES):
        reader, writer = await asyncio.open_connection(host, port)
        parser = hiredis.Reader()
        if url.password:
            auth = ("AUTH", unquote(url.username), unquote(url.password)) if url.username \
                else ("AUTH", unquote(url.password))  # fmt: skip
            writer.write(pack_command(auth))
            parser.feed(await reader.read(1024))
            reply = parser.gets()
            if isinstance(reply, Exception):
                raise reply
        streams.append((reader, writer, parser))
    free = asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter, hiredis.Reader]]()
    for stream in streams:
        free.put_nowait(stream)

    async def pipeline() -> None:
        reader, writer, parser = await free.get()
        writer.write(blob)
        left = CEILING_DEPTH
        while left:
            parser.feed(await reader.read(65536))
            while left and parser.gets() is not False:
                left -= 1
        free.put_nowait((reader, writer, parser))

    try:
        await rig.measure(
            "redis_pipelined_decr_ceiling",
            f"raw DECR, {CEILING_PIPELINES} pipelines of {CEILING_DEPTH}, pre-packed",
            pipeline, client=client, command="decr", per_call=CEILING_DEPTH,
        )  # fmt: skip
    finally:
        for _, writer, _ in streams:
            writer.close()
        await client.unlink(key)
