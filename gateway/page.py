"""``GET /sales/{sale}``: the waiting-room page, plain HTML and a little JavaScript.

The storefront sends the buyer here with their buyer token in the URL fragment
(``/sales/SALE#token=...``: a fragment never reaches a server or its logs), or the buyer
pastes it. The page joins the queue, polls at the server's ``retry_after_ms``, shows the
position, the ETA and the state, and lets an admitted buyer reserve.
"""

from __future__ import annotations

import html
import importlib.resources

from aiohttp import web

from gateway.catalog import sale_summary

PAGE = importlib.resources.files("gateway").joinpath("waiting_room.html").read_text()


async def waiting_room(request: web.Request) -> web.Response:
    info = await sale_summary(request, request.match_info["sale"])  # 404 for unknown sales
    sale_json = '"' + info["id"] + '"'  # ids are [A-Za-z0-9._-]: safe inside a JS string
    body = PAGE.replace("__NAME__", html.escape(info["name"])).replace("__SALE_JSON__", sale_json)
    return web.Response(
        text=body,
        content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline' 'self'; "
            "style-src 'unsafe-inline'",
            "Referrer-Policy": "no-referrer",
        },
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/sales/{sale}", waiting_room)
