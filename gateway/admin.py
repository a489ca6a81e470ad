"""The admin API under ``/admin/v1/``: the same SaleAdmin functions as the CLI.

Every path under ``/admin/`` needs ``Authorization: Bearer $FLASHSALE_ADMIN_TOKEN``, compared
in constant time, and answers 401 before anything else without it: unknown paths and wrong
methods included, so the API's shape is not visible to strangers. Buyer tokens never pass.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from flashsale.errors import InvalidInput, Unauthorized
from flashsale.salespec import parse_sale
from gateway.http import bearer, json_body, json_response
from gateway.middleware import Handler
from gateway.state import CLIENTS, SALES, SETTINGS
from reconciler.audit import audit_sale

PREFIX = "/admin/"


def require_admin(request: web.Request) -> None:
    """The guard run before every request (:func:`gateway.middleware.edge`): 401 for a path
    under ``/admin/`` without the admin token, before routing."""
    if request.path.startswith(PREFIX) or request.path == PREFIX.rstrip("/"):
        expected = request.app[SETTINGS].admin_token.reveal().encode()
        given = bearer(request).encode()  # Unauthorized (missing_token) when absent
        # compare_digest on equal-length inputs only leaks the length, which is public.
        if not expected or not hmac.compare_digest(given, expected):
            raise Unauthorized("invalid admin token")


async def create_sale(request: web.Request) -> web.Response:
    spec = parse_sale(await json_body(request))
    return json_response(await request.app[SALES].create(spec), 201)


async def sale_status(request: web.Request) -> web.Response:
    return json_response(await request.app[SALES].status(request.match_info["sale"]))


async def preload(request: web.Request) -> web.Response:
    body = await json_body(request, allowed={"force"}, optional=True)
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise InvalidInput("force", "must be true or false")
    results = await request.app[SALES].preload(request.match_info["sale"], force=force)
    return json_response({
        "results": [
            {"sku": r.sku, "outcome": r.outcome, "total": r.counts.total,
             "available": r.counts.available, "held": r.counts.held, "sold": r.counts.sold}
            for r in results
        ]
    })  # fmt: skip


async def add_stock(request: web.Request) -> web.Response:
    body = await json_body(request, allowed={"sku", "add"})
    sales = request.app[SALES]  # which validates the SKU id and the units
    return json_response(
        await sales.add_stock(request.match_info["sale"], body.get("sku"), body.get("add"))
    )


async def audit(request: web.Request) -> web.Response:
    """The post-sale audit (``flashsale audit SALE --json``): 200 with the report whether it
    passed or not; ``passed`` says which."""
    app, sale_id = request.app, request.match_info["sale"]
    await app[SALES].get(sale_id)  # 404 for an unknown sale
    c = app[CLIENTS]
    report = await audit_sale(c.pool, c.redis, c.provider, app[SETTINGS], sale_id)
    return json_response(report.json())


async def update_sale(request: web.Request) -> web.Response:
    """``PATCH /admin/v1/sales/{sale}``: change what can change while a sale runs (today its
    ``admission_rate``)."""
    body = await json_body(request, allowed={"admission_rate"})
    if "admission_rate" not in body:
        raise InvalidInput("admission_rate", "is required")
    sales = request.app[SALES]
    return json_response(
        await sales.set_admission_rate(request.match_info["sale"], body["admission_rate"])
    )


def lifecycle(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return json_response(
            await request.app[SALES].set_status(request.match_info["sale"], action)
        )

    return handle


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/v1/sales", create_sale)
    r.add_get("/admin/v1/sales/{sale}", sale_status)
    r.add_patch("/admin/v1/sales/{sale}", update_sale)
    r.add_post("/admin/v1/sales/{sale}/preload", preload)
    r.add_post("/admin/v1/sales/{sale}/stock", add_stock)
    r.add_get("/admin/v1/sales/{sale}/audit", audit)
    for action in ("pause", "resume", "end"):
        r.add_post(f"/admin/v1/sales/{{sale}}/{action}", lifecycle(action))
