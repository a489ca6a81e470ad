"""Storefronts on other origins: CORS on the buyer API (``FLASHSALE_CORS_ORIGINS``), through
the real gateway app and a real Redis; and the setting's validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flashsale.errors import ConfigError
from flashsale.settings import Settings
from gateway.cors import REQUEST_HEADERS
from tests.harness import gateway

SHOP = "https://shop.example.com"


def preflight(method: str, headers: str, origin: str = SHOP) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers}  # fmt: skip


async def test_a_listed_storefront_may_call_the_buyer_api(stack: Settings) -> None:
    async with gateway(stack, cors_origins=(SHOP, "http://127.0.0.1:9000")) as gw:
        sale = await gw.create_sale(stock=3)
        join = f"/v1/sales/{sale}/queue"
        answer = await gw.http.options(join, headers=preflight("POST", "authorization"))
        assert answer.status == 200, await answer.text()
        assert answer.headers["Access-Control-Allow-Origin"] == SHOP
        assert answer.headers["Access-Control-Allow-Methods"] == "POST"
        assert answer.headers["Access-Control-Allow-Headers"].lower() == "authorization"
        assert answer.headers["Access-Control-Allow-Credentials"] == "true"
        reserve = await gw.http.options(
            f"/v1/sales/{sale}/reservations",
            headers=preflight("POST", "authorization,idempotency-key,x-admission-token,"
                                      "content-type"),
        )  # fmt: skip
        assert reserve.status == 200, await reserve.text()
        # A sale with a join challenge: its headers pass a preflight too, and so does a
        # storefront's own request id.
        solved = await gw.http.options(
            join, headers=preflight("POST", "authorization,x-challenge,x-challenge-solution,"
                                            "x-request-id"),
        )  # fmt: skip
        assert solved.status == 200, await solved.text()

        # The real request: the answer names the origin and lets the page read Retry-After.
        joined = await gw.http.post(
            join, headers={"Origin": SHOP, "Authorization": f"Bearer {gw.token('c1')}"}
        )
        assert joined.status == 200, await joined.text()
        assert joined.headers["Access-Control-Allow-Origin"] == SHOP
        assert "Retry-After" in joined.headers["Access-Control-Expose-Headers"]
        assert "X-Request-Id" in joined.headers["Access-Control-Expose-Headers"]
        # ... and the server's clock, for countdowns that do not trust the device's (as the
        # waiting-room page's).
        assert "Date" in joined.headers["Access-Control-Expose-Headers"].split(",")
        # An error answer carries them too, so the page can honour a 4xx/5xx's Retry-After.
        refused = await gw.http.post(join, headers={"Origin": SHOP})
        assert refused.status == 401
        assert refused.headers["Access-Control-Allow-Origin"] == SHOP

        # Another origin: its preflight is refused and its answers name no origin.
        other = await gw.http.options(join, headers=preflight("POST", "authorization",
                                                              "https://evil.example"))  # fmt: skip
        assert other.status == 403
        assert "Access-Control-Allow-Origin" not in other.headers
        error = (await other.json())["error"]  # a stable code naming what was refused
        assert error["code"] == "cors_refused" and "evil.example" in error["message"], error
        unlisted = await gw.http.options(join, headers=preflight("POST", "x-unknown"))
        assert unlisted.status == 403
        error = (await unlisted.json())["error"]
        assert error["code"] == "cors_refused" and "x-unknown" in error["message"].lower(), error
        plain = await gw.http.get(f"/v1/sales/{sale}", headers={"Origin": "https://evil.example"})
        assert plain.status == 200 and "Access-Control-Allow-Origin" not in plain.headers
        # The admin API is never cross-origin.
        admin = await gw.http.options("/admin/v1/sales", headers=preflight("POST", "authorization"))
        assert admin.status in (401, 405) and "Access-Control-Allow-Origin" not in admin.headers


async def test_any_origin_never_gets_credentials(stack: Settings) -> None:
    async with gateway(stack, cors_origins=("*",)) as gw:
        sale = await gw.create_sale(stock=1)
        answer = await gw.http.options(f"/v1/sales/{sale}/queue",
                                       headers=preflight("POST", "authorization"))  # fmt: skip
        assert answer.status == 200
        assert answer.headers["Access-Control-Allow-Origin"] == SHOP
        assert "Access-Control-Allow-Credentials" not in answer.headers


async def test_without_the_setting_there_is_no_cors_and_a_preflight_is_told_why(
    stack: Settings,
) -> None:
    """A storefront developer trying the API from their page before the setting was made got
    405 "Method Not Allowed" for the browser's preflight, which names neither CORS nor what
    to set."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=1)
        answer = await gw.http.options(f"/v1/sales/{sale}/queue",
                                       headers=preflight("POST", "authorization"))  # fmt: skip
        assert answer.status == 403
        error = (await answer.json())["error"]
        assert error["code"] == "cors_refused" and "FLASHSALE_CORS_ORIGINS" in error["message"]
        assert "Access-Control-Allow-Origin" not in answer.headers
        joined = await gw.http.post(f"/v1/sales/{sale}/queue", headers={"Origin": SHOP})
        assert "Access-Control-Allow-Origin" not in joined.headers


@pytest.mark.parametrize("value", ["shop.example.com", "https://shop.example.com/path",
                                   "ftp://x", "https://a b", "https://shop.example.com:99999",
                                   "https://shop.example.com:0"])  # fmt: skip
def test_the_setting_names_a_bad_origin(value: str) -> None:
    with pytest.raises(ConfigError, match="FLASHSALE_CORS_ORIGINS"):
        Settings.from_env({"FLASHSALE_CORS_ORIGINS": f"https://ok.example, {value}"})


def test_the_setting_takes_origins_and_a_star() -> None:
    settings = Settings.from_env(
        {"FLASHSALE_CORS_ORIGINS": "https://a.example, http://127.0.0.1:8081/ ,*"}
    )
    assert settings.cors_origins == ("https://a.example", "http://127.0.0.1:8081", "*")


async def test_an_origin_is_matched_as_browsers_write_it(stack: Settings) -> None:
    """A browser's ``Origin`` has its scheme and host in lower case and no default port; the
    setting was compared as written, so ``https://Shop.Example.com`` or
    ``https://shop.example.com:443`` refused every call of that storefront."""
    settings = Settings.from_env({
        "FLASHSALE_CORS_ORIGINS": "HTTPS://Shop.Example.com:443, http://Other.Example:80",
        "FLASHSALE_RESERVATIONS_URL": "HTTPS://Reserve.Example.com:443",
    })  # fmt: skip
    assert settings.cors_origins == ("https://shop.example.com", "http://other.example")
    assert settings.reservations_url == "https://reserve.example.com"
    async with gateway(stack, cors_origins=settings.cors_origins) as gw:
        sale = await gw.create_sale(stock=1)
        answer = await gw.http.options(f"/v1/sales/{sale}/queue",
                                       headers=preflight("POST", "authorization"))  # fmt: skip
        assert answer.status == 200, await answer.text()
        assert answer.headers["Access-Control-Allow-Origin"] == SHOP


def test_every_header_the_buyer_api_reads_passes_a_preflight() -> None:
    # The join challenge's headers were once missing here: a storefront on another origin
    # could not join a sale that asks a challenge. Any header a route reads must be listed.
    source = "".join(p.read_text() for p in Path("gateway").glob("*.py"))
    read = set(re.findall(r'headers\.get\("((?:X|Idempotency)-[A-Za-z-]+)"', source))
    read -= {"X-Forwarded-For"}  # set by proxies, never by a browser
    assert read and read <= set(REQUEST_HEADERS), read - set(REQUEST_HEADERS)
