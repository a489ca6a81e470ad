"""The TCP fault proxy the fault tests put between the engine and its servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from loadtest.fault_proxy import FaultProxy, ProxyProcess


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fault = await FaultProxy("127.0.0.1", port).start()
    yield fault
    await fault.stop()
    server.close()
    await server.wait_closed()


async def roundtrip(proxy: FaultProxy | ProxyProcess, patience: float = 1.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"ping")
        await writer.drain()
        return await asyncio.wait_for(reader.read(4), patience)
    finally:
        writer.close()


async def test_pass_latency_refuse_blackhole_and_back(proxy: FaultProxy) -> None:
    assert await roundtrip(proxy) == b"ping"
    proxy.set("pass", latency_s=0.1)
    began = time.monotonic()
    assert await roundtrip(proxy) == b"ping"
    assert time.monotonic() - began >= 0.2  # both ways
    proxy.set("refuse")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        data = await roundtrip(proxy)
        if not data:
            raise ConnectionResetError("closed")
    proxy.set("blackhole", latency_s=0)
    with pytest.raises(TimeoutError):
        await roundtrip(proxy, patience=0.3)
    proxy.set("pass")
    assert await roundtrip(proxy) == b"ping"


async def test_reset_all_breaks_open_connections(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"ping")
    assert await reader.read(4) == b"ping"
    proxy.reset_all()
    with pytest.raises(ConnectionError):
        data = await asyncio.wait_for(reader.read(4), 1)
        if not data:
            raise ConnectionResetError("closed")
    writer.close()


async def test_the_proxy_in_its_own_process_obeys_commands(proxy: FaultProxy) -> None:
    """The child-process proxy (what the fault suite uses), in front of the echo server."""
    child = await ProxyProcess("127.0.0.1", proxy.target_port).start()
    try:
        assert await roundtrip(child) == b"ping"
        await child.command("blackhole")
        with pytest.raises(TimeoutError):
            await roundtrip(child, patience=0.3)
        await child.command("latency 0.1")
        began = time.monotonic()
        assert await roundtrip(child) == b"ping"
        assert time.monotonic() - began >= 0.2
        with pytest.raises(RuntimeError, match="unknown command"):
            await child.command("explode")
        await child.command("pass")
        assert await roundtrip(child) == b"ping"
        reader, writer = await asyncio.open_connection("127.0.0.1", child.port)
        writer.write(b"ping")
        assert await reader.read(4) == b"ping"  # through the proxy: its connection is open
        await child.command("reset")  # reset under the child's uvloop
        with pytest.raises(ConnectionError):
            if not await asyncio.wait_for(reader.read(4), 1):
                raise ConnectionResetError("closed")
        writer.close()
        assert await roundtrip(child) == b"ping"  # and the proxy goes on
    finally:
        await child.stop()
