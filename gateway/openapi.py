"""``GET /openapi.json``: the gateway's OpenAPI 3.1 document.

Written by hand next to the routes it describes and checked against the running gateway by
schemathesis in the test suite (every documented status, every response schema), so it stays
true to what the code does.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from flashsale import __version__
from gateway.http import json_response
from gateway.openapi_schemas import (
    AUDIT,
    CHALLENGE,
    ERROR,
    FAIRNESS,
    FAIRNESS_PROOF,
    HEALTH,
    JOINED,
    LEFT,
    LIVE,
    NULLABLE_STRING,
    PUBLIC_SALE,
    RESERVATION,
    RESERVE_BODY,
    RESERVED,
    SALE,
    SALE_SPEC,
    SALE_STATUS,
    STATUS,
    obj,
)

JSON = "application/json"


# Every route can answer these: the body limit, the per-process in-flight cap and a dependency
# that does not answer.
ALWAYS = (413, 503)
REASONS = {
    400: "Bad request",
    401: "Missing or invalid credentials",
    403: "Not allowed (admission missing, invalid, expired, used, or someone else's)",
    404: "Unknown sale, SKU, reservation or path",
    405: "Method not allowed",
    408: "The request body did not arrive in time",
    409: "Refused by the sale's state (sold out, limit reached, not open, ended, ...)",
    413: "Body larger than 16 KiB",
    422: "Invalid input; the message names the field",
    429: "Rate limited; see Retry-After",
    503: "Overloaded, queue full or a dependency down; see Retry-After",
}


# The answers that say when to try again.
RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds after which a retry may succeed",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _errors(*codes: int) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for code in sorted({*codes, *ALWAYS}):
        answers[str(code)] = {
            "description": REASONS[code],
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if code in (429, 503):
            answers[str(code)]["headers"] = RETRY_AFTER
    return answers


CACHE_CONTROL = {
    "Cache-Control": {
        "description": "public, max-age=N: 1 s while the sale can change, 30 s once it is sold "
        "out for good, 300 s once it has ended (a CDN in front may keep the answer that long)",
        "schema": {"type": "string"},
    }
}


def _cached(answers: dict[str, Any]) -> dict[str, Any]:
    """``answers`` with the Cache-Control header documented on each."""
    return {code: {**answer, "headers": CACHE_CONTROL} for code, answer in answers.items()}


def _ok(status: int, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {str(status): {"description": description, "content": {JSON: {"schema": schema}}}}


def _sale_param() -> dict[str, Any]:
    return {"name": "sale", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(
    op_id: str,
    tag: str,
    summary: str,
    responses: dict[str, Any],
    *,
    security: str | None = None,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    body_required: bool = True,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": op_id,
        "tags": [tag],
        "summary": summary,
        "responses": responses,
    }
    if security:
        op["security"] = [{security: []}]
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {JSON: {"schema": body}}}
    return op


def document() -> dict[str, Any]:
    sale = [_sale_param()]
    ticket = {
        "name": "X-Queue-Ticket",
        "in": "header",
        "required": True,
        "schema": {"type": "string"},
    }
    admission = {
        "name": "X-Admission-Token",
        "in": "header",
        "required": True,
        "schema": {"type": "string"},
    }
    idem = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,100}$"},
    }
    create_key = {
        **idem,
        "required": False,
        "description": "a retry with the same key answers the same sale",
    }
    rid = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": description,
        }

    order_state = query(
        "state",
        {"type": "string"},
        "CONFIRMED, PAYMENT_FAILED, PENDING, PAYING, EXPIRED or CANCELLED (any case)",
    )
    page = query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size")
    order = obj(
        {
            k: {"type": ["string", "integer"]}
            for k in (
                "id",
                "sku",
                "buyer_id",
                "quantity",
                "amount",
                "currency",
                "state",
                "created_at",
                "updated_at",
            )
        }
    )
    admin_errors = (401, 404, 408, 409, 422)
    lifecycle = {
        f"/admin/v1/sales/{{sale}}/{action}": {
            "post": _op(
                f"{action}Sale",
                "admin",
                f"{action.capitalize()} a sale",
                {**_ok(200, "The sale", SALE), **_errors(*admin_errors)},
                security="admin",
                params=sale,
            )
        }
        for action in ("pause", "resume", "end")
    }
    paths: dict[str, Any] = {
        "/v1/sales/{sale}": {
            "get": _op(
                "getSale",
                "sales",
                "Public sale information (cached up to 0.5 s)",
                {**_cached(_ok(200, "The sale", PUBLIC_SALE)), **_errors(404)},
                params=sale,
            )
        },
        "/v1/sales/{sale}/fairness": {
            "get": _op(
                "fairness",
                "sales",
                "The pre-queue's published order: seed, members in position order, Merkle root",
                {
                    **_ok(200, "The record (recorded: false until the shuffle)", FAIRNESS),
                    **_errors(404, 422),
                },
                params=[
                    *sale,
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 10000},
                    },
                ],
            )
        },
        "/v1/sales/{sale}/fairness/proof": {
            "get": _op(
                "fairnessProof",
                "sales",
                "The ticket holder's place in the recorded order, with its Merkle path",
                {**_ok(200, "The proof", FAIRNESS_PROOF), **_errors(401, 403, 404)},
                params=[*sale, ticket],
            )
        },
        "/v1/sales/{sale}/queue": {
            "delete": _op(
                "leaveQueue",
                "waiting room",
                "Leave the waiting room: the place's admission can no longer be used",
                {**_ok(200, "Left (or had left)", LEFT), **_errors(401, 403, 404, 409, 429)},
                params=[*sale, ticket],
            ),
            "post": _op(
                "joinQueue",
                "waiting room",
                "Join the waiting room (idempotent per buyer)",
                {
                    **_ok(200, "Queued, or sold out at once", JOINED),
                    **_errors(401, 403, 404, 409, 429),
                },
                security="buyer",
                params=[
                    *sale,
                    {
                        "name": "X-Challenge",
                        "in": "header",
                        "schema": {"type": "string"},
                        "description": "when the sale asks a challenge (join_challenge > 0)",
                    },
                    {
                        "name": "X-Challenge-Solution",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,20}$"},
                    },
                ],
            ),
        },
        "/v1/sales/{sale}/queue/challenge": {
            "get": _op(
                "joinChallenge",
                "waiting room",
                "A proof-of-work challenge to solve before joining (when the sale asks one)",
                {
                    **_ok(200, "The challenge (null when none is asked)", CHALLENGE),
                    **_errors(401, 404),
                },
                security="buyer",
                params=sale,
            ),
        },
        "/v1/sales/{sale}/queue/status": {
            "get": _op(
                "queueStatus",
                "waiting room",
                "Where the buyer stands: answered from the ticket and cached counters",
                {**_ok(200, "The buyer's state", STATUS), **_errors(401, 403, 404)},
                params=[*sale, ticket],
            )
        },
        "/v1/sales/{sale}/reservations": {
            "post": _op(
                "reserve",
                "reservations",
                "Reserve units with an admission (idempotent per Idempotency-Key)",
                {
                    **_ok(201, "Held; the order is processing", RESERVED),
                    **_errors(401, 403, 404, 408, 409, 422, 429),
                },
                security="buyer",
                params=[*sale, admission, idem],
                body=RESERVE_BODY,
            )
        },
        "/v1/reservations/{id}": {
            "get": _op(
                "getReservation",
                "reservations",
                "A reservation of the caller, with its order",
                {**_ok(200, "The reservation", RESERVATION), **_errors(401, 404)},
                security="buyer",
                params=[rid],
            ),
            "delete": _op(
                "cancelReservation",
                "reservations",
                "Cancel an ACTIVE hold (its units go back)",
                {**_ok(200, "Released", RESERVATION), **_errors(401, 404, 409, 429)},
                security="buyer",
                params=[rid],
            ),
        },
        "/admin/v1/sales": {
            "get": _op(
                "listSales",
                "admin",
                "Sales, newest first",
                {
                    **_ok(
                        200, "A page", obj({"sales": {"type": "array", "items": SALE}}, ["sales"])
                    ),
                    **_errors(401, 422),
                },
                security="admin",
                params=[
                    query("status", {"enum": ["active", "paused", "ended"]}, "filter"),
                    page,
                    query("offset", {"type": "integer", "minimum": 0}, "sales skipped"),
                ],
            ),
            "post": _op(
                "createSale",
                "admin",
                "Create a sale (the sale file format)",
                {
                    **_ok(201, "The created sale", SALE),
                    **_ok(200, "The sale this Idempotency-Key created before", SALE),
                    **_errors(401, 408, 422),
                },
                security="admin",
                params=[create_key],
                body=SALE_SPEC,
            ),
        },
        "/admin/v1/sales/{sale}": {
            "get": _op(
                "saleStatus",
                "admin",
                "Sale status per SKU",
                {**_ok(200, "Status", SALE_STATUS), **_errors(401, 404)},
                security="admin",
                params=sale,
            ),
            "patch": _op(
                "updateSale",
                "admin",
                "Change settings: anything before the start; once started name, ends_at, "
                "admission_rate and a higher max_queue (409 sale_started otherwise)",
                {**_ok(200, "The sale", SALE), **_errors(*admin_errors)},
                security="admin",
                params=sale,
                body=obj(
                    {k: v for k, v in SALE_SPEC["properties"].items() if k != "skus"},
                    additionalProperties=False,
                ),
            ),
        },
        "/admin/v1/sales/{sale}/skus/{sku}": {
            "delete": _op(
                "removeSku",
                "admin",
                "Take a SKU nobody reserved out of the sale (409 once it has orders or holds)",
                {**_ok(200, "The sale", SALE), **_errors(*admin_errors)},
                security="admin",
                params=[
                    *sale,
                    {"name": "sku", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
            ),
            "patch": _op(
                "updateSku",
                "admin",
                "Change a SKU's title, or its price before the start",
                {**_ok(200, "The sale", SALE), **_errors(*admin_errors)},
                security="admin",
                params=[
                    *sale,
                    {"name": "sku", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                body=obj(
                    {"title": {"type": "string"}, "price": {"type": ["integer", "string"]}},
                    additionalProperties=False,
                ),
            ),
        },
        "/admin/v1/sales/{sale}/preload": {
            "post": _op(
                "preloadSale",
                "admin",
                "Copy configuration and stock into Redis",
                {
                    **_ok(200, "Per SKU outcome", obj({"results": {"type": "array"}}, ["results"])),
                    **_errors(*admin_errors),
                },
                security="admin",
                params=sale,
                body=obj({"force": {"type": "boolean"}}, additionalProperties=False),
                body_required=False,
            )
        },
        "/admin/v1/sales/{sale}/stock": {
            "post": _op(
                "changeStock",
                "admin",
                "Add stock to a SKU, or remove free units (never held or sold ones)",
                {**_ok(200, "Status", SALE_STATUS), **_errors(*admin_errors)},
                security="admin",
                params=sale,
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
            "get": _op(
                "listOrders",
                "admin",
                "A page of the sale's orders by id (never their payment token)",
                {
                    **_ok(
                        200,
                        "A page; next is the after of the next one",
                        obj(
                            {"orders": {"type": "array", "items": order}, "next": NULLABLE_STRING},
                            ["orders", "next"],
                        ),
                    ),
                    **_errors(401, 404, 422),
                },
                security="admin",
                params=[
                    *sale,
                    order_state,
                    page,
                    query("after", {"type": "string"}, "the last order id seen"),
                ],
            )
        },
        "/admin/v1/sales/{sale}/orders.csv": {
            "get": _op(
                "exportOrders",
                "admin",
                "Every order as CSV with a header, streamed",
                {
                    "200": {
                        "description": "CSV",
                        "content": {"text/csv": {"schema": {"type": "string"}}},
                    },
                    **_errors(401, 404, 422),
                },
                security="admin",
                params=[*sale, order_state],
            )
        },
        "/admin/v1/sales/{sale}/skus": {
            "post": {
                **_op(
                    "importSkus",
                    "admin",
                    "Add SKUs from CSV (all rows validated first)",
                    {**_ok(200, "The sale", SALE), **_errors(*admin_errors)},
                    security="admin",
                    params=sale,
                ),
                "requestBody": {
                    "required": True,
                    "content": {"text/csv": {"schema": {"type": "string"}}},
                },
            }
        },
        "/admin/v1/sales/{sale}/live": {
            "get": _op(
                "liveSale",
                "admin",
                "What the live sale page shows, in one answer",
                {
                    **_ok(
                        200,
                        "The sale now",
                        obj(
                            {
                                "at": {"type": "string"},
                                "sale": SALE,
                                "skus": SALE_STATUS["properties"]["skus"],
                                "queue": {"type": "object"},
                                "routes": {"type": "object"},
                                "consumer_lag": {"type": ["integer", "null"]},
                                "repairs": {"type": "object"},
                            },
                            ["at", "sale", "skus", "queue", "routes", "consumer_lag", "repairs"],
                        ),
                    ),
                    **_errors(401, 404),
                },
                security="admin",
                params=sale,
            )
        },
        "/admin/v1/sales/{sale}/audit": {
            "get": _op(
                "auditSale",
                "admin",
                "The post-sale audit: every invariant of DESIGN §7, with offending ids",
                {**_ok(200, "The report (passed or not)", AUDIT), **_errors(401, 404)},
                security="admin",
                params=sale,
            )
        },
        **lifecycle,
        "/livez": {
            "get": _op("livez", "operations", "The process answers", _ok(200, "Alive", LIVE)),
        },
        "/readyz": {
            "get": _op(
                "readyz",
                "operations",
                "Redis, Postgres and the broker answered (checked at most about once a second)",
                {**_ok(200, "All up", HEALTH), **_ok(503, "Something is down", HEALTH)},
            )
        },
        "/healthz": {
            "get": _op(
                "healthz",
                "operations",
                "The same as /readyz",
                {**_ok(200, "All up", HEALTH), **_ok(503, "Something is down", HEALTH)},
            )
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["operations"],
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/sales/{sale}": {
            "get": {
                "operationId": "waitingRoomPage",
                "tags": ["waiting room"],
                "summary": "The waiting-room page",
                "parameters": sale,
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_errors(404),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["operations"],
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flashsale gateway",
            "version": __version__,
            "description": "The waiting room, reservations and the admin API. Errors are "
            '`{"error": {"code", "message", "field"?}}` with a stable code.',
        },
        "tags": [
            {"name": "sales", "description": "what a sale offers"},
            {"name": "waiting room", "description": "join, and wait for admission"},
            {"name": "reservations", "description": "reserve with an admission, follow, cancel"},
            {"name": "admin", "description": "merchandisers (FLASHSALE_ADMIN_TOKEN)"},
            {"name": "operations", "description": "probes, metrics, this document"},
        ],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {
                "buyer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A buyer token signed by the storefront",
                },
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "FLASHSALE_ADMIN_TOKEN",
                },
            },
        },
    }


async def openapi(_request: web.Request) -> web.Response:
    return json_response(document())


def setup(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
