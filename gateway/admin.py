"""The admin API under ``/admin/v1/``: the same SaleAdmin functions as the CLI.

Every path under ``/admin/`` needs ``Authorization: Bearer $FLASHSALE_ADMIN_TOKEN``, compared
in constant time, and answers 401 before anything else without it: unknown paths and wrong
methods included, so the API's shape is not visible to strangers. Buyer tokens never pass.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from functools import partial

from aiohttp import web

from allocator.sale_reads import MAX_PAGE, order_state, page_size
from flashsale.encodings import as_text
from flashsale.errors import InvalidInput, Unauthorized, meant, shown
from flashsale.http_protocol import EVERY_ANSWER
from flashsale.records import body_fingerprint, idempotency_key
from flashsale.salespec import as_sale_file, parse_sale, parse_skus
from flashsale.sku_csv import SKUS_TEXT, parse_import
from gateway.console import OPEN_PATHS
from gateway.http import (
    MAX_ADMIN_BODY,
    bearer,
    body_bytes,
    client_ip,
    json_body,
    json_response,
    parse_json,
)
from gateway.middleware import Handler
from gateway.openapi_admin import admin_paths
from gateway.state import CLIENTS, SALES, SETTINGS
from reconciler.archive import archive_sale
from reconciler.audit import audit_sale

PREFIX = "/admin/"

log = logging.getLogger("flashsale.admin")


def require_admin(request: web.Request) -> None:
    """The guard run before every request (:func:`gateway.middleware.edge`): 401 for a path
    under ``/admin/`` without the admin token, before routing."""
    if request.path in OPEN_PATHS and request.method == "GET":
        return  # the live page's shell and its chart library: no data in them
    if request.path.startswith(PREFIX) or request.path == PREFIX.rstrip("/"):
        given = bearer(request).encode()  # Unauthorized (missing_token) when absent
        # Each key of a rotation is compared (compare_digest leaks only the lengths, which
        # are public), so how far the list was read says nothing either.
        matches = [hmac.compare_digest(given, key.encode())
                   for key in request.app[SETTINGS].admin_token.each_key()]  # fmt: skip
        if not any(matches):
            raise Unauthorized("invalid admin token")
        if request.query:
            check_query(request)


def _query_names() -> dict[tuple[str, str], tuple[str, ...]]:
    """The query parameters of each admin operation, as the API's OpenAPI document lists them."""
    return {
        (method.upper(), path): tuple(p["name"] for p in op.get("parameters", ())
                                      if p["in"] == "query")
        for path, item in admin_paths().items() for method, op in item.items()
    }  # fmt: skip


QUERY_NAMES = _query_names()


def check_query(request: web.Request) -> None:
    """Refuse a query parameter the operation does not take, or one given more than once, as
    an unknown field or a key named twice in a body is: ``?stauts=ended`` would otherwise list
    every sale, as if no filter had been asked."""
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else ""
    names = QUERY_NAMES.get((request.method, path))
    if names is None:
        return  # not an admin operation: its 404 or 405 follows
    for key in dict.fromkeys(request.query):
        if key not in names:
            guess = meant(key, names)
            hint = f" (did you mean {guess}?)" if guess else ""
            raise InvalidInput(key, f"not a parameter of {request.method} {path}{hint}, which "
                                    f"takes {', '.join(names) or 'none'}")  # fmt: skip
        given = len(request.query.getall(key))
        if given > 1:
            raise InvalidInput(key, f"given {given} times; give it once")


async def create_sale(request: web.Request) -> web.Response:
    """201 with the sale; with an ``Idempotency-Key``, a retry answers 200 with the same sale
    (``"replayed": true``) instead of making a second one."""
    key = idempotency_key(request.headers.get("Idempotency-Key"), required=False)
    body = await json_body(request, unique=True, most=MAX_ADMIN_BODY)
    spec = parse_sale(body)
    sale = await request.app[SALES].create(spec, key=key, fingerprint=body_fingerprint(body))
    return json_response(sale, 200 if sale.get("replayed") else 201)


async def list_sales(request: web.Request) -> web.Response:
    """``GET /admin/v1/sales?status=&state=&limit=&offset=``: newest first; ``next_offset``
    is the ``offset`` of the next page (null on the last)."""
    q = request.query
    page = await request.app[SALES].list_sales(
        status=q.get("status"),
        state=q.get("state"),
        limit=q.get("limit", MAX_PAGE),
        offset=q.get("offset", 0),
    )
    return json_response(page)


async def list_orders(request: web.Request) -> web.Response:
    """``GET /admin/v1/sales/{sale}/orders?state=&limit=&after=``: a page of orders, oldest
    first (by ``created_at``); ``next`` is the ``after`` of the next page (null on the last)."""
    q = request.query
    limit = q.get("limit", str(MAX_PAGE))
    orders = await request.app[SALES].orders(request.match_info["sale"], state=q.get("state"),
                                             limit=limit, after=q.get("after"))  # fmt: skip
    full = len(orders) == page_size(limit)  # valid: orders() read it
    return json_response({"orders": orders, "next": orders[-1]["id"] if full else None})


async def export_orders(request: web.Request) -> web.StreamResponse:
    """``GET /admin/v1/sales/{sale}/orders.csv?state=``: every order as CSV, streamed from
    Postgres's ``COPY``."""
    sales, sale_id = request.app[SALES], request.match_info["sale"]
    state = request.query.get("state")
    await sales.get(sale_id)  # 404 (and the state check) before the answer starts
    order_state(state)
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{sale_id}-orders.csv"',
        **EVERY_ANSWER,
    })  # fmt: skip
    await response.prepare(request)
    await sales.export_orders(sale_id, response.write, state=state)
    await response.write_eof()
    return response


async def import_skus(request: web.Request) -> web.Response:
    """``POST /admin/v1/sales/{sale}/skus`` with a CSV body (the ``sale import`` format), or
    JSON ``{"skus": [...]}`` (the sale file's form): every SKU validated before anything is
    written. A body that opens with ``{`` is JSON whatever its content type says (``curl -d``
    sends a form type); no CSV header can."""
    raw = await body_bytes(request, MAX_ADMIN_BODY)
    content = as_text(raw, "body")  # as Windows tools save it too
    sale = request.match_info["sale"]
    if not content.strip(" \t\r\n\ufeff"):
        raise InvalidInput("body", f"empty: send {SKUS_TEXT}")
    # Parsed and checked in a thread: 200,000 rows took 3.5 s, which on the event loop every
    # buyer of this process waited for.
    read_json = partial(parse_json, unique=True)
    if request.content_type == "application/json":
        batch = await asyncio.to_thread(lambda: parse_skus(read_json(content)))
    else:
        batch = await asyncio.to_thread(parse_import, content, read_json)
    answer = await request.app[SALES].import_skus(sale, batch, with_skus=with_skus(request))
    return json_response(answer)


def with_skus(request: web.Request) -> bool:
    """A change's answer holds the sale's SKUs (``?skus=all``, the default) or its settings
    alone (``?skus=none``): 26 MB and seconds of reads for a sale of 200,000 SKUs."""
    asked = request.query.get("skus", "all")
    if asked not in ("all", "none"):
        raise InvalidInput("skus", f"must be all or none, got {shown(asked)}")
    return asked == "all"


async def sale_status(request: web.Request) -> web.Response:
    """``GET /admin/v1/sales/{sale}``: the sale's stock per SKU, or of one (``?sku=``)."""
    only = request.query.get("sku")
    return json_response(await request.app[SALES].status(request.match_info["sale"], only))


async def sale_template(request: web.Request) -> web.Response:
    """``GET /admin/v1/sales/{sale}/template``: the sale as a sale file (``sale show
    --template``), the body of a copy."""
    return json_response(as_sale_file(await request.app[SALES].get(request.match_info["sale"])))


async def preload(request: web.Request) -> web.Response:
    body = await json_body(request, allowed={"force"}, optional=True, unique=True)
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise InvalidInput("force", f"must be true or false, got {shown(force)}")
    results = await request.app[SALES].preload(request.match_info["sale"], force=force)
    return json_response({
        "results": [
            {"sku": r.sku, "outcome": r.outcome, "total": r.counts.total,
             "available": r.counts.available, "held": r.counts.held, "sold": r.counts.sold}
            for r in results
        ]
    })  # fmt: skip


async def change_stock(request: web.Request) -> web.Response:
    """``POST /admin/v1/sales/{sale}/stock``: ``{"sku", "add": N}`` or ``{"sku", "remove": N}``;
    with an ``Idempotency-Key``, a retry answers what was done (``"replayed": true``)."""
    key = idempotency_key(request.headers.get("Idempotency-Key"), required=False)
    body = await json_body(request, allowed={"sku", "add", "remove"}, unique=True)
    sales, sale_id = request.app[SALES], request.match_info["sale"]  # SaleAdmin validates
    if ("add" in body) == ("remove" in body):
        raise InvalidInput("add", "give either add or remove")
    if "remove" in body:
        lowered = await sales.lower_stock(sale_id, body.get("sku"), body["remove"], key=key)
        return json_response(lowered)
    added = await sales.add_stock(sale_id, body.get("sku"), body["add"], key=key)
    # Added in Postgres, not in Redis yet (an outage): 202, as the reconciler finishes it.
    return json_response(added, status=202 if added.get("redis") == "pending" else 200)


async def remove_sku(request: web.Request) -> web.Response:
    """``DELETE /admin/v1/sales/{sale}/skus/{sku}``: only a SKU nobody reserved."""
    m = request.match_info
    sales = request.app[SALES]
    return json_response(await sales.remove_sku(m["sale"], m["sku"], with_skus=with_skus(request)))


async def delete_sale(request: web.Request) -> web.Response:
    """``DELETE /admin/v1/sales/{sale}``: only a sale never preloaded (409 otherwise)."""
    deleted = await request.app[SALES].delete(request.match_info["sale"])
    return json_response({"id": deleted["id"], "deleted": True})


async def audit(request: web.Request) -> web.Response:
    """The post-sale audit (``flashsale audit SALE --json``): 200 with the report whether it
    passed or not; ``passed`` says which."""
    app, sale_id = request.app, request.match_info["sale"]
    await app[SALES].row(sale_id)  # 404 for an unknown sale
    c = app[CLIENTS]
    report = await audit_sale(c.pool, c.redis, c.provider, app[SETTINGS], sale_id)
    return json_response(report.json())


async def archive(request: web.Request) -> web.Response:
    """``POST /admin/v1/sales/{sale}/archive`` (``flashsale sale archive``): 409 while the sale
    has not ended or its audit fails, with nothing deleted."""
    app, sale_id = request.app, request.match_info["sale"]
    c = app[CLIENTS]
    archived = await archive_sale(c.pool, c.redis, c.provider, app[SETTINGS], sale_id)
    return json_response(archived.json())


async def update_sale(request: web.Request) -> web.Response:
    """``PATCH /admin/v1/sales/{sale}``: change settings (anything before the start; once
    started, ``LIVE_EDITABLE`` only: 409 ``sale_started`` otherwise)."""
    body = await json_body(request, unique=True)
    sale = request.match_info["sale"]
    return json_response(await request.app[SALES].update(sale, body, with_skus=with_skus(request)))


async def update_sku(request: web.Request) -> web.Response:
    """``PATCH /admin/v1/sales/{sale}/skus/{sku}``: a SKU's title, or before the start its
    price, currency, per-buyer limit or hold time."""
    body = await json_body(request, unique=True)
    m = request.match_info
    sales, every = request.app[SALES], with_skus(request)
    return json_response(await sales.update_sku(m["sale"], m["sku"], body, with_skus=every))


def lifecycle(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        sale, every = request.match_info["sale"], with_skus(request)
        return json_response(await request.app[SALES].set_status(sale, action, with_skus=every))

    return handle


def logged(handler: Handler) -> Handler:
    """``handler``, each change it makes logged (INFO, ``flashsale.admin``: method, path,
    status, the caller's address and the request id): a sale paused, ended or restocked is
    otherwise seen only in its new state, not who did it or when. A refused request changes
    nothing and is not logged here."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        fields = {"client": client_ip(request)}
        if sale := request.match_info.get("sale"):
            fields["sale_id"] = sale
        log.info("admin %s %s: %s", request.method, request.path, response.status, extra=fields)
        return response

    return handle


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/v1/sales", logged(create_sale))
    r.add_get("/admin/v1/sales", list_sales)
    r.add_get("/admin/v1/sales/{sale}/orders", list_orders)
    r.add_get("/admin/v1/sales/{sale}/orders.csv", export_orders)
    r.add_post("/admin/v1/sales/{sale}/skus", logged(import_skus))
    r.add_get("/admin/v1/sales/{sale}", sale_status)
    r.add_get("/admin/v1/sales/{sale}/template", sale_template)
    r.add_patch("/admin/v1/sales/{sale}", logged(update_sale))
    r.add_delete("/admin/v1/sales/{sale}", logged(delete_sale))
    r.add_patch("/admin/v1/sales/{sale}/skus/{sku}", logged(update_sku))
    r.add_delete("/admin/v1/sales/{sale}/skus/{sku}", logged(remove_sku))
    r.add_post("/admin/v1/sales/{sale}/preload", logged(preload))
    r.add_post("/admin/v1/sales/{sale}/stock", logged(change_stock))
    r.add_get("/admin/v1/sales/{sale}/audit", audit)
    r.add_post("/admin/v1/sales/{sale}/archive", logged(archive))
    for action in ("pause", "resume", "end"):
        r.add_post(f"/admin/v1/sales/{{sale}}/{action}", logged(lifecycle(action)))
