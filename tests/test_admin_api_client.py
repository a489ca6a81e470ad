"""The load tools' admin client (loadtest/admin_api.py) waits out a 503 as an admin would:
the full fault run's network-blackhole scenario failed at its setup when one preload met a
designed 503 (a dependency unavailable, with Retry-After)."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flashsale.errors import FlashsaleError
from loadtest import admin_api


async def test_a_503_is_waited_out_and_a_create_is_retried_under_one_key() -> None:
    seen: list[tuple[str, str | None]] = []
    refusals = {"/admin/v1/sales": 2, "/admin/v1/sales/s-1/preload": 1}

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Idempotency-Key")))
        if refusals.get(request.path, 0) > 0:
            refusals[request.path] -= 1
            return web.json_response({"error": {"code": "unavailable"}}, status=503,
                                     headers={"Retry-After": "0"})  # fmt: skip
        if request.path == "/admin/v1/sales":
            return web.json_response({"id": "s-1"}, status=201)
        return web.json_response({"results": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app)
    await server.start_server()
    try:
        base = str(server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as session:
            assert await admin_api.create_sale(session, base, "t", {"name": "x"}) == "s-1"
            creates = [key for path, key in seen if path == "/admin/v1/sales"]
            assert len(creates) == 3 and creates[0] and len(set(creates)) == 1
            assert [p for p, _ in seen].count("/admin/v1/sales/s-1/preload") == 2

            refusals["/admin/v1/sales/s-1/end"] = admin_api.ATTEMPTS  # never comes back
            with pytest.raises(FlashsaleError, match="ending the sale failed: 503"):
                await admin_api.end_sale(session, base, "t", "s-1")
            assert [p for p, _ in seen].count("/admin/v1/sales/s-1/end") == admin_api.ATTEMPTS
    finally:
        await server.close()
