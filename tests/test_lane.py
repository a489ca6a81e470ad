"""The lane: the buyers' hot routes served beside aiohttp's application layer. Which requests
it takes, and that what it serves is what the application would have answered (every other
gateway test also goes through it: tests.harness installs it as the gateway's runner does)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from flashsale.settings import Settings
from gateway.app import create_app
from gateway.state import LANE
from tests.harness import gateway


@pytest.fixture(scope="module")
def app(stack: Settings) -> web.Application:
    return create_app(stack)


@pytest.mark.parametrize(
    ("method", "path", "canonical"),
    [
        ("GET", "/v1/sales/s-1/queue/status", "/v1/sales/{sale}/queue/status"),
        ("POST", "/v1/sales/s-1/queue", "/v1/sales/{sale}/queue"),
        ("POST", "/v1/sales/s-1/reservations", "/v1/sales/{sale}/reservations"),
    ],
)
def test_the_three_hot_routes_are_taken(
    app: web.Application, method: str, path: str, canonical: str
) -> None:
    found = app[LANE].match(make_mocked_request(method, path))
    assert found is not None
    route, sale = found
    assert (route.method, sale) == (method, "s-1")
    assert route.resource is not None and route.resource.canonical == canonical


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/sales/s-1/queue"),  # another method of a hot path
        ("GET", "/v1/sales/s-1/queue"),
        ("GET", "/v1/sales/s-1/queue/status?x=1"),  # a query string
        ("GET", "/v1/sales/s%2D1/queue/status"),  # a percent-escape
        ("GET", "/v1/sales/s-1/queue/status/"),  # a trailing slash
        ("GET", "/v1/sales/s-1/queue/status/more"),
        ("POST", "/v1/sales//queue"),  # no sale
        ("POST", "/v1/sales/{s}/queue"),
        ("GET", "/v1/sales/s-1"),
        ("GET", "/admin/v1/sales/s-1/queue/status"),
        ("GET", "/healthz"),
    ],
)
def test_everything_else_is_left_to_the_application(
    app: web.Application, method: str, path: str
) -> None:
    assert app[LANE].match(make_mocked_request(method, path)) is None


async def test_hot_routes_skip_the_router_and_the_rest_use_it(stack: Settings) -> None:
    """A poll, a join and a reservation are answered without the router; a sale's page, an
    unknown route and a request the lane is unsure of go through it, with the same answers
    and headers."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=3)
        router = gw.app.router
        resolved: list[str] = []
        original = router.resolve

        async def counting(request: web.Request) -> Any:
            resolved.append(request.path)
            return await original(request)

        router.resolve = counting
        token = gw.token("lane-1")
        joined = await gw.http.post(f"/v1/sales/{sale}/queue",
                                    headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert joined.status == 200, await joined.text()
        assert joined.headers["X-Request-Id"]
        ticket = (await joined.json())["ticket"]
        polled = await gw.http.get(f"/v1/sales/{sale}/queue/status",
                                   headers={"X-Queue-Ticket": ticket})  # fmt: skip
        assert polled.status == 200, await polled.text()
        refused = await gw.http.post(f"/v1/sales/{sale}/reservations", json={})
        assert refused.status == 401
        assert (await refused.json())["error"]["code"] == "missing_token"
        assert resolved == []

        # The same poll with a query string goes through the router, with the same answer.
        again = await gw.http.get(f"/v1/sales/{sale}/queue/status?from=lane",
                                  headers={"X-Queue-Ticket": ticket})  # fmt: skip
        assert again.status == 200
        assert (await again.json())["state"] == (await polled.json())["state"]
        page = await gw.http.get(f"/v1/sales/{sale}")
        assert page.status == 200
        missing = await gw.http.get(f"/v1/sales/{sale}/nothing")
        assert missing.status == 404
        assert (await missing.json())["error"]["code"] == "not_found"
        assert resolved == [f"/v1/sales/{sale}/queue/status", f"/v1/sales/{sale}",
                            f"/v1/sales/{sale}/nothing"]  # fmt: skip


async def test_the_lane_counts_its_requests_by_route(stack: Settings) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=3)
        for n in range(3):
            bearer = {"Authorization": f"Bearer {gw.token(f'm{n}')}"}
            answer = await gw.http.post(f"/v1/sales/{sale}/queue", headers=bearer)
            assert answer.status == 200
        text = await (await gw.http.get("/metrics")).text()
        line = next(
            x for x in text.splitlines()
            if x.startswith("flashsale_gateway_requests_total{")
            and 'route="/v1/sales/{sale}/queue"' in x and 'method="POST"' in x
        )  # fmt: skip
        assert float(line.rsplit(" ", 1)[1]) == 3.0
