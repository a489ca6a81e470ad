"""The schemas of the gateway's OpenAPI document (:mod:`gateway.openapi`): request bodies and
answers, written next to the code that produces them and checked against it by schemathesis."""

from __future__ import annotations

from typing import Any

from allocator.sale_reads import ORDER_STATES
from flashsale.salespec import SKU_FIELDS
from gateway.waiting_room import TICKET_GRACE_S


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A JSON Schema object with ``props``; ``required`` when given."""
    schema: dict[str, Any] = {"type": "object", "properties": props, **extra}
    if required:
        schema["required"] = required
    return schema


ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the input at fault, when one is"},
                "left": {
                    "type": "integer",
                    "description": "not_enough_left: the units left, fewer than asked",
                },
                "holds_pending": {
                    "type": "boolean",
                    "description": "sold_out, not_enough_left: true while units other buyers "
                    "hold may come back (ask again with a new Idempotency-Key while the turn "
                    "lasts); false: none can",
                },
            },
        }
    },
}
ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}
NULLABLE_INT = {"type": ["integer", "null"]}
NULLABLE_NUMBER = {"type": ["number", "null"]}
NULLABLE_STRING = {"type": ["string", "null"]}
# Every time the engine answers: ISO 8601 in UTC with a Z (flashsale.timefmt).
TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"  # to the ms, as JavaScript reads it
TIME = {"type": "string", "format": "date-time", "pattern": TIME_PATTERN}


def nullable_time(description: str) -> dict[str, object]:
    """A time, or null (``description`` says when)."""
    return {"type": ["string", "null"], "format": "date-time", "pattern": TIME_PATTERN,
            "description": description}  # fmt: skip


SKU_SPEC = obj(
    {
        "sku": ID,
        "title": {"type": "string"},
        "stock": {"type": ["integer", "string"]},
        "price": {"type": ["integer", "string"]},
        "currency": {"type": "string"},
        "per_buyer_limit": {"type": ["integer", "string"]},
        "hold_ttl_seconds": {"type": ["integer", "string"]},
        "buckets": {"type": ["integer", "string"]},
    },
    ["sku", "stock", "price", "currency"],
)
SALE_SPEC = obj(
    {
        "name": {"type": "string"},
        "starts_at": {"type": "string", "description": "ISO 8601 with a timezone"},
        "ends_at": {"type": "string", "description": "ISO 8601 with a timezone"},
        "admission_rate": {"type": ["integer", "string"]},
        "max_queue": {"type": ["integer", "string"]},
        "admission_window_seconds": {"type": ["integer", "string"]},
        "admission_capacity": {"type": ["integer", "string"]},
        "join_challenge": {"type": ["integer", "string"]},
        "join_challenge_max": {"type": ["integer", "string"]},
        "skus": {"type": "array", "items": SKU_SPEC},
    },
    ["name"],
)
SHUFFLE = obj(
    {"algorithm": {"type": "string"}, "commitment": {"type": "string"}, "seed": NULLABLE_STRING},
    ["algorithm", "commitment", "seed"],
)
SALE_SOLD_OUT = {
    "type": "boolean",
    "description": "a buyer who joins now is told sold_out: every SKU is, or the line reaches "
    "the last place ever admitted (the units remaining are promised to the buyers in it)",
}
SKU_COUNT = {
    "type": "integer",
    "description": "the SKUs the sale has (skus lists them all, or those asked for)",
}
SALE = obj(
    {
        "id": ID,
        "name": {"type": "string"},
        "status": {"enum": ["active", "paused", "ended"]},
        "state": {"enum": ["scheduled", "live", "paused", "ended"]},
        "starts_at": TIME,
        "ends_at": TIME,
        "preloaded_at": nullable_time("when the sale was last preloaded; null before"),
        "ended_at": nullable_time(
            "when the sale ended: when an operator ended it, if before ends_at, else at "
            "ends_at; null while it has not"
        ),
        "archived_at": nullable_time(
            "when the ended sale was archived: its audit recorded, its per-buyer Redis state "
            "deleted"
        ),
        "redis_cleared_at": nullable_time(
            "when the sale's Redis state was deleted on purpose, after which no service writes "
            "it back: by its archive, or by a benchmark keeping a sale it made orders of (such "
            "a sale cannot be archived)"
        ),
        "shuffle": SHUFFLE,
        "sold_out": SALE_SOLD_OUT,
        "sku_count": SKU_COUNT,
        "skus": {
            "type": "array",
            "items": obj(
                {
                    "sku": ID,
                    "title": {"type": "string"},
                    "stock": {"type": "integer"},
                    "price": {"type": "integer", "description": "in minor units"},
                    "currency": {"type": "string"},
                    "per_buyer_limit": {"type": "integer"},
                    "hold_ttl_seconds": {"type": "integer"},
                    "buckets": {"type": "integer"},
                },
                list(SKU_FIELDS),  # a sale's SKUs answer every field a sale file may give
            ),
        },
    },
    ["id", "name", "status", "state", "starts_at", "ends_at", "shuffle"],
)
# A page of ``GET /admin/v1/sales``: newest first.
SALES = obj(
    {
        "sales": {"type": "array", "items": SALE},
        "next_offset": {
            "type": ["integer", "null"],
            "description": "the offset of the next page; null on the last",
        },
    },
    ["sales", "next_offset"],
)
PUBLIC_SALE = obj(
    {
        "id": ID,
        "name": {"type": "string"},
        "state": {"enum": ["scheduled", "live", "paused", "ended"]},
        "starts_at": TIME,
        "ends_at": TIME,
        "admission_window_seconds": {"type": "integer"},
        "join_challenge": {"type": "integer", "description": "proof-of-work bits asked at join"},
        "join_challenge_max": {
            "type": "integer",
            "description": "the most bits asked as the join rate rises (0: fixed)",
        },
        "shuffle": SHUFFLE,
        "sold_out": SALE_SOLD_OUT,
        "sku_count": SKU_COUNT,
        "skus": {
            "type": "array",
            "items": obj(
                {
                    "sku": ID,
                    "title": {"type": "string"},
                    "price": {"type": "integer"},
                    "currency": {"type": "string"},
                    "per_buyer_limit": {"type": "integer"},
                    "buckets": {"type": "integer"},
                    "remaining": NULLABLE_INT,
                    "sold_out": {
                        "type": "boolean",
                        "description": "no unit remains and none is held (remaining 0 with "
                        "units held: they may come back, and buyers still queue)",
                    },
                },
                ["sku", "price", "currency", "per_buyer_limit", "remaining", "sold_out"],
            ),
        },
    },
    ["id", "name", "state", "starts_at", "ends_at", "shuffle", "sold_out", "sku_count", "skus"],
)
JOINED = obj(
    {
        "ticket": NULLABLE_STRING,
        "position": NULLABLE_INT,
        "state": {
            "enum": ["waiting", "admitted", "sold_out", "expired", "left"],
            "description": "left: the buyer gave this place up (DELETE), and it stays so",
        },
        "pre_queue": {"type": "boolean"},
    },
    ["ticket", "position", "state"],
)
STATUS = obj(
    {
        "state": {"enum": ["waiting", "admitted", "sold_out", "expired", "left"]},
        "position": NULLABLE_INT,
        "ahead": NULLABLE_INT,
        "eta_seconds": obj({"p50": NULLABLE_NUMBER, "p90": NULLABLE_NUMBER}, ["p50", "p90"]),
        "retry_after_ms": {"type": "integer", "minimum": 0},
        "admission_token": {"type": "string"},
        "admission_expires_in_ms": {"type": "integer"},
        # With an admission token, when the gateway has a reservations listener
        # (FLASHSALE_RESERVATIONS_URL): where to send the reservation.
        "reserve_url": {"type": "string", "format": "uri"},
        "ticket": {
            "type": "string",
            "description": "replaces the ticket held: it carries the "
            "place drawn at the start, or lasts until the sale's new end (a ticket lasts "
            f"until the sale's end and {TICKET_GRACE_S // 60} minutes; once expired, a join "
            "with the same buyer token answers the same place)",
        },
        "reserved": {"type": "boolean"},
        "paused": {
            "type": "boolean",
            "description": "the sale is paused: nobody is admitted "
            "and nothing is reserved until it resumes; an admitted buyer's turn is kept, "
            "its time stopped",
        },
        "waitlist": {
            "type": "boolean",
            "description": "waiting, and every unit left is held by buyers ahead: the turn "
            "comes only if held units come back (a hold expires, is cancelled or its payment "
            "fails), so no ETA is given",
        },
        "ended": {
            "type": "boolean",
            "description": "the sale has ended (its end came, or it was ended): the state is "
            "expired (or sold_out) for every buyer, whose turn did not pass but will not come",
        },
    },
    ["state", "position", "ahead", "eta_seconds", "retry_after_ms"],
)
RESERVE_BODY = obj(
    {
        "sku": {"type": "string"},
        "quantity": {"type": "integer", "minimum": 1},
        "payment_token": {"type": "string", "minLength": 1, "maxLength": 200},
    },
    ["sku", "quantity", "payment_token"],
    additionalProperties=False,
    examples=[{"sku": "SNK-42", "quantity": 1, "payment_token": "tok_visa"}],
)
RESERVED = obj(
    {
        "reservation_id": {"type": "string"},
        # ACTIVE when granted now; a replay of the request says where it stands since.
        "state": {"enum": ["ACTIVE", "PAYING", "SOLD", "RELEASED"]},
        "cause": NULLABLE_STRING,
        "sku": ID,
        "quantity": {"type": "integer"},
        "hold_expires_at": TIME,
        "message": {"type": "string"},
    },
    ["reservation_id", "state", "hold_expires_at"],
)
RESERVATION = obj(
    {
        "reservation_id": {"type": "string"},
        "sale_id": ID,
        "sku": ID,
        "quantity": {"type": "integer"},
        "state": {"enum": ["ACTIVE", "PAYING", "SOLD", "RELEASED"]},
        "cause": NULLABLE_STRING,
        "hold_expires_at": nullable_time(
            "null once the hold is no longer in Redis (an archived sale): the reservation is "
            "then answered from its final order"
        ),
        "order": {
            "oneOf": [
                obj(
                    {
                        "state": {
                            "enum": [
                                "PENDING",
                                "PAYING",
                                "CONFIRMED",
                                "PAYMENT_FAILED",
                                "EXPIRED",
                                "CANCELLED",
                            ]
                        },
                        "amount": {"type": "integer", "description": "in minor units"},
                        "currency": {"type": "string"},
                        "updated_at": TIME,
                    },
                    ["state", "amount", "currency", "updated_at"],
                ),
                {"type": "null"},
            ],
            "description": "the order, from the order store: null until one exists, and while "
            "the order store cannot be reached (the hold's state is always current)",
        },
    },
    ["reservation_id", "sale_id", "sku", "quantity", "state", "hold_expires_at", "order"],
)
HEALTH = obj(
    {
        "status": {"enum": ["ok", "down"]},
        "checks": {"type": "object"},
        "error": ERROR["properties"]["error"],
    },
    ["status", "checks"],
)
LIVE = obj({"status": {"const": "ok"}}, ["status"])

HEX = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
FAIRNESS = obj(
    {
        "sale_id": ID,
        "algorithm": {"type": "string", "description": "how members and positions are derived"},
        "merkle": {"type": "string", "description": "how the root is computed"},
        "commitment": HEX,
        "seed": {**NULLABLE_STRING, "description": "revealed once the sale has started"},
        "recorded": {"type": "boolean", "description": "the pre-queue was shuffled and recorded"},
        "ended": {"type": "boolean", "description": "the sale ended: a record still missing "
                  "(recorded false) will never be made"},
        "lost": {"type": "boolean", "description": "Redis lost the waiting room after the "
                 "draw and before its order was recorded: it never will be"},
        "size": {"type": "integer", "minimum": 0},
        "root": {"oneOf": [HEX, {"type": "null"}]},
        "offset": {"type": "integer", "minimum": 0},
        "members": {"type": "array", "items": HEX, "description": "in position order"},
        "next_offset": NULLABLE_INT,
    },
    ["sale_id", "algorithm", "merkle", "commitment", "seed", "recorded", "ended", "lost", "size",
     "root", "offset", "members", "next_offset"],
)  # fmt: skip
FAIRNESS_PROOF = obj(
    {
        "member": HEX,
        "position": {"type": "integer", "minimum": 1},
        "size": {"type": "integer", "minimum": 1},
        "root": HEX,
        "path": {"type": "array", "items": HEX, "description": "sibling digests, leaf up"},
    },
    ["member", "position", "size", "root", "path"],
)
LEFT = obj(
    {
        "state": {"enum": ["left"]},
        "position": {"type": "integer", "minimum": 1},
        "ticket": {"type": "string", "description": "polls with it are answered `left`"},
    },
    ["state", "position", "ticket"],
)
CHALLENGE = obj(
    {
        "difficulty": {"type": "integer", "minimum": 0},
        "challenge": NULLABLE_STRING,
        "rule": {"type": "string"},
        "expires_in_s": {"type": "integer"},
    },
    ["difficulty", "challenge", "rule"],
)

# What the workers POST to FLASHSALE_WEBHOOK_URL (workers/webhooks.py): OpenAPI 3.1 webhooks.
ORDER_WEBHOOK: dict[str, Any] = {
    "post": {
        "operationId": "orderEvent",
        "summary": "An order event, sent to the storefront as it happens",
        "description": "Signed as Standard Webhooks sign them (webhook-id, webhook-timestamp, "
        "webhook-signature) with FLASHSALE_WEBHOOK_SECRET. Answer 2xx once stored; any other "
        "answer, or none within 10 s, sends it again. webhook-id is <order id>.<version>, the "
        "same at each delivery: drop a repeat.",
        "parameters": [
            {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
            for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": obj({
            "type": {"type": "string", "examples": ["order.confirmed"]},
            "timestamp": {"type": "string", "format": "date-time"},
            "data": obj({
                "order_id": {"type": "string"}, "version": {"type": "integer"},
                "state": {"enum": list(ORDER_STATES)},
                "from_state": {"enum": [*ORDER_STATES, None]},
                "cause": {"type": "string"}, "sale_id": {"type": "string"},
                "sku": {"type": "string"}, "buyer_id": {"type": "string"},
                "quantity": {"type": "integer"}, "amount": {"type": "integer"},
                "currency": {"type": "string"},
            }, ["order_id", "version", "state", "sale_id", "sku", "buyer_id", "quantity",
                "amount", "currency"]),
        }, ["type", "timestamp", "data"])}}},
        "responses": {"2XX": {"description": "Stored: the event is not sent again"}},
    }
}  # fmt: skip
