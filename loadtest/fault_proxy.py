"""A TCP fault proxy on loopback: put it between a client and a server to break the network
on purpose (this kernel has no netem).

Modes, switched at any time:

* ``pass``: bytes flow both ways, after ``latency_s`` each way;
* ``refuse``: every connection is reset at once and new ones are closed on accept (a server
  that is down, or a firewall that rejects);
* ``blackhole``: connections stay open and nothing flows in either direction (a partition:
  the client waits for its own timeouts);

and ``reset_all()`` resets the connections open now without changing the mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "refuse", "blackhole"]
CHUNK = 64 * 1024


@dataclass
class FaultProxy:
    """Listens on ``127.0.0.1:port`` and forwards to ``target_host:target_port``."""

    target_host: str
    target_port: int
    mode: Mode = "pass"
    latency_s: float = 0.0
    port: int = 0
    connections: int = 0  # accepted so far
    _server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _flowing: asyncio.Event = field(default_factory=asyncio.Event)  # clear while a blackhole

    async def start(self) -> FaultProxy:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._flowing.set()  # let blocked pipes see their connections are gone
        self.reset_all()
        if self._server is not None:
            await self._server.wait_closed()

    def set(self, mode: Mode, *, latency_s: float | None = None) -> None:
        self.mode = mode
        if latency_s is not None:
            self.latency_s = latency_s
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "refuse":
            self.reset_all()

    def reset_all(self) -> None:
        """Reset (RST) every connection open now."""
        for writer in list(self._open):
            _reset(writer)
        self._open.clear()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "refuse":
            _reset(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _reset(client_w)
            return
        self._open |= {client_w, server_w}
        try:
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        finally:
            for writer in (client_w, server_w):
                self._open.discard(writer)
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                if writer not in self._open:
                    break
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer or a rejecting firewall does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
