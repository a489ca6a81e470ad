"""Request helpers shared by every route module: JSON bodies and bearer credentials."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import orjson
from aiohttp import web

from flashsale.errors import InvalidInput, Unauthorized


async def json_body(
    request: web.Request, *, allowed: Collection[str] | None = None, optional: bool = False
) -> dict[str, Any]:
    """The request's JSON object. Malformed JSON, a non-object or (with ``allowed``) an unknown
    field is a 422 naming the problem; an empty body is ``{}`` when ``optional``."""
    raw = await request.read()
    if not raw.strip() and optional:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("body", f"malformed JSON: {exc}", code="malformed_json") from None
    if not isinstance(data, dict):
        raise InvalidInput("body", "must be a JSON object")
    if allowed is not None:
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise InvalidInput(unknown[0], "unknown field", code="unknown_field")
    return data


def bearer(request: web.Request) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 when absent or of another scheme."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token", code="missing_token")
    return token.strip()
