"""The abuse scenarios written on raw sockets, below any HTTP client: ``abuse-slow`` (request
heads and bodies a byte at a time) and ``abuse-oversized`` (huge headers, URLs and bodies).
The gateway must close or refuse each with a 4xx, never a 5xx, and keep serving the buyers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

from loadtest.chaos.abuse import AbuseResult, Target, buyer_token

# -- slow senders --------------------------------------------------------------------------


async def slow(target: Target) -> AbuseResult:
    """Connections that send their request head, or their body, one byte a second: the
    gateway must keep serving everyone else, and close the slow bodies after its body
    timeout."""
    rig = target.rig
    result = AbuseResult()
    count = 50 if target.quick else 200
    path = f"/v1/sales/{target.sale}/queue"
    heads = [f"POST {path} HTTP/1.1\r\nHost: chaos\r\n".encode() for _ in range(count // 2)]
    body_head = (f"POST {path} HTTP/1.1\r\nHost: chaos\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {buyer_token(rig, 'slow')}\r\nContent-Length: 100000\r\n"
                 "\r\n").encode()  # fmt: skip
    closed = Counter[str]()

    async def one(first: bytes, kind: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        result.requests += 1
        try:
            writer.write(first)
            await writer.drain()
            deadline = time.monotonic() + target.seconds
            while time.monotonic() < deadline:
                if reader.at_eof() or writer.is_closing():
                    closed[kind] += 1
                    return
                status, retry_after = await _answer(reader, 1.0)
                if status:
                    result.answer(status, retry_after)
                    closed[kind] += 1
                    return
                if reader.at_eof():
                    closed[kind] += 1
                    return
                writer.write(b"X" if kind == "body" else b"X-Slow: 1\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            closed[kind] += 1
        finally:
            writer.close()

    await asyncio.gather(
        *(one(h, "head") for h in heads),
        *(one(body_head, "body") for _ in range(count - len(heads))),
    )
    result.notes.append(
        f"{count} slow connections for {target.seconds:.0f}s: the gateway closed "
        f"{closed['body']}/{count - len(heads)} slow bodies and {closed['head']}/{len(heads)} "
        "slow heads (aiohttp has no timeout on a request head: see PRODUCTION.md)"
    )
    if closed["body"] < count - len(heads):
        result.accepted.append(f"{count - len(heads) - closed['body']} slow bodies were never "
                               "cut off")  # fmt: skip
    return result


# -- oversized requests --------------------------------------------------------------------


async def _answer(reader: asyncio.StreamReader, patience: float) -> tuple[int, str | None]:
    """The status and ``Retry-After`` of the response head on ``reader``; (0, None) when the
    connection closed (or stayed silent) without one."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), patience)
    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return 0, None
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1."):
        return 0, None
    retry_after = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "retry-after":
            retry_after = value.strip()
    return int(lines[0].split()[1]), retry_after


async def _raw(port: int, request: bytes, result: AbuseResult, label: str) -> None:
    """Send ``request`` as it is; a 2xx is a request that should have been refused."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        status, retry_after = await _answer(reader, 15)
        if status == 0:
            result.requests += 1
            result.statuses[0] += 1  # closed without an answer: refused
            return
        result.answer(status, retry_after)
        if 200 <= status < 300:
            result.accepted.append(f"{label}: answered {status}")
    finally:
        writer.close()


async def oversized(target: Target) -> AbuseResult:
    """Huge heads on the buyer routes; huge bodies on a route that reads its body (creating a
    sale through the admin API): each must be refused with a 4xx or a closed connection."""
    rig, result = target.rig, AbuseResult()
    token = buyer_token(rig, "big")
    join = f"/v1/sales/{target.sale}/queue"
    base = f"Host: chaos\r\nAuthorization: Bearer {token}\r\n"
    create = "/admin/v1/sales"
    admin = f"Host: chaos\r\nAuthorization: Bearer {rig.settings.admin_token.current()}\r\n"
    cases = {
        "a 100 KB header": f"GET {join}/status HTTP/1.1\r\n{base}X-Big: {'a' * 100_000}\r\n\r\n",
        "2,000 headers": f"GET {join}/status HTTP/1.1\r\n{base}"
                         + "".join(f"X-H{i}: v\r\n" for i in range(2000)) + "\r\n",
        "a 100 KB URL": f"GET /v1/sales/{'s' * 100_000} HTTP/1.1\r\n{base}\r\n",
        "a 100 KB token": f"POST {join} HTTP/1.1\r\nHost: chaos\r\nAuthorization: Bearer "
                          f"{'t' * 100_000}\r\nContent-Length: 0\r\n\r\n",
        "a 10 MB body": f"POST {create} HTTP/1.1\r\n{admin}Content-Type: application/json\r\n"
                        f"Content-Length: 10000000\r\n\r\n{{\"x\": \"{'y' * 9_999_990}\"}}",
        "a 10 MB body declared, never sent": f"POST {create} HTTP/1.1\r\n{admin}"
                                              "Content-Type: application/json\r\n"
                                              "Content-Length: 10000000\r\n\r\n",
        "a 2 MB chunked body": f"POST {create} HTTP/1.1\r\n{admin}Content-Type: application/json"
                               "\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + "".join(f"{100_000:x}\r\n{'z' * 100_000}\r\n" for _ in range(20))
                               + "0\r\n\r\n",
        "a JSON bomb": f"POST {create} HTTP/1.1\r\n{admin}Content-Type: application/json\r\n"
                       f"Content-Length: 200000\r\n\r\n{'[' * 100_000}{']' * 100_000}",
    }  # fmt: skip
    rounds = 2 if target.quick else 10
    for _ in range(rounds):
        await asyncio.gather(*(_raw(rig.port, raw.encode("latin-1"), result, label)
                               for label, raw in cases.items()))  # fmt: skip
    result.notes.append(f"{len(cases)} kinds of oversized request, {rounds} times each")
    return result
