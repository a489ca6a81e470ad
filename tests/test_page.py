"""The waiting-room page in headless Chromium (Debian's, driven by Playwright): a buyer joins,
waits, is admitted and reserves; the test saves a screenshot of each stage."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flashsale.settings import Settings
from flashsale.tokens import Signer
from tests.harness import create_live_sale, live_gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(os.environ.get("FLASHSALE_HOME", ".flashsale")) / "screenshots"
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
def chromium() -> Iterator[str]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `make test` installs it (apt) when root")
        pytest.skip("chromium is not installed (apt install chromium)")
    yield CHROMIUM


def test_waiting_room_page_in_chromium(stack: Settings, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, stock=3, name="Sneaker drop")
        token = Signer.from_setting(gw.settings.buyer_token_secret.reveal(), "buyer").sign(
            {"sub": "page-buyer"}, 3600
        )
        unknown = requests.get(f"{gw.base_url}/sales/no-such-sale", timeout=10)
        assert unknown.status_code == 404
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
            page = browser.new_page()
            page.goto(f"{gw.base_url}/sales/{sale}#token={token}")
            assert page.title().startswith("Sneaker drop")
            page.wait_for_selector("#sku option", state="attached")  # sale info loaded
            page.click("#join")
            page.wait_for_selector("#state[data-state='waiting'], #state[data-state='admitted']")
            page.screenshot(path=str(SCREENSHOTS / "waiting-room-queued.png"))
            position = page.text_content("#position")
            assert position == "1"
            gw.pump_forever(sale, ["S1"])
            page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
            assert page.is_visible("#reserve")
            page.click("#reserve")
            page.wait_for_selector("#result[data-reservation]", timeout=20_000)
            assert "Reserved" in (page.text_content("#result") or "")
            page.screenshot(path=str(SCREENSHOTS / "waiting-room-reserved.png"))
            rid = page.get_attribute("#result", "data-reservation")
            browser.close()
        held = requests.get(
            f"{gw.base_url}/v1/reservations/{rid}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert held.status_code == 200 and held.json()["state"] == "ACTIVE"
    assert (SCREENSHOTS / "waiting-room-reserved.png").stat().st_size > 1000
