"""Requests aiohttp's HTTP parser refuses, answered as every other error: in JSON.

A request line or header longer than 8190 bytes (a bloated cookie on a shared domain), a
header no parser can read, bytes that are not HTTP at all: aiohttp answers these before any
application code runs, in plain text that echoes the start of the offending line, and logs each
one as an ERROR with a traceback. A storefront's JSON client cannot read the answer, and anyone
on the internet can fill the logs with alarms. aiohttp has no hook for it (aio-libs/aiohttp
issue 3287), so the server's connections use a request handler whose ``handle_error`` answers
``{"error": {"code": "bad_request", …}}`` for a 4xx and logs one INFO line without the
request's bytes. A 5xx keeps aiohttp's handling (it is the server's fault, and logged so).
The gateway's servers and every service's ops port use it.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("flashsale.http")
# Every answer's Server header: the engine, not the software and versions it runs on (what a
# scanner would look known flaws up by).
SERVER = "flashsale"
# The headers every answer carries: that, and that no answer is to be read as another type
# than it says (a browser sniffing a JSON error as HTML, say).
EVERY_ANSWER = {"Server": SERVER, "X-Content-Type-Options": "nosniff"}

# What a refusal of aiohttp's parser means, by its exception: the answer names the cause, never
# the request's bytes (a client's own token or cookie need not travel back, nor into logs).
REASONS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "the URL or a header is longer than the server accepts"),
    (http_exceptions.BadHttpMethod, "not an HTTP request"),
    (http_exceptions.InvalidHeader, "a header cannot be read"),
    (http_exceptions.BadStatusLine, "the request line cannot be read"),
)


def reason(exc: BaseException | None) -> str:
    """What aiohttp's parser refused, in a few words."""
    for kind, text in REASONS:
        if isinstance(exc, kind):
            return text
    return "the request cannot be read"


def unrouted(request: web.BaseRequest, exc: web.HTTPException, serves: str) -> str:
    """What a request no route took is told (aiohttp's "Not Found" named nothing): a path
    not served, what the address serves (``serves``); a method not taken, those that are."""
    path = request.path if len(request.path) <= 80 else f"{request.path[:79]}…"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "").replace(",", ", ")
        return f"{request.method} {path}: this address takes {allowed}"
    return f"nothing at {path}: {serves}"


class _JsonErrors(RequestHandler):
    __slots__ = ()  # the same layout as aiohttp's handler, whose class it takes (below)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:  # fmt: skip
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        why = reason(exc)
        # A scanner's first bytes are no HTTP at all: as aiohttp, not worth an INFO line.
        level = logging.DEBUG if isinstance(exc, http_exceptions.BadHttpMethod) else logging.INFO
        log.log(level, "malformed request from %s refused (%d): %s", request.remote, status, why)
        error = {"code": "bad_request", "message": f"malformed HTTP request: {why}"}
        answer = web.Response(body=orjson.dumps({"error": error}), status=status,
                              content_type="application/json",
                              headers=EVERY_ANSWER)  # fmt: skip
        answer.force_close()
        return answer


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _JsonErrors
        return handler


def answer_malformed_in_json(server: web.Server) -> None:
    """Make ``server`` (an ``AppRunner``'s, once set up) answer requests its parser refuses
    in JSON. It is made by the runner, hence the class change rather than a subclass made
    here."""
    server.__class__ = _JsonErrorServer
