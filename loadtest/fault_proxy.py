"""A TCP fault proxy on loopback: put it between a client and a server to break the network
on purpose (this kernel has no netem).

Modes, switched at any time:

* ``pass``: bytes flow both ways, after ``latency_s`` each way;
* ``refuse``: every connection is reset at once and new ones are closed on accept (a server
  that is down, or a firewall that rejects);
* ``blackhole``: connections stay open and nothing flows in either direction (a partition:
  the client waits for its own timeouts);

and ``reset_all()`` resets the connections open now without changing the mode. Given ``tls``
(a server-side SSL context) it also terminates TLS, as a load balancer in front of a server
that speaks plain TCP does.

It runs in the process that uses it (tests), or in its own process, so that the bytes it
pumps do not compete with a load driver's event loop: ``python -m loadtest.fault_proxy
HOST:PORT`` prints ``listening PORT`` and then obeys one command per line on stdin (``pass``,
``refuse``, ``blackhole``, ``latency SECONDS``, ``reset``), answering ``ok`` to each; it exits
when stdin closes. :class:`ProxyProcess` drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import sys
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import urlsplit, urlunsplit

from flashsale import event_loop

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
    tls: ssl.SSLContext | None = None  # clients speak TLS to the proxy, the proxy plain TCP on
    connections: int = 0  # accepted so far
    _server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _flowing: asyncio.Event = field(default_factory=asyncio.Event)  # clear while a blackhole

    async def start(self) -> FaultProxy:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  ssl=self.tls)  # fmt: skip
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
        # A connection reset under uvloop fails a write with RuntimeError, not OSError.
        with contextlib.suppress(OSError, RuntimeError, asyncio.IncompleteReadError):
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
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by ``127.0.0.1:port`` (credentials kept)."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer or a rejecting firewall does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _obey(proxy: FaultProxy, line: str) -> None:
    """Apply one control line; ValueError names what is wrong with it."""
    command, _, argument = line.strip().partition(" ")
    if command in ("pass", "refuse", "blackhole"):
        proxy.set(cast(Mode, command))
    elif command == "latency":
        proxy.set("pass", latency_s=float(argument))
    elif command == "reset":
        proxy.reset_all()
    else:
        raise ValueError(f"unknown command {line.strip()!r}")


async def _main(target: str) -> None:
    host, _, port = target.rpartition(":")
    proxy = await FaultProxy(host or "127.0.0.1", int(port)).start()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print(f"listening {proxy.port}", flush=True)
    try:
        while line := (await stdin.readline()).decode():
            try:
                await _obey(proxy, line)
            except ValueError as exc:
                print(f"error {exc}", flush=True)
            else:
                print("ok", flush=True)
    finally:
        await proxy.stop()


class ProxyProcess:
    """A fault proxy in a child process (``python -m loadtest.fault_proxy``)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = f"{target_host}:{target_port}"
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> ProxyProcess:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.fault_proxy", self.target,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._process.stdout is not None
        line = (await asyncio.wait_for(self._process.stdout.readline(), 30)).decode()
        if not line.startswith("listening "):
            raise RuntimeError(f"the fault proxy to {self.target} did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    async def command(self, line: str) -> None:
        """Send one command (``pass``, ``refuse``, ``blackhole``, ``latency S``, ``reset``)
        and wait until it is in force."""
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write(f"{line}\n".encode())
        await process.stdin.drain()
        answer = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        if answer != "ok":
            raise RuntimeError(f"the fault proxy to {self.target} refused {line!r}: {answer}")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


if __name__ == "__main__":
    if len(sys.argv) != 2 or ":" not in sys.argv[1]:
        sys.exit("usage: python -m loadtest.fault_proxy HOST:PORT")
    event_loop.run(_main(sys.argv[1]))
