"""Cross-origin access for storefronts (``FLASHSALE_CORS_ORIGINS``), through aiohttp-cors.

A storefront on another origin calls the buyer API (``/v1/...``) from the buyer's browser.
Each listed origin may send the headers the API reads and read the headers it answers with
(``Retry-After`` above all, so the page can honour it on a 429 or 503). Preflight requests
are answered by aiohttp-cors: 200 with the allowed method and headers for a listed origin,
403 ``cors_refused`` for any other (the message names the origin, method or header), and
for every origin when none is listed (the message names the setting).
``*`` allows any origin and never credentials; a listed origin may send credentials (the
buyer token in a cookie on the gateway's domain). The admin API and the operators'
endpoints are never cross-origin.
"""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from gateway.http import error_response

# What a storefront's request may carry, and what it may read from the answer.
# Every header the buyer API reads (the join challenge's included) and every one a storefront
# may want to read back.
REQUEST_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "X-Admission-Token",
                   "X-Queue-Ticket", "X-Challenge", "X-Challenge-Solution",
                   "X-Request-Id")  # fmt: skip
# Date and Age: the server's clock, for countdowns that do not trust the device's.
RESPONSE_HEADERS = ("Retry-After", "X-Request-Id", "Date", "Age")
PREFLIGHT_CACHE_S = 600


def setup(app: web.Application, origins: tuple[str, ...]) -> None:
    """Allow ``origins`` on every buyer route of ``app`` (call after the routes are added).
    With none, a browser's preflight is refused saying what to set."""
    if not origins:
        for resource in app.router.resources():
            if isinstance(resource, web.Resource) and resource.canonical.startswith("/v1/"):
                resource.add_route("OPTIONS", _no_cross_origin)
        return
    options = {
        origin: aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
            allow_credentials=origin != "*",
            allow_headers=REQUEST_HEADERS,
            expose_headers=RESPONSE_HEADERS,
            max_age=PREFLIGHT_CACHE_S,
        )
        for origin in origins
    }
    cors = aiohttp_cors.setup(app, defaults=options)
    for route in list(app.router.routes()):
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/v1/"):
            cors.add(route)


async def _no_cross_origin(_request: web.Request) -> web.Response:
    """A preflight when no origin is allowed: 403, saying what would allow one (aiohttp's 405
    named neither CORS nor the setting)."""
    return error_response(403, "cors_refused", "this gateway allows no calls from other "
                          "origins: list the storefront's in FLASHSALE_CORS_ORIGINS")  # fmt: skip
