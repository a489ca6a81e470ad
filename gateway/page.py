"""``GET /sales/{sale}``: the waiting-room page, plain HTML and a little JavaScript.

The storefront sends the buyer here with their buyer token in the URL fragment
(``/sales/SALE#token=...``: a fragment never reaches a server or its logs); the page keeps it
for the sale and removes it from the address bar. It shows the product and price, a
countdown before the start, joins (or registers for the draw), polls at the server's
``retry_after_ms`` riding out 429, 503 and dropped connections, lets the buyer leave, reserve
and cancel, and follows the reservation to its outcome. An admitted buyer reserves at the
status answer's ``reserve_url`` when there is one (the reservations listener, allowed by the
page's Content-Security-Policy), and here if that cannot be reached. Everything it needs survives a
reload (localStorage; in a browser that keeps no site data, the tab alone, and the page says
so). It needs no secure context but for a sale's join challenge (``crypto.subtle``), and says
so on a plain-HTTP address. Linked as ``/sales/SALE?sku=SKU`` (a product of a catalogue sale), it
reads and offers that SKU alone (``GET /v1/sales/SALE?sku=SKU``).
"""

from __future__ import annotations

import functools
import html
import importlib.resources

from aiohttp import web

from flashsale.keys import ID_CHARACTERS
from gateway.catalog import sale_summary
from gateway.documents import Document, document_response
from gateway.http import SERVES, moved_to
from gateway.state import SETTINGS

PAGE = importlib.resources.files("gateway").joinpath("waiting_room.html").read_text()


@functools.lru_cache(maxsize=256)
def rendered(sale_id: str, name: str) -> Document:
    """The page of one sale, made once per name (a sale's name may change) and compressed
    once: every buyer of a spike loads it, and a reload is answered 304 by its ETag."""
    sale_json = '"' + sale_id + '"'  # ids are [A-Za-z0-9._-]: safe inside a JS string
    body = PAGE.replace("__NAME__", html.escape(name)).replace("__SALE_JSON__", sale_json)
    return Document.of(None, body.encode(), "text/html; charset=utf-8", level=9)  # 23 KB: 8


async def waiting_room(request: web.Request) -> web.Response:
    info = (await sale_summary(request, request.match_info["sale"])).document.data  # 404 if unknown
    page = rendered(info["id"], info["name"])
    # The page may call the reservations listener (an admitted status answer's reserve_url).
    settings = request.app[SETTINGS]
    listener = settings.reservations_url
    connect = f"; connect-src 'self' {listener}" if listener else ""
    # Framed only by the storefronts allowed to call the API (FLASHSALE_CORS_ORIGINS): another
    # site could show the page under its own and invite a click on "Leave the queue".
    framers = " ".join(("'self'", *settings.cors_origins))
    return document_response(request, page, {
        "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline' 'self'; "
        "style-src 'unsafe-inline'; img-src data:; "  # the empty icon: no /favicon.ico ask
        f"worker-src blob:{connect}; frame-ancestors {framers}",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",  # asked again each time: a 304 while it is the same
    })  # fmt: skip


# What a browser is shown when the page itself cannot be served (a shop's link to a sale that
# is not there, the gateway at capacity, a server down): words, not the API's JSON, and a page
# that loads itself again after Retry-After.
ERROR_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem;
color:#222}}h1{{font-size:1.4rem}}</style></head>
<body><main><h1>{title}</h1><p>{text}</p></main></body></html>
"""


# The pages a browser opens, and what each says while the gateway is too busy to serve it.
PAGES = {"/sales/{sale}": "The waiting room is very busy",
         "/admin/": "The gateway is at capacity"}  # fmt: skip


def error_page(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """``response``, a refusal (the middleware passes only those), as a page when a browser
    asked for the page; a refusal of anything else as it is."""
    resource = request.match_info.route.resource
    path = None if resource is None else resource.canonical
    if "text/html" not in request.headers.get("Accept", ""):
        return response
    if resource is None and response.status == 404:  # no route: what there is, linked
        return _page(404, "Nothing here", _SERVED, "")
    if path not in PAGES:
        return response
    retry = response.headers.get("Retry-After")
    refresh = ""
    if response.status == 404:
        title = "This sale does not exist"
        text = "Check the link the shop sent you: this address names no sale."
    elif retry is not None and retry.isdigit():
        title = PAGES[path]
        text = f"This page tries again by itself in {retry} s. Keep it open."
        refresh = f'\n<meta http-equiv="refresh" content="{retry}">'
    else:
        title = "This page cannot be shown right now"
        text = "Try again in a moment."
    return _page(response.status, title, html.escape(text), refresh, retry)


def _page(status: int, title: str, text: str, refresh: str,
          retry: str | None = None) -> web.Response:  # fmt: skip
    """An error page (``text``: HTML)."""
    return web.Response(
        status=status, content_type="text/html", charset="utf-8",
        text=ERROR_PAGE.format(title=title, text=text, refresh=refresh),
        headers={"Cache-Control": "no-store", **({"Retry-After": retry} if retry else {}),
                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
    )  # fmt: skip


def _served() -> str:
    """What the gateway serves, as a page lists it: what a browser can open, linked."""
    items = []
    for path, what in SERVES:
        opened = "SALE" not in path and "/v1/" not in path
        shown = f'<a href="{path}">{path}</a>' if opened else f"<code>{path}</code>"
        items.append(f"<li>{shown}: {html.escape(what)}</li>")
    return (
        f"This gateway serves:</p><ul>{''.join(items)}</ul><p>A buyer opens the link the shop sent."
    )


_SERVED = _served()


def setup(app: web.Application) -> None:
    app.router.add_get("/sales/{sale}", waiting_room)
    app.router.add_get(f"/sales/{{sale:{ID_CHARACTERS}}}/", moved_to("/sales/{sale}"))
