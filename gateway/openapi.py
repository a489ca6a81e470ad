"""``GET /openapi.json``: the gateway's OpenAPI 3.1 document.

Written by hand next to the routes it describes and checked against the running gateway by
schemathesis in the test suite (every documented status, every response schema), so it stays
true to what the code does.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from flashsale import __version__
from gateway.catalog import INFO_TTL_S, MAX_INFO_TTL_S, READ_SHARE
from gateway.documents import MAX_SKUS_ASKED, Document, document_response
from gateway.openapi_admin import admin_paths
from gateway.openapi_parts import (
    ADMISSION,
    IDEMPOTENCY_KEY,
    IF_NONE_MATCH,
    JSON,
    RESERVATION_ID,
    SALE_PATH,
    TICKET,
    errors,
    ok,
    op,
    shared,
)
from gateway.openapi_schemas import (
    CHALLENGE,
    ERROR,
    FAIRNESS,
    FAIRNESS_PROOF,
    HEALTH,
    ID,
    JOINED,
    LEFT,
    LIVE,
    ORDER_WEBHOOK,
    PUBLIC_SALE,
    RESERVATION,
    RESERVE_BODY,
    RESERVED,
    STATUS,
)


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/sales/{sale}": {
            "get": op(
                "getSale",
                "sales",
                f"Public sale information (each gateway process keeps a copy for "
                f"{INFO_TTL_S:g} s, or {READ_SHARE} times as long as reading it took, up to "
                f"{MAX_INFO_TTL_S:g} s, for a sale that is slow to read: thousands of SKUs)",
                {**shared(ok(200, "The sale", PUBLIC_SALE)), **errors(404, 422)},
                params=[
                    *SALE_PATH,
                    {
                        "name": "sku",
                        "in": "query",
                        "description": "only these SKUs (repeat it; a storefront's product "
                        "of a catalogue sale); 404 unknown_sku for one the sale lacks",
                        "schema": {
                            "type": "array",
                            "items": ID,
                            "maxItems": MAX_SKUS_ASKED,
                        },
                        "style": "form",
                        "explode": True,
                    },
                    IF_NONE_MATCH,
                ],
            )
        },
        "/v1/sales/{sale}/fairness": {
            "get": op(
                "fairness",
                "sales",
                "The pre-queue's published order: seed, members in position order, Merkle root",
                {
                    **ok(200, "The record (recorded: false until the shuffle)", FAIRNESS),
                    **errors(404, 422),
                },
                params=[
                    *SALE_PATH,
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
            "get": op(
                "fairnessProof",
                "sales",
                "The ticket holder's place in the recorded order, with its Merkle path",
                {**ok(200, "The proof", FAIRNESS_PROOF), **errors(401, 403, 404)},
                params=[*SALE_PATH, TICKET],
            )
        },
        "/v1/sales/{sale}/queue": {
            "delete": op(
                "leaveQueue",
                "waiting room",
                "Leave the waiting room: the place's admission can no longer be used",
                {**ok(200, "Left (or had left)", LEFT), **errors(401, 403, 404, 409, 429)},
                params=[*SALE_PATH, TICKET],
            ),
            "post": op(
                "joinQueue",
                "waiting room",
                "Join the waiting room (idempotent per buyer)",
                {
                    **ok(200, "Queued, or sold out at once", JOINED),
                    **errors(401, 403, 404, 409, 429),
                },
                security="buyer",
                params=[
                    *SALE_PATH,
                    {
                        "name": "X-Challenge",
                        "in": "header",
                        "schema": {"type": "string"},
                        "description": "when the sale asks a challenge: join_challenge > 0, or "
                        "a 403 challenge_required (it may be turned on while the sale runs)",
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
            "get": op(
                "joinChallenge",
                "waiting room",
                "A proof-of-work challenge to solve before joining (when the sale asks one)",
                {
                    **ok(200, "The challenge (null when none is asked)", CHALLENGE),
                    **errors(401, 404),
                },
                security="buyer",
                params=SALE_PATH,
            ),
        },
        "/v1/sales/{sale}/queue/status": {
            "get": op(
                "queueStatus",
                "waiting room",
                "Where the buyer stands: answered from the ticket and cached counters",
                {**ok(200, "The buyer's state", STATUS), **errors(401, 403, 404)},
                params=[*SALE_PATH, TICKET],
            )
        },
        "/v1/sales/{sale}/reservations": {
            "post": op(
                "reserve",
                "reservations",
                "Reserve units with an admission (idempotent per Idempotency-Key). An admission "
                "buys once: a grant uses it up (403 admission_used for another key; "
                "admission_left once its buyer left the queue), a refusal "
                "(409 sold_out, not_enough_left with the units left, limit_exceeded) leaves it "
                "to a request with another key while the turn lasts",
                {
                    **ok(201, "Held; the order is processing", RESERVED),
                    **errors(401, 403, 404, 408, 409, 422, 429),
                },
                security="buyer",
                params=[*SALE_PATH, ADMISSION, IDEMPOTENCY_KEY],
                body=RESERVE_BODY,
            )
        },
        "/v1/reservations/{id}": {
            "get": op(
                "getReservation",
                "reservations",
                "A reservation of the caller, with its order",
                {**ok(200, "The reservation", RESERVATION), **errors(401, 404)},
                security="buyer",
                params=[RESERVATION_ID],
            ),
            "delete": op(
                "cancelReservation",
                "reservations",
                "Cancel an ACTIVE hold (its units go back)",
                {**ok(200, "Released", RESERVATION), **errors(401, 404, 409, 429)},
                security="buyer",
                params=[RESERVATION_ID],
            ),
        },
        **admin_paths(),
        "/livez": {
            "get": op("livez", "operations", "The process answers", ok(200, "Alive", LIVE)),
        },
        "/readyz": {
            "get": op(
                "readyz",
                "operations",
                "Redis, Postgres and the broker answered (checked at most about once a second)",
                {**ok(200, "All up", HEALTH), **ok(503, "Something is down", HEALTH)},
            )
        },
        "/healthz": {
            "get": op(
                "healthz",
                "operations",
                "The same as /readyz",
                {**ok(200, "All up", HEALTH), **ok(503, "Something is down", HEALTH)},
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
                "parameters": SALE_PATH,
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **errors(404),
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
        "webhooks": {"orderEvent": ORDER_WEBHOOK},
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


@functools.cache
def served() -> Document:
    """The document encoded and gzipped once (86 KB of JSON: 12 KB)."""
    return Document.of(document(), level=9)


async def openapi(request: web.Request) -> web.Response:
    return document_response(request, served(), {"Cache-Control": "no-cache"})


def setup(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
