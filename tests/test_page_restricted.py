"""The waiting-room page and the operators' page in browsers that hold back what a page on
``https://`` or ``localhost`` gets: a plain-HTTP address (no secure context: no
``crypto.randomUUID``, no ``crypto.subtle``) and site data blocked (``localStorage`` and
``sessionStorage`` throw, as in a framed page with third-party cookies blocked)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flashsale.settings import Settings
from flashsale.tokens import Signer
from tests.harness import (
    ADMIN,
    FLAGS,
    SCREENSHOTS,
    LiveGateway,
    answer_no_on_the_page,
    ask_proof_of_work,
    create_live_sale,
    join_and_reserve,
    live_gateway,
    sale_spec,
)

HOST = "shop.test"  # resolved to 127.0.0.1 by Chromium itself: no secure context
PLAIN_HTTP = [*FLAGS, f"--host-resolver-rules=MAP {HOST} 127.0.0.1"]


def _token(gw: LiveGateway, buyer: str) -> str:
    """A shop's link after ``#token=``: the buyer's pass and the payment method held for them."""
    secret = gw.settings.buyer_token_secret.reveal()
    return f"{Signer.from_setting(secret, 'buyer').sign({'sub': buyer}, 3600)}&payment=tok_visa"


def _plain_http(gw: LiveGateway) -> str:
    return gw.base_url.replace("127.0.0.1", HOST)


@contextmanager
def _browser(chromium: str, *, site_data: bool = True, args: list[str] = FLAGS
             ) -> Iterator[tuple[Any, list[str]]]:  # fmt: skip
    """A Chromium context, and every error its pages report (a script's uncaught error, a
    resource that failed to load). ``site_data=False`` starts a profile whose setting blocks
    every site's data, as a buyer may choose."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        if not site_data:
            (Path(profile) / "Default").mkdir()
            blocked = {"profile": {"default_content_setting_values": {"cookies": 2}}}
            (Path(profile) / "Default" / "Preferences").write_text(json.dumps(blocked))
        context = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, args=args, headless=True
        )

        def uncaught(e: Any) -> None:
            errors.append(f"uncaught: {e.error}")

        def console(m: Any) -> None:
            if m.type == "error":
                errors.append(f"console: {m.text} at {m.location.get('url')}")

        context.on("weberror", uncaught)
        context.on("console", console)
        try:
            yield context, errors
        finally:
            context.close()


def test_the_page_on_a_plain_http_address_joins_and_reserves(
    stack: Settings, chromium: str
) -> None:
    """A shop trying the engine on its network before putting TLS in front: the reservation's
    idempotency key was made by ``crypto.randomUUID``, which only a secure context has, so
    "Reserve" did nothing. Nor may the page ask for a favicon the gateway does not have (every
    buyer's browser would, during the spike)."""
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, stock=2, name="Plain drop")
        with _browser(chromium, args=PLAIN_HTTP) as (context, errors):
            page = context.new_page()
            page.goto(f"{_plain_http(gw)}/sales/{sale}#token={_token(gw, 'plain-buyer')}")
            assert page.evaluate("window.isSecureContext") is False
            rid = join_and_reserve(page, gw, sale)
            page.wait_for_selector("#result:has-text('Reserved')", timeout=15_000)
            assert rid and sale in rid, rid
            assert errors == []


def test_the_page_with_site_data_blocked_joins_reserves_and_says_a_reload_loses_the_place(
    stack: Settings, chromium: str
) -> None:
    """A buyer whose browser keeps no site data (a setting, or the page framed by a storefront
    with third-party cookies blocked): reading ``localStorage`` throws, and the page stayed on
    "Loading the sale…". It keeps what it holds in the tab and says a reload loses it."""
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, stock=2, name="Private drop")
        with _browser(chromium, site_data=False) as (context, errors):
            page = context.new_page()
            page.goto(f"{gw.base_url}/sales/{sale}#token={_token(gw, 'private-buyer')}")
            assert join_and_reserve(page, gw, sale)
            page.wait_for_selector("#result:has-text('Reserved')", timeout=15_000)
            assert "keep this tab open" in " ".join((page.text_content("#storage") or "").split())
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "waiting-room-site-data-blocked.png"))
            assert errors == []


def test_a_join_challenge_on_a_plain_http_address_says_the_page_needs_https(
    stack: Settings, chromium: str
) -> None:
    """The proof of work hashes with ``crypto.subtle``, which a plain-HTTP page does not have:
    the page said "Checking your browser…" for ever. It says what is missing instead."""
    with live_gateway(stack) as gw:
        spec = {**sale_spec("Guarded plain drop", "S1", 5), "join_challenge": 4}
        sale = create_live_sale(gw.base_url, spec=spec)
        with _browser(chromium, args=PLAIN_HTTP) as (context, errors):
            page = context.new_page()
            page.goto(f"{_plain_http(gw)}/sales/{sale}#token={_token(gw, 'plain-guarded')}")
            page.wait_for_selector("#join:not([hidden])", timeout=15_000)
            page.click("#join")
            page.wait_for_selector("#state[data-state='insecure']", timeout=15_000)
            assert "https://" in (page.text_content("#status") or "")
            # One turned on after the page read the sale is said so too (it would wait on a
            # solver that cannot hash, for ever).
            later = create_live_sale(gw.base_url, spec=sale_spec("Guarded later", "S1", 5))
            page = context.new_page()
            page.goto(f"{_plain_http(gw)}/sales/{later}#token={_token(gw, 'plain-later')}")
            page.wait_for_selector("#join:not([hidden])", timeout=15_000)
            ask_proof_of_work(gw.base_url, later, 4)
            page.click("#join")
            page.wait_for_selector("#state[data-state='insecure']", timeout=15_000)
            refused = f"status of 403 (Forbidden) at {_plain_http(gw)}/v1/sales/{later}/queue"
            assert [e for e in errors if not e.endswith(refused)] == [], errors  # the join's


def test_the_operators_page_with_site_data_blocked_logs_in_for_the_tab(
    stack: Settings, chromium: str
) -> None:
    """The operators' page kept the admin token in ``sessionStorage``; with site data blocked,
    reading it threw and the page never offered its login."""
    with live_gateway(stack) as gw:
        create_live_sale(gw.base_url, stock=2, name="Watched drop")
        with _browser(chromium, site_data=False) as (context, errors):
            page = context.new_page()
            page.goto(f"{gw.base_url}/admin/")
            page.wait_for_selector("#token", timeout=15_000)
            page.fill("#token", ADMIN)
            page.keyboard.press("Enter")
            page.wait_for_selector("text=Watched drop", timeout=15_000)
            assert errors == []


def test_both_pages_with_javascript_off_say_they_need_it(stack: Settings, chromium: str) -> None:
    """With scripts off (a setting, or a privacy extension), the buyer's page said "Loading
    the sale…" for ever and the operators' page showed an empty login."""
    from playwright.sync_api import sync_playwright

    with live_gateway(stack) as gw, sync_playwright() as p:
        sale = create_live_sale(gw.base_url, stock=1, name="Scriptless drop")
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        try:
            context = browser.new_context(java_script_enabled=False)
            for path in (f"/sales/{sale}", "/admin/"):
                page = context.new_page()
                page.goto(gw.base_url + path)
                said = " ".join(page.inner_text("body").split())
                assert "needs JavaScript" in said, (path, said)
                assert "Loading the sale" not in said, (path, said)
        finally:
            browser.close()


# Counts what a screen reader would be given to say: every change of text inside a live
# region (aria-live polite or assertive), and the changes of the countdown shown.
WATCH_LIVE_REGIONS = """(clock) => {
  window.spoken = 0; window.ticked = 0;
  const live = (node) => {
    const el = node.nodeType === 1 ? node : node.parentElement;
    const region = el && el.closest("[aria-live]");
    return region && region.getAttribute("aria-live") !== "off";
  };
  new MutationObserver((changes) => {
    if (changes.some((c) => live(c.target))) window.spoken += 1;
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
  new MutationObserver(() => { window.ticked += 1; })
    .observe(document.getElementById(clock), {subtree: true, childList: true,
                                              characterData: true});
}"""


def test_a_screen_reader_is_not_read_the_countdown_every_second(
    stack: Settings, chromium: str
) -> None:
    """The status card and the reservation's card were live regions, and their countdowns
    rewrote them each second: a screen reader read "Starts in 0:09", "0:08", ... without end,
    over anything else. A change of state is said once; the clock is shown, not read out."""
    from playwright.sync_api import sync_playwright

    with live_gateway(stack) as gw, sync_playwright() as p:
        sale = create_live_sale(gw.base_url, stock=1, name="Spoken drop", starts_in=30)
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{gw.base_url}/sales/{sale}#token={_token(gw, 'listener')}")
            page.wait_for_selector("#state[data-state='scheduled']", timeout=15_000)
            page.evaluate(WATCH_LIVE_REGIONS, "state")
            page.wait_for_timeout(2_300)
            ticked, spoken = page.evaluate("[window.ticked, window.spoken]")
            assert ticked >= 2, ticked  # the countdown did run
            assert spoken == 0, spoken  # and nothing was read out meanwhile
            said = page.text_content("[aria-live]:not([aria-live='off'])") or ""
            assert said.startswith("Starts in"), said  # the state, said once
            # The hold's countdown, once reserved, likewise.
            held = create_live_sale(gw.base_url, stock=1, name="Spoken hold")
            page.goto(f"{gw.base_url}/sales/{held}#token={_token(gw, 'holder')}")
            join_and_reserve(page, gw, held)
            page.wait_for_selector("#result:has-text('held for')", timeout=15_000)
            page.evaluate(WATCH_LIVE_REGIONS, "result")
            page.wait_for_timeout(2_300)
            ticked, spoken = page.evaluate("[window.ticked, window.spoken]")
            assert ticked >= 2 and spoken == 0, (ticked, spoken)
        finally:
            browser.close()


def test_leaving_the_queue_asks_first_for_it_cannot_be_undone(
    stack: Settings, chromium: str
) -> None:
    """Leaving is final (a place given up is not given back), and one tap on "Leave the
    queue" gave it up at once: a slip of the thumb lost the buyer's place."""
    from playwright.sync_api import sync_playwright

    with live_gateway(stack) as gw, sync_playwright() as p:
        sale = create_live_sale(gw.base_url, stock=1, name="Kept drop")
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{gw.base_url}/sales/{sale}#token={_token(gw, 'thumb')}")
            page.wait_for_selector("#join:not([hidden])", timeout=15_000)
            page.click("#join")
            page.wait_for_selector("#state[data-state='waiting']", timeout=15_000)
            asked = answer_no_on_the_page(page, "#leave")
            assert "cannot" in asked, asked  # it says what leaving means
            page.wait_for_timeout(1_000)
            assert page.get_attribute("#state", "data-state") == "waiting"
            assert page.is_visible("#leave")
            page.click("#leave")
            page.wait_for_selector("#ask:not([hidden])", timeout=5_000)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "waiting-room-leave-asked.png"))
            page.click("#ask-yes")
            page.wait_for_selector("#state[data-state='left']", timeout=10_000)
        finally:
            browser.close()
