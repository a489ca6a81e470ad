"""Request and response helpers shared by every route module: JSON answers and error bodies,
JSON request bodies, bearer credentials, the caller's buyer id and sale, rate limits."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from functools import lru_cache
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any

import orjson
from aiohttp import web

from allocator.rate_limits import RateKeys
from flashsale.encodings import as_text, has_mark
from flashsale.errors import (
    Forbidden,
    InvalidInput,
    InvalidToken,
    NotFound,
    RequestTimeout,
    Unauthorized,
    shown,
    unknown_name,
)
from flashsale.keys import ID_PATTERN, rate_limit_key
from flashsale.salespec import unique_keys
from flashsale.settings import Rate
from flashsale.tokens import buyer_subject
from gateway.metrics import ERROR_CODE
from gateway.state import LIMITER, SETTINGS, SIGNERS

MAX_BODY = 16 * 1024  # a buyer's request
# The Authorization schemes named when one is sent instead of Bearer (anything else could be
# part of a secret, and is not echoed).
SCHEMES = {s.lower(): s for s in ("Basic", "Digest", "Negotiate", "NTLM", "Token", "JWT")}
# A merchandiser's: a sale file or CSV of 100,000 SKUs is about 3 MB. The admin token is
# checked before any body is read (gateway.middleware.edge).
MAX_ADMIN_BODY = 32 * 1024 * 1024


def json_response(
    data: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


# What the gateway serves, as a request for anything else is told (JSON, or a page of links).
SERVES = (
    ("/sales/SALE", "a sale's waiting-room page, as the shop links it"),
    ("/admin/", "the operators' page"),
    ("/v1/", "the buyer API"),
    ("/admin/v1/", "the admin API"),
    ("/openapi.json", "both APIs described"),
    ("/readyz", "readiness, also /healthz"),
    ("/livez", "liveness"),
    ("/metrics", "Prometheus metrics"),
)
GATEWAY_SERVES = "this gateway serves " + ", ".join(f"{path} ({what})" for path, what in SERVES)

# Where a request an address does not take (405) was likely meant to go: a buyer's place is
# read at the queue's status, a reservation at its own address.
MEANT: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("GET", re.compile(r"/v1/sales/([\w.-]{1,64})/queue"),
     "a place in the queue is read at GET /v1/sales/{sale}/queue/status, with its ticket"),
    ("GET", re.compile(r"/v1/sales/[\w.-]{1,64}/reservations"),
     "a reservation is read at GET /v1/reservations/{id}"),
    ("DELETE", re.compile(r"/v1/sales/[\w.-]{1,64}/reservations"),
     "a hold is cancelled at DELETE /v1/reservations/{id}"),
)  # fmt: skip


def meant(method: str, path: str) -> str | None:
    """The address a ``method`` request to ``path`` was likely meant for, said; None if none."""
    for takes, pattern, said in MEANT:
        found = pattern.fullmatch(path) if takes == method else None
        if found is not None:
            return said.replace("{sale}", found.group(1)) if found.groups() else said
    return None


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    details: Mapping[str, object] | None = None,
) -> web.Response:
    """The one error body, ``{"error": {"code", "message"}}``, with the error's ``details``:
    ``"field"`` (a dotted path, or a header's name) when one input is at fault, ``"left"``
    for ``not_enough_left``; the code is kept on the response for the refusal metrics."""
    error = {"code": code, "message": message, **(details or {})}
    response = json_response({"error": error}, status, headers)
    response[ERROR_CODE] = code
    return response


def moved_to(path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler answering 308 to ``path`` (formatted with the route's match info, which the
    route holds to an id's characters) and the request's query: a link one slash off its
    page. The browser keeps the fragment."""

    async def handler(request: web.Request) -> web.Response:
        location, query = path.format(**request.match_info), request.rel_url.raw_query_string
        return web.Response(status=308, headers={"Location": f"{location}?{query}" if query
                                                 else location})  # fmt: skip

    return handler


async def json_body(
    request: web.Request,
    *,
    allowed: Collection[str] | None = None,
    optional: bool = False,
    unique: bool = False,
    most: int = MAX_BODY,
) -> dict[str, Any]:
    """The request's JSON object (at most ``most`` bytes). Malformed JSON, a non-object, (with
    ``allowed``) an unknown field or (with ``unique``) a key named twice in one object is a 422
    naming the problem; an empty body is ``{}`` when ``optional``."""
    raw = await body_bytes(request, most)
    if not raw.strip():
        if optional:
            return {}
        raise InvalidInput("body", "empty: send a JSON object", code="malformed_json")
    try:
        data = parse_json(raw, unique=unique)
    except InvalidInput:  # read the content type on this path only, not on every reservation
        kind = request.content_type
        if kind in FORMS and not raw.lstrip().startswith((b"{", b"[")):  # curl -d name=x
            raise InvalidInput("body", f"form-encoded ({kind}): send a JSON object, as curl "
                               "--json '{...}' does", code="malformed_json") from None  # fmt: skip
        raise
    if not isinstance(data, dict):
        raise InvalidInput("body", "must be a JSON object")
    if allowed is not None:
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            message = unknown_name(unknown[0], sorted(allowed))
            raise InvalidInput(unknown[0], message, code="unknown_field")
    return data


FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


async def body_bytes(request: web.Request, most: int = MAX_BODY) -> bytes:
    """The request's body; 408 when it does not arrive within ``FLASHSALE_BODY_TIMEOUT``, 413
    (saying the limit) when it is larger than ``most`` bytes."""
    if most != request.client_max_size:
        request = request.clone(client_max_size=most)
    try:
        async with asyncio.timeout(request.app[SETTINGS].body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time") from None
    except web.HTTPRequestEntityTooLarge:
        size = f"{most // 2**20} MiB" if most >= 2**20 else f"{most // 1024} KiB"
        raise web.HTTPRequestEntityTooLarge(
            most, reason=f"the request body is larger than {size}"
        ) from None


def parse_json(raw: bytes | str, *, unique: bool = False) -> Any:
    """``raw`` as JSON; a 422 ``malformed_json`` saying where it is not. With ``unique`` (the
    merchandisers' bodies), an object naming a key twice is a 422 ``duplicate_key``: a second
    look with the standard parser, which can see the pairs."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # A byte-order mark, as Windows tools save text: looked for only once parsing failed.
        body = raw if isinstance(raw, bytes) else raw.encode()
        if not has_mark(body):
            raise InvalidInput("body", f"malformed JSON: {exc}", code="malformed_json") from None
        return parse_json(as_text(body, "body").encode(), unique=unique)
    if unique:
        try:
            json.loads(raw, object_pairs_hook=unique_keys("body"))
        except RecursionError:  # orjson reads 1,024 levels, this parser's recursion fewer
            raise InvalidInput("body", "malformed JSON: nested too deeply",
                               code="malformed_json") from None  # fmt: skip
    return data


def bearer(request: web.Request) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 when absent, empty or of another
    scheme, saying which."""
    header = request.headers.get("Authorization")
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if header is None:
        said = "missing bearer token"
    elif not header or scheme.lower() == "bearer":
        said = "the bearer token is empty"
    elif not token:  # a token alone: never echoed, it may be a secret
        said = "Authorization must be 'Bearer <token>': the word Bearer is missing"
    else:  # Basic credentials, say
        kind = SCHEMES.get(scheme.lower())
        said = "Authorization must be 'Bearer <token>', got " + (
            f"the {kind} scheme" if kind else "another scheme"
        )
    raise Unauthorized(said, code="missing_token")


def client_ip(request: web.Request) -> str:
    """The caller's address, for per-IP limits: an IPv6 address as its /64 (one host has a
    whole /64 to pick from).

    ``X-Forwarded-For`` counts only when the direct peer is a trusted proxy, and then only its
    rightmost address that is not a trusted proxy: each proxy appends the address it saw (to
    the last line, or as a line of its own), and everything to the left of what a trusted
    proxy appended was written by the client. With
    ``FLASHSALE_TRUST_FORWARDED`` the peer alone is trusted; ``FLASHSALE_TRUSTED_PROXIES``
    lists the proxies' networks."""
    settings = request.app[SETTINGS]
    peer = request.remote or "unknown"
    proxies = settings.trusted_proxies
    if not (settings.trust_forwarded or proxies) or not _within(peer, proxies, default=True):
        return _bucket(peer)
    # Header lines of the same name are one list in their order (RFC 9110 5.3): a proxy may
    # add its own line after the client's rather than append to it.
    hops = ",".join(request.headers.getall("X-Forwarded-For", ())).split(",")
    for hop in reversed(hops):
        address = forwarded_address(hop.strip())
        if address is None:
            break  # not an address: the client wrote it
        if not _within(str(address), proxies, default=False):
            return _bucket(str(address))
    return _bucket(peer)


def _address(text: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(text)
    except ValueError:
        return None


# An address with the port the client used, as some proxies append it (Azure's Application
# Gateway): 198.51.100.7:51234, [2001:db8::1]:443, [2001:db8::1].
_WITH_PORT = (
    (re.compile(r"([0-9.]+):([0-9]{1,5})\Z"), IPv4Address),
    (re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?\Z"), IPv6Address),
)


def forwarded_address(text: str) -> IPv4Address | IPv6Address | None:
    """An ``X-Forwarded-For`` hop's address, with or without its port; None if it is none."""
    address = _address(text)
    if address is not None:
        return address
    for pattern, kind in _WITH_PORT:
        found = pattern.match(text)
        if found and int(found[2] or 0) <= 65_535:
            address = _address(found[1])
            return address if isinstance(address, kind) else None
    return None


@lru_cache(maxsize=65_536)  # the same few proxies and clients on every request
def _within(text: str, networks: tuple[IPv4Network | IPv6Network, ...], *, default: bool) -> bool:
    """``text`` is in one of ``networks`` (``default`` when none are listed)."""
    if not networks:
        return default
    address = _address(text)
    return address is not None and any(address in network for network in networks)


@lru_cache(maxsize=65_536)
def _bucket(text: str) -> str:
    address = _address(text)
    if isinstance(address, IPv6Address) and address.ipv4_mapped is None:
        return str(ip_network(f"{address}/64", strict=False))
    return text


def rate_subjects(request: web.Request, buyer: str | None = None) -> list[tuple[str, Rate]]:
    """The limits a writing request counts against: the caller's IP and, when known, the
    buyer's."""
    settings = request.app[SETTINGS]
    subjects = [(f"ip:{client_ip(request)}", settings.rate_per_ip)]
    if buyer is not None:
        subjects.append((f"buyer:{buyer}", settings.rate_per_buyer))
    return subjects


def rate_keys(request: web.Request, buyer: str) -> RateKeys:
    """The :func:`rate_subjects` of a request whose script counts them itself (a join or a
    reservation on a single Redis node)."""
    (ip, ip_rate), (who, buyer_rate) = rate_subjects(request, buyer)
    return RateKeys(
        rate_limit_key(ip) if ip_rate.enabled else None,
        rate_limit_key(who) if buyer_rate.enabled else None,
        (*ip_rate.gcra_us(), *buyer_rate.gcra_us()),
    )


async def rate_limit(request: web.Request, buyer: str | None = None) -> None:
    """Count a writing request against its :func:`rate_subjects`; 429 when over."""
    await request.app[LIMITER].check(rate_subjects(request, buyer))


async def buyer_of(request: web.Request) -> str:
    """The buyer id of the request's buyer token; 401 without a valid one. A storefront key
    published since the start is fetched (``BuyerTokens.verify_fetching``)."""
    return buyer_subject(await request.app[SIGNERS].buyer.verify_fetching(bearer(request)))


def sale_of(request: web.Request) -> str:
    """The ``{sale}`` of the path; 404 for anything that cannot be a sale id."""
    sale_id = request.match_info["sale"]
    if not ID_PATTERN.match(sale_id):
        raise NotFound(f"unknown sale {shown(sale_id)}", code="unknown_sale")
    return sale_id


def queue_ticket(request: web.Request, sale_id: str) -> tuple[dict[str, Any], str, int]:
    """The request's queue ticket for ``sale_id``: (claims, buyer, position); 401 / 403."""
    raw = request.headers.get("X-Queue-Ticket")
    if raw is None:
        raise InvalidToken("missing", "missing X-Queue-Ticket header")
    if not raw:
        raise InvalidToken("missing", "the X-Queue-Ticket header is empty: "
                                      "send the ticket of the join")  # fmt: skip
    claims = request.app[SIGNERS].ticket.verify(raw)
    buyer, position = buyer_subject(claims), claims.get("p")
    if claims.get("s") != sale_id:
        raise Forbidden("this ticket is for another sale", code="ticket_other_sale")
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise InvalidToken("malformed")
    return claims, buyer, position
