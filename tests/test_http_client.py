"""The load driver's small HTTP client: its response parser, fuzzed with responses split at
every possible point, and the client against a real aiohttp server."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from loadtest.http_client import Client, HttpError, ResponseParser

BODIES = st.binary(max_size=300)
STATUSES = st.sampled_from([200, 201, 204, 400, 404, 409, 429, 503])


def wire(status: int, body: bytes, extra: list[tuple[str, str]]) -> bytes:
    head = [f"HTTP/1.1 {status} Whatever", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in extra)]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@given(
    st.lists(st.tuples(STATUSES, BODIES, st.booleans()), min_size=1, max_size=5),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_responses_come_out_whole_and_in_order_however_the_bytes_are_split(
    responses: list[tuple[int, bytes, bool]], cuts: list[int]
) -> None:
    stream = b"".join(
        wire(s, b, [("Retry-After", "2"), ("X-Other", "x")] if r else [("Server", "y")])
        for s, b, r in responses
    )
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    parser = ResponseParser(["retry-after"])
    got = []
    for start, end in itertools.pairwise(points):
        got += parser.feed(stream[start:end])
    assert [(g.status, g.body, g.headers) for g in got] == [
        (s, b, {"retry-after": "2"} if r else {}) for s, b, r in responses
    ]


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"SMTP 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
])  # fmt: skip
def test_answers_it_cannot_read_are_errors_not_guesses(bad: bytes) -> None:
    with pytest.raises(HttpError):
        ResponseParser().feed(bad)


async def test_the_client_talks_to_a_real_server_and_reports_a_dead_one() -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"got": body.decode(), "path": request.path},
                                 status=201, headers={"Retry-After": "3"})  # fmt: skip

    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = Client("127.0.0.1", port, connections=4)
    try:
        answers = await asyncio.gather(*(client.request("POST", "/echo", {}, f"{i}".encode())
                                         for i in range(20)))  # fmt: skip
        assert [a.status for a in answers] == [201] * 20
        assert sorted(int(a.body.split(b'"got": "')[1].split(b'"')[0]) for a in answers) == \
            list(range(20))  # fmt: skip
        assert answers[0].headers == {"retry-after": "3"}
    finally:
        await client.aclose()
        await runner.cleanup()
    with pytest.raises((HttpError, OSError)):
        await Client("127.0.0.1", port, timeout=2).request("GET", "/")
