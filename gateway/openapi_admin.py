"""The admin API's paths in the gateway's OpenAPI document (``/admin/v1/``, the admin token)."""

from __future__ import annotations

from typing import Any

from allocator.sale_settings import SKU_EDITABLE
from gateway.openapi_parts import IDEMPOTENCY_KEY, SALE_PATH, errors, ok, op, query
from gateway.openapi_reports import (
    ARCHIVE_DUE,
    ARCHIVED,
    AUDIT,
    CURVE,
    LIVE_ROOM,
    SALE_STATUS,
    UNCOUNTED,
)
from gateway.openapi_schemas import ID, NULLABLE_STRING, SALE, SALE_SPEC, SALES, SKU_SPEC, TIME, obj

CREATE_KEY = {
    **IDEMPOTENCY_KEY,
    "required": False,
    "description": "a retry with the same key answers the same sale",
}

CHANGED_STOCK = {
    **SALE_STATUS,
    "properties": {**SALE_STATUS["properties"], "replayed": {"const": True}},
}
STOCK_KEY = {
    **IDEMPOTENCY_KEY,
    "required": False,
    "description": "a retry with the same key changes the stock once; with another change, "
    "422 idempotency_mismatch",
}


DELETED = obj({"id": ID, "deleted": {"const": True}}, ["id", "deleted"])
SKU_LIST = {"type": "array", "items": SKU_SPEC, "minItems": 1}  # SKUs to import


def admin_paths() -> dict[str, Any]:
    order_state = query(
        "state",
        {"type": "string"},
        "CONFIRMED, PAYMENT_FAILED, PENDING, PAYING, EXPIRED or CANCELLED (any case)",
    )
    page = query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size")
    order = obj({k: {"type": ["string", "integer"]} for k in (
        "id", "sku", "buyer_id", "quantity", "amount", "currency", "state", "created_at",
        "updated_at")})  # fmt: skip
    admin_errors = (401, 404, 408, 409, 422)
    skus = query(
        "skus", {"enum": ["all", "none"], "default": "all"},
        "the answer's SKUs: all of them, or none (the sale's settings alone; a SKU edit: that "
        "SKU). A sale of 200,000 SKUs answers 26 MB with all",
    )  # fmt: skip
    lifecycle = {
        f"/admin/v1/sales/{{sale}}/{action}": {
            "post": op(
                f"{action}Sale",
                "admin",
                f"{action.capitalize()} a sale",
                {**ok(200, "The sale", SALE), **errors(*admin_errors)},
                security="admin",
                params=[*SALE_PATH, skus],
            )
        }
        for action in ("pause", "resume", "end")
    }
    return {
        "/admin/v1/sales": {
            "get": op(
                "listSales",
                "admin",
                "Sales, newest first",
                {
                    **ok(200, "A page; next_offset is the offset of the next one", SALES),
                    **errors(401, 422),
                },
                security="admin",
                params=[
                    query(
                        "status",
                        {"enum": ["active", "paused", "ended"]},
                        "filter: the status pause, resume and end set",
                    ),
                    query(
                        "state",
                        {"enum": ["scheduled", "live", "paused", "ended"]},
                        "filter: the state each sale shows (past its end, ended)",
                    ),
                    page,
                    query("offset", {"type": "integer", "minimum": 0}, "sales skipped"),
                ],
            ),
            "post": op(
                "createSale",
                "admin",
                "Create a sale (the sale file format)",
                {
                    **ok(201, "The created sale", SALE),
                    **ok(200, "The sale this Idempotency-Key created before", SALE),
                    **errors(401, 408, 422),
                },
                security="admin",
                params=[CREATE_KEY],
                body=SALE_SPEC,
            ),
        },
        "/admin/v1/sales/{sale}": {
            "get": op(
                "saleStatus",
                "admin",
                "Sale status per SKU",
                {**ok(200, "Status", SALE_STATUS), **errors(401, 404, 422)},
                security="admin",
                params=[*SALE_PATH, query("sku", {"type": "string"}, "this SKU's status alone")],
            ),
            "patch": op(
                "updateSale",
                "admin",
                "Change settings: anything before the start; once started name, ends_at, "
                "admission_rate, a higher max_queue, join_challenge and join_challenge_max "
                "(409 sale_started otherwise)",
                {**ok(200, "The sale", SALE), **errors(*admin_errors)},
                security="admin",
                params=[*SALE_PATH, skus],
                body=obj(
                    {k: v for k, v in SALE_SPEC["properties"].items() if k != "skus"},
                    additionalProperties=False,
                ),
            ),
            "delete": op(
                "deleteSale",
                "admin",
                "Delete a sale never preloaded, with its SKUs (409 sale_preloaded once it was: "
                "it keeps its record for its audit, end it instead)",
                {**ok(200, "Deleted", DELETED), **errors(*admin_errors)},
                security="admin",
                params=SALE_PATH,
            ),
        },
        "/admin/v1/sales/{sale}/template": {
            "get": op(
                "saleTemplate",
                "admin",
                "The sale as a sale file, without the engine's own fields (as `sale show "
                "--template`): the body that makes a copy of it",
                {**ok(200, "A sale file", SALE_SPEC), **errors(401, 404)},
                security="admin",
                params=SALE_PATH,
            )
        },
        "/admin/v1/sales/{sale}/skus/{sku}": {
            "delete": op(
                "removeSku",
                "admin",
                "Take a SKU nobody reserved out of the sale (409 once it has orders or holds, "
                "and 409 last_sku for the last SKU of a preloaded sale)",
                {**ok(200, "The sale", SALE), **errors(*admin_errors)},
                security="admin",
                params=[
                    *SALE_PATH,
                    {"name": "sku", "in": "path", "required": True, "schema": {"type": "string"}},
                    skus,
                ],
            ),
            "patch": op(
                "updateSku",
                "admin",
                "Change a SKU's title, or before the start its price, currency, per-buyer limit "
                "or hold time",
                {**ok(200, "The sale", SALE), **errors(*admin_errors)},
                security="admin",
                params=[
                    *SALE_PATH,
                    {"name": "sku", "in": "path", "required": True, "schema": {"type": "string"}},
                    skus,
                ],
                body=obj(
                    {field: SKU_SPEC["properties"][field] for field in SKU_EDITABLE},
                    additionalProperties=False,
                ),
            ),
        },
        "/admin/v1/sales/{sale}/preload": {
            "post": op(
                "preloadSale",
                "admin",
                "Copy configuration and stock into Redis",
                {
                    **ok(200, "Per SKU outcome", obj({"results": {"type": "array"}}, ["results"])),
                    **errors(*admin_errors),
                },
                security="admin",
                params=SALE_PATH,
                body=obj({"force": {"type": "boolean"}}, additionalProperties=False),
                body_required=False,
            )
        },
        "/admin/v1/sales/{sale}/stock": {
            "post": op(
                "changeStock",
                "admin",
                "Add stock to a SKU (409 sale_sold_out once the waiting room found the sale "
                "sold out: it stays so), or remove free units (never held or sold ones)",
                {
                    **ok(
                        200,
                        'The status of that SKU (`skus` holds it alone); `"replayed": true` '
                        "when this Idempotency-Key made the change before, and nothing changed",
                        CHANGED_STOCK,
                    ),
                    **ok(
                        202,
                        "The units are added in Postgres, and Redis could not take them then "
                        "(an outage): the reconciler copies the new total once it is back. Do "
                        "not add them again",
                        obj(
                            {
                                "sku": {"type": "string"},
                                "added": {"type": "integer"},
                                "stock_total": {"type": "integer"},
                                "redis": {"const": "pending"},
                                "message": {"type": "string"},
                            },
                            ["sku", "added", "stock_total", "redis", "message"],
                        ),
                    ),
                    **errors(*admin_errors),
                },
                security="admin",
                params=[*SALE_PATH, STOCK_KEY],
                body=obj(
                    {
                        "sku": {"type": "string"},
                        "add": {"type": ["integer", "string"]},
                        "remove": {"type": ["integer", "string"]},
                    },
                    ["sku"],
                    additionalProperties=False,
                ),
            )
        },
        "/admin/v1/sales/{sale}/orders": {
            "get": op(
                "listOrders",
                "admin",
                "A page of the sale's orders, oldest first (never their payment token)",
                {
                    **ok(
                        200,
                        "A page; next is the after of the next one",
                        obj(
                            {"orders": {"type": "array", "items": order}, "next": NULLABLE_STRING},
                            ["orders", "next"],
                        ),
                    ),
                    **errors(401, 404, 422),
                },
                security="admin",
                params=[
                    *SALE_PATH,
                    order_state,
                    page,
                    query(
                        "after",
                        {"type": "string"},
                        "the last order id seen (422 if not of this sale)",
                    ),
                ],
            )
        },
        "/admin/v1/sales/{sale}/orders.csv": {
            "get": op(
                "exportOrders",
                "admin",
                "Every order as CSV with a header, streamed",
                {
                    "200": {
                        "description": "CSV (id, sku, buyer_id, quantity, amount, currency,"
                        " state, created_at, updated_at: times in UTC with a Z, as everywhere"
                        " here); a buyer id that starts with =, +, - or @ is written behind an"
                        " apostrophe, so no spreadsheet runs it",
                        "content": {"text/csv": {"schema": {"type": "string"}}},
                    },
                    **errors(401, 404, 422),
                },
                security="admin",
                params=[*SALE_PATH, order_state],
            )
        },
        "/admin/v1/sales/{sale}/skus": {
            "post": {
                **op(
                    "importSkus",
                    "admin",
                    'Add SKUs from CSV, or JSON {"skus": [...]} or the list alone (all '
                    "validated first; 409 sale_sold_out once the waiting room found the sale "
                    "sold out). Into a preloaded sale, the new SKUs are on sale from the next "
                    "preload on (POST /admin/v1/sales/{sale}/preload)",
                    {**ok(200, "The sale", SALE), **errors(*admin_errors)},
                    security="admin",
                    params=[*SALE_PATH, skus],
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "text/csv": {"schema": {"type": "string"}},
                        "application/json": {
                            "schema": {"oneOf": [obj({"skus": SKU_LIST}, ["skus"]), SKU_LIST]}
                        },
                    },
                },
            }
        },
        "/admin/v1/sales/{sale}/live": {
            "get": op(
                "liveSale",
                "admin",
                "What the live sale page shows, in one answer",
                {
                    **ok(
                        200,
                        "The sale now",
                        obj(
                            {
                                "at": TIME,
                                "sale": SALE,
                                "skus": SALE_STATUS["properties"]["skus"],
                                "skus_total": {"type": "integer"},
                                "totals": {"type": "object"},
                                "not_preloaded": UNCOUNTED,
                                "lost": UNCOUNTED,
                                "revenue": SALE_STATUS["properties"]["revenue"],
                                "skus_read_at": TIME,
                                "queue": LIVE_ROOM,
                                "routes": {"type": "object"},
                                "consumer_lag": {"type": ["integer", "null"]},
                                "repairs": {"type": "object"},
                                "archive_due_at": ARCHIVE_DUE,
                            },
                            [
                                "at",
                                "sale",
                                "skus",
                                "skus_total",
                                "totals",
                                "not_preloaded",
                                "lost",
                                "revenue",
                                "skus_read_at",
                                "queue",
                                "routes",
                                "consumer_lag",
                                "repairs",
                                "archive_due_at",
                            ],
                        ),
                    ),
                    **errors(401, 404, 422),
                },
                security="admin",
                params=SALE_PATH,
            )
        },
        "/admin/v1/sales/{sale}/history": {
            "get": op(
                "saleHistory",
                "admin",
                "Where the live page's charts start: units confirmed and buyers admitted since "
                "the sale's start, as [unix seconds, value] pairs (at most 601 each)",
                {
                    **ok(
                        200,
                        "The curves",
                        obj({name: CURVE for name in ("sold", "admitted")}, ["sold", "admitted"]),
                    ),
                    **errors(401, 404, 422),
                },
                security="admin",
                params=SALE_PATH,
            )
        },
        "/admin/v1/sales/{sale}/audit": {
            "get": op(
                "auditSale",
                "admin",
                "The post-sale audit: every invariant of DESIGN §7, with offending ids",
                {**ok(200, "The report (passed or not)", AUDIT), **errors(401, 404, 422)},
                security="admin",
                params=SALE_PATH,
            )
        },
        "/admin/v1/sales/{sale}/archive": {
            "post": op(
                "archiveSale",
                "admin",
                "Archive an ended sale: its audit must pass; the report is recorded, then its "
                "per-buyer Redis state deleted (README, 'After the sale'). 409 sale_not_ended, "
                "no_payment_provider, audit_failed, archive_refused or redis_cleared (a "
                "benchmark's sale kept for its orders), with nothing deleted. "
                "Re-runnable; an archived sale is answered without an audit",
                {**ok(200, "The sale is archived", ARCHIVED), **errors(*admin_errors)},
                security="admin",
                params=SALE_PATH,
            )
        },
        **lifecycle,
    }
