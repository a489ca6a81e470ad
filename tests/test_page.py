"""The waiting-room page in headless Chromium (Debian's, driven by Playwright): a buyer joins,
waits, is admitted and reserves; the test saves a screenshot of each stage."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flashsale.cli.devstack.processes import free_port
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


# A storefront of its own origin: it calls the gateway's API from the buyer's browser.
STOREFRONT = b"""<!doctype html><meta charset="utf-8"><title>Shop</title>
<p id="result" data-state="starting">starting</p>
<script>
const say = (state, text) => {
  const el = document.getElementById("result");
  el.dataset.state = state; el.textContent = text;
};
(async () => {
  const p = new URLSearchParams(location.hash.slice(1));
  const api = p.get("gateway"), sale = p.get("sale"), auth = "Bearer " + p.get("token");
  try {
    let r = await fetch(`${api}/v1/sales/${sale}/queue`,
                        {method: "POST", headers: {Authorization: auth}});
    let body = await r.json();
    let ticket = body.ticket;
    say("queued", "queued at " + body.position);
    while (body.state !== "admitted") {
      await new Promise(done => setTimeout(done, 100));
      r = await fetch(`${api}/v1/sales/${sale}/queue/status`,
                      {headers: {"X-Queue-Ticket": ticket}});
      body = await r.json();
      ticket = body.ticket || ticket;
    }
    r = await fetch(`${api}/v1/sales/${sale}/reservations`, {method: "POST",
      headers: {Authorization: auth, "X-Admission-Token": body.admission_token,
                "Idempotency-Key": "shop-1", "Content-Type": "application/json"},
      body: JSON.stringify({sku: "S1", quantity: 1, payment_token: "tok_visa"})});
    body = await r.json();
    say(r.status === 201 ? "reserved" : "refused",
        r.status === 201 ? body.reservation_id : JSON.stringify(body));
  } catch (err) {
    say("failed", String(err));
  }
})();
</script>"""


class _Shop(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(STOREFRONT)

    def log_message(self, *_args: object) -> None:
        pass


def test_a_storefront_on_another_origin_joins_polls_and_reserves(
    stack: Settings, chromium: str
) -> None:
    """Chromium runs a storefront page served from another loopback port; its fetch calls
    (with preflights, for the custom headers) reach the gateway through CORS."""
    from playwright.sync_api import sync_playwright

    shop_port = free_port()
    shop = http.server.ThreadingHTTPServer(("127.0.0.1", shop_port), _Shop)
    threading.Thread(target=shop.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{shop_port}"
    try:
        with live_gateway(stack, cors_origins=(origin,)) as gw:
            sale = create_live_sale(gw.base_url, stock=2, name="Cross-origin drop")
            gw.pump_forever(sale, ["S1"])
            token = Signer.from_setting(gw.settings.buyer_token_secret.reveal(), "buyer").sign(
                {"sub": "shop-buyer"}, 3600
            )
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
                page = browser.new_page()
                page.goto(f"{origin}/#gateway={gw.base_url}&sale={sale}&token={token}")
                page.wait_for_selector("#result[data-state='reserved'], "
                                       "#result[data-state='refused'], "
                                       "#result[data-state='failed']", timeout=30_000)  # fmt: skip
                outcome = page.get_attribute("#result", "data-state")
                rid = page.text_content("#result")
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOTS / "storefront-cross-origin.png"))
                browser.close()
            assert outcome == "reserved", rid
            bearer = {"Authorization": f"Bearer {token}"}
            held = requests.get(f"{gw.base_url}/v1/reservations/{rid}", headers=bearer, timeout=10)
            assert held.status_code == 200 and held.json()["state"] == "ACTIVE"
    finally:
        shop.shutdown()
        shop.server_close()
