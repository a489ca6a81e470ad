"""The building blocks of the gateway's OpenAPI document: error answers, operations, and the
parameters that several paths share."""

from __future__ import annotations

from typing import Any

from gateway.documents import COMPRESS_FROM
from gateway.http import MAX_BODY
from gateway.sale_info import MAX_AGE_ENDED_S, MAX_AGE_LIVE_S, MAX_AGE_SOLD_OUT_S

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
    413: f"Body larger than {MAX_BODY // 1024} KiB",
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


def errors(*codes: int) -> dict[str, Any]:
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
        "description": f"public, max-age=N: {MAX_AGE_LIVE_S} s while the sale can change, "
        f"{MAX_AGE_SOLD_OUT_S} s once it is sold out for good, {MAX_AGE_ENDED_S} s once it has "
        "ended (a CDN in front may keep the answer that long)",
        "schema": {"type": "string"},
    }
}


SHARED_DOCUMENT = {
    **CACHE_CONTROL,
    "ETag": {
        "description": "a strong tag of this representation (the gzip one has its own): send "
        "it back in If-None-Match to get a 304 without a body while it is current",
        "schema": {"type": "string"},
    },
    "Vary": {"description": "Accept-Encoding, Origin", "schema": {"type": "string"}},
    "Content-Encoding": {
        "description": f"gzip when the request accepts it and the answer is "
        f"{COMPRESS_FROM // 1024} KiB or more "
        "(a sale of many SKUs); absent otherwise",
        "schema": {"type": "string"},
    },
}
IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "an ETag of an earlier answer: 304 while it is still current",
    "schema": {"type": "string"},
}


def shared(answers: dict[str, Any]) -> dict[str, Any]:
    """``answers`` of a :class:`gateway.documents.Document`: the caching headers on each, and
    the 304 of a revalidation."""
    return {
        **{code: {**answer, "headers": SHARED_DOCUMENT} for code, answer in answers.items()},
        "304": {"description": "Not modified: the If-None-Match tag is current",
                "headers": SHARED_DOCUMENT},
    }  # fmt: skip


def ok(status: int, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {str(status): {"description": description, "content": {JSON: {"schema": schema}}}}


def sale_param() -> dict[str, Any]:
    return {"name": "sale", "in": "path", "required": True, "schema": {"type": "string"}}


def op(
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


def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


# Parameters that several paths share.
SALE_PATH = [sale_param()]
TICKET = {
    "name": "X-Queue-Ticket",
    "in": "header",
    "required": True,
    "schema": {"type": "string"},
}
ADMISSION = {
    "name": "X-Admission-Token",
    "in": "header",
    "required": True,
    "schema": {"type": "string"},
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,100}$"},
}
RESERVATION_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
