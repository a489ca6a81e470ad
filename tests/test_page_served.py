"""The pages as they are served, without a browser: compressed and revalidated, a page (not
JSON) to a browser when the gateway cannot serve it, and links a slash off sent on to theirs.
(The page tests in Chromium are in test_page.py; a module of them shares one browser, whose
event loop leaves no room there for ``asyncio.run``.)"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer

import gateway.page
from flashsale.errors import Unavailable
from flashsale.settings import Settings
from gateway.app import create_app
from tests.harness import ADMIN, create_live_sale, live_gateway, packed_and_revalidated


def test_the_page_is_sent_compressed_and_revalidated_with_its_etag(stack: Settings) -> None:
    """Every buyer of a spike loads the page (and reloads it): it went out as 21 KB of plain
    HTML each time, with nothing a browser or a proxy could revalidate."""
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, stock=1, name="Packed drop")
        url = f"{gw.base_url}/sales/{sale}"
        plain = packed_and_revalidated(url)
        assert "no-cache" in plain.headers["Cache-Control"]  # always asked again: 304 or new
        admin = {"Authorization": f"Bearer {ADMIN}"}
        renamed = requests.patch(
            f"{gw.base_url}/admin/v1/sales/{sale}",
            headers=admin,
            json={"name": "Renamed drop"},
            timeout=10,
        )
        assert renamed.status_code == 200, renamed.text
        deadline = time.monotonic() + 10  # the summary the page is made from, read again
        while "Renamed drop" not in (fresh := requests.get(url, timeout=10)).text:
            assert time.monotonic() < deadline, "the page kept the old name"
            time.sleep(0.2)
        assert fresh.headers["ETag"] != plain.headers["ETag"]


BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def test_a_page_that_cannot_be_served_is_a_page_to_a_browser(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shop's link to a sale that is not there, or the page refused while the gateway was
    at capacity or a server down, showed the buyer raw JSON and nothing more: a browser
    gets a page saying so, which loads itself again after ``Retry-After``; an API client
    still gets the JSON error."""

    async def run() -> None:
        async with TestClient(TestServer(create_app(stack))) as client:
            missing = await client.get("/sales/sale-nope", headers=BROWSER)
            text = await missing.text()
            assert (missing.status, missing.content_type) == (404, "text/html"), text
            assert "This sale does not exist" in text and "refresh" not in text, text
            plain = await client.get("/sales/sale-nope")
            assert (await plain.json())["error"]["code"] == "unknown_sale"

            async def down(request: object, sale_id: str) -> None:
                outage = Unavailable("Redis is restarting")
                outage.retry_after_s = 3
                raise outage

            monkeypatch.setattr(gateway.page, "sale_summary", down)
            busy = await client.get("/sales/sale-any", headers=BROWSER)
            text = await busy.text()
            assert (busy.status, busy.headers["Retry-After"]) == (503, "3"), text
            assert '<meta http-equiv="refresh" content="3">' in text, text
            assert "tries again by itself" in text and "Redis" not in text, text

    asyncio.run(run())


def test_the_operators_page_refused_at_capacity_is_a_page_to_a_browser(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SRE opening the live page while a spike fills the gateway was shown
    `{"error": {"code": "overloaded", ...}}` in the browser, with nothing to do but reload by
    hand: a page, which loads itself again after Retry-After; the admin API keeps its JSON."""
    held = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: object, sale_id: str) -> None:
        entered.set()
        await held.wait()  # the one request the gateway has room for

    async def run() -> None:
        one = dataclasses.replace(stack, max_in_flight=1)
        async with TestClient(TestServer(create_app(one))) as client:
            monkeypatch.setattr(gateway.page, "sale_summary", slow)
            filling = asyncio.ensure_future(client.get("/sales/sale-any", headers=BROWSER))
            await asyncio.wait_for(entered.wait(), 10)
            busy = await client.get("/admin/", headers=BROWSER)
            text = await busy.text()
            assert (busy.status, busy.content_type) == (503, "text/html"), text
            assert '<meta http-equiv="refresh" content="1">' in text, text
            assert "tries again by itself" in text and "shop" not in text, text
            admin = {**BROWSER, "Authorization": f"Bearer {ADMIN}"}
            api = await client.get("/admin/v1/sales", headers=admin)
            assert (await api.json())["error"]["code"] == "overloaded"
            held.set()
            (await filling).close()

    asyncio.run(run())


def test_a_link_with_a_slash_more_or_less_reaches_its_page(stack: Settings) -> None:
    """A shop's link written `/sales/<sale>/` (as link builders end a path), and an operator
    typing `/admin`, got a JSON 404 and a JSON 401: each is sent on to its page, with its
    query (the fragment, where the buyer's pass travels, is kept by the browser)."""

    async def run() -> None:
        async with TestClient(TestServer(create_app(stack))) as client:
            for path, to in (
                ("/sales/sale-1/?sku=A&sku=B", "/sales/sale-1?sku=A&sku=B"),
                ("/sales/sale-1/", "/sales/sale-1"),
                ("/admin", "/admin/"),
            ):
                moved = await client.get(path, headers=BROWSER, allow_redirects=False)
                assert (moved.status, moved.headers.get("Location")) == (308, to), path
            assert (await client.get("/admin/v1/sales/")).status == 401  # the API: not a page

    asyncio.run(run())


def test_an_address_the_gateway_does_not_serve_says_what_it_serves(stack: Settings) -> None:
    """`flashsale up` names the gateway's address: opened as it is, or with a path guessed
    (`/docs`), it answered `{"error": {"code": "not_found", "message": "Not Found"}}` and
    named nothing. The 404 names the pages, the APIs and the probes, and a browser gets it as
    a page of links. It stays a 404: a load balancer's default check of `/` must not pass
    for a gateway whose dependencies are down (its check is /readyz)."""

    async def run() -> None:
        async with TestClient(TestServer(create_app(stack))) as client:
            for path in ("/", "/docs", "/v1/nope"):  # (/admin/...: 401 first, without the token)
                answer = await client.get(path)
                error = (await answer.json())["error"]
                assert (answer.status, error["code"]) == (404, "not_found"), path
                assert error["message"].startswith(f"nothing at {path}: "), error
                for named in ("/sales/SALE", "/admin/", "/v1/", "/openapi.json", "/readyz"):
                    assert named in error["message"], (path, error)
            page = await client.get("/", headers=BROWSER)
            text = await page.text()
            assert (page.status, page.content_type) == (404, "text/html"), text
            for link in ("/admin/", "/openapi.json", "/readyz", "/metrics"):
                assert f'<a href="{link}">' in text, text
            # What is there keeps its own answer.
            unknown = await (await client.get("/v1/sales/sale-nope")).json()
            assert unknown["error"]["code"] == "unknown_sale"
            wrong = await client.delete("/openapi.json")
            assert (wrong.status, wrong.headers["Allow"]) == (405, "GET,HEAD"), wrong.headers
            said = (await wrong.json())["error"]["message"]
            assert said == "DELETE /openapi.json: this address takes GET, HEAD", said

    asyncio.run(run())


def test_a_method_an_address_does_not_take_names_the_one_meant(stack: Settings) -> None:
    """A storefront developer reading a buyer's place with GET on the queue's address (where
    POST joins) was told only "this address takes DELETE, OPTIONS, POST", and the
    reservations' address likewise: the answer names the address that reads it."""

    async def run() -> None:
        async with TestClient(TestServer(create_app(stack))) as client:
            for method, path, meant in (
                ("GET", "/v1/sales/s-1/queue", "GET /v1/sales/s-1/queue/status"),
                ("GET", "/v1/sales/s-1/reservations", "GET /v1/reservations/{id}"),
                ("DELETE", "/v1/sales/s-1/reservations", "DELETE /v1/reservations/{id}"),
            ):
                answer = await client.request(method, path)
                error = (await answer.json())["error"]
                assert (answer.status, error["code"]) == (405, "method_not_allowed"), path
                assert error["message"].startswith(f"{method} {path}: this address takes "), error
                assert meant in error["message"], error

    asyncio.run(run())
