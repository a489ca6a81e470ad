"""A small HTTP/1.1 client for load drivers: keep-alive connections, one request at a time on
each, bodies by ``Content-Length``.

aiohttp's client cost about 400 µs of CPU per request here, a third of the whole machine's
work per buyer in a 50,000-buyer demo that shares two cores with the engine it drives. This
client does only what the gateway's answers need (a status, ``Content-Length`` bodies, a few
named headers) and parses them incrementally. :class:`ResponseParser` is fuzzed
(``tests/test_http_client.py``) against responses split at every byte.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

MAX_HEAD = 64 * 1024


class HttpError(Exception):
    """The connection failed or the server's answer could not be read."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; only those asked for
    body: bytes


class ResponseParser:
    """Turns bytes from one connection into responses, in order. ``wanted`` names the headers
    kept (lower case); ``Content-Length`` is always read and required."""

    def __init__(self, wanted: Iterable[str] = ()) -> None:
        self.wanted = frozenset(w.lower() for w in wanted)
        self._buffer = bytearray()
        self._head: tuple[int, dict[str, str], int] | None = None

    def feed(self, data: bytes) -> list[Response]:
        self._buffer += data
        out: list[Response] = []
        while True:
            if self._head is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise HttpError("response head too large")
                    return out
                self._head = self._parse_head(bytes(self._buffer[:end]))
                del self._buffer[: end + 4]
            status, headers, length = self._head
            if len(self._buffer) < length:
                return out
            out.append(Response(status, headers, bytes(self._buffer[:length])))
            del self._buffer[:length]
            self._head = None

    def _parse_head(self, head: bytes) -> tuple[int, dict[str, str], int]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        length: int | None = None
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpError(f"malformed header line: {line[:80]!r}")
            key = name.strip().lower().decode("latin-1")
            if key == "content-length":
                text = value.strip()
                if not text.isdigit():
                    raise HttpError(f"bad Content-Length: {text[:20]!r}")
                length = int(text)
            elif key == "transfer-encoding":
                raise HttpError("chunked bodies are not supported")
            if key in self.wanted:
                headers[key] = value.strip().decode("latin-1")
        if length is None:
            raise HttpError("a response without Content-Length")
        return int(parts[1]), headers, length


class _Connection(asyncio.Protocol):
    def __init__(self, wanted: Iterable[str]) -> None:
        self.parser = ResponseParser(wanted)
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Response]] = deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.parser.feed(data)
        except HttpError as exc:
            self.fail(exc)
            return
        for response in responses:
            if self.waiting:
                future = self.waiting.popleft()
                if not future.done():
                    future.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(HttpError(f"connection closed: {exc!r}"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class Client:
    """Up to ``connections`` keep-alive connections to one ``host:port``, opened on demand; a
    request waits for a free one. ``wanted``: response headers to keep (lower case)."""

    def __init__(
        self, host: str, port: int, *, connections: int = 256,
        wanted: Iterable[str] = ("retry-after",), timeout: float = 30.0,
    ) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.wanted = tuple(wanted)
        self.timeout = timeout
        self._free: list[_Connection] = []
        self._slots = asyncio.Semaphore(connections)
        self._all: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(self.wanted), self.host,
                                               self.port)  # fmt: skip
        self._all.append(conn)
        return conn

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> Response:  # fmt: skip
        """Send one request and wait for its response; HttpError when the connection fails,
        closes, answers unreadably or not within ``timeout``."""
        head = [f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        head.append("\r\n")
        await self._slots.acquire()
        conn: _Connection | None = None
        try:
            while self._free and conn is None:
                candidate = self._free.pop()
                conn = None if candidate.closed else candidate
            if conn is None:
                conn = await self._connect()
            if conn.transport is None:
                raise HttpError("not connected")
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Response] = loop.create_future()
            conn.waiting.append(future)
            conn.transport.write("".join(head).encode("latin-1") + body)
            # One timer per request, not asyncio.wait_for's task machinery.
            timer = loop.call_later(self.timeout, conn.fail, HttpError("timed out"))
            try:
                return await future
            finally:
                timer.cancel()
        finally:
            if conn is not None and not conn.closed and not conn.waiting:
                self._free.append(conn)
            self._slots.release()

    async def aclose(self) -> None:
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()
        self._all.clear()
        self._free.clear()
