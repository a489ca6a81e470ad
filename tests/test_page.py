"""The waiting-room page in headless Chromium (Debian's, driven by Playwright): a buyer joins,
waits, is admitted and reserves; the test saves a screenshot of each stage."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import requests
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from allocator.hold_scripts import HoldScripts
from flashsale.cli.devstack.processes import UP_PORTS, free_port, free_ports
from flashsale.clients import redis_client
from flashsale.keys import SkuKeys
from flashsale.settings import Settings
from flashsale.tokens import Signer
from loadtest.processes import engine
from tests.harness import (
    ADMIN,
    SCREENSHOTS,
    LiveGateway,
    LivePage,
    accessibility_violations,
    answer_no_on_the_page,
    answer_yes_on_the_page,
    ask_proof_of_work,
    create_live_sale,
    hang_the_first,
    join_and_reserve,
    live_gateway,
    live_page,
    sale_spec,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Route

BUSY = '{"error": {"code": "overloaded", "message": "busy"}}'


def _buyer(gw: LiveGateway, buyer: str) -> str:
    """What a shop's link carries after ``#token=``: the buyer's pass, and the payment method
    the shop holds for them."""
    return f"{_pass(gw, buyer)}&payment=tok_visa"


def _pass(gw: LiveGateway, buyer: str) -> str:
    settings = gw.settings
    return Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer").sign(
        {"sub": buyer}, 3600
    )


def test_a_link_without_a_payment_method_takes_no_place(stack: Settings, browser: Browser) -> None:
    """A shop's link without `payment=` let the buyer queue, then reserved with a made-up
    payment method ("tok_demo") that only the simulator takes: at a real provider every
    such buyer's payment failed after their turn, and the unit was held for nothing."""
    with live_page(stack, browser, "Unpaid drop") as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_pass(gw, 'no-card')}")
        page.wait_for_selector("#state[data-state='no_payment']", timeout=15_000)
        assert "payment method" in (page.text_content("#detail") or "")
        assert page.is_hidden("#join")
        # The shop's next link, with the payment method, carries on.
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'no-card')}")
        page.reload()
        page.wait_for_selector("#join:not([hidden])", timeout=15_000)


def test_waiting_room_page_in_chromium(stack: Settings, browser: Browser) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, stock=3, name="Sneaker drop")
        token = _buyer(gw, "page-buyer")
        unknown = requests.get(f"{gw.base_url}/sales/no-such-sale", timeout=10)
        assert unknown.status_code == 404
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        page.goto(f"{gw.base_url}/sales/{sale}#token={token}")
        assert page.title().startswith("Sneaker drop")
        assert "#token" not in page.url  # the pass left the address bar
        page.wait_for_selector("#sku option", state="attached")  # sale info loaded
        assert "€" in (page.text_content(".price") or "")  # Intl currency format
        page.click("#join")
        page.wait_for_selector("#state[data-state='waiting'], #state[data-state='admitted']")
        page.screenshot(path=str(SCREENSHOTS / "waiting-room-queued.png"))
        assert "Position 1" in (page.text_content("#detail") or "") or (
            page.get_attribute("#state", "data-state") == "admitted"
        )
        gw.pump_forever(sale, ["S1"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        assert page.is_visible("#reserve")
        # The turn shows in the tab's title too: a buyer who waited in another tab sees it
        # in the tab strip.
        assert page.title().startswith("It's your turn! · Sneaker drop"), page.title()
        page.click("#reserve")
        page.wait_for_selector("#result[data-reservation]", timeout=20_000)
        # The text follows the reservation's first status read (slower under load).
        page.wait_for_selector("#result:has-text('Reserved')", timeout=20_000)
        assert page.is_visible("#cancel")
        assert page.title().startswith("Sneaker drop"), page.title()
        page.screenshot(path=str(SCREENSHOTS / "waiting-room-reserved.png"))
        rid = page.get_attribute("#result", "data-reservation")
        # A reload finds the reservation again, without a second join or reserve.
        page.reload()
        page.wait_for_selector("#result[data-outcome='held']", timeout=20_000)
        assert page.get_attribute("#result", "data-reservation") == rid
        assert not page.is_visible("#join")
        # Cancelling is final too (the turn bought once): asked first, and a No keeps it.
        asked = answer_no_on_the_page(page, "#cancel")
        assert "cannot" in asked, asked
        page.wait_for_timeout(1_000)
        assert page.get_attribute("#result", "data-outcome") == "held"
        answer_yes_on_the_page(page, "#cancel")
        page.wait_for_selector("#result[data-outcome='cancelled']", timeout=20_000)
        page.screenshot(path=str(SCREENSHOTS / "waiting-room-cancelled.png"))
        held = requests.get(
            f"{gw.base_url}/v1/reservations/{rid}",
            headers={"Authorization": f"Bearer {_pass(gw, 'page-buyer')}"},
            timeout=10,
        )
        assert held.status_code == 200 and held.json()["state"] == "RELEASED"
    assert (SCREENSHOTS / "waiting-room-reserved.png").stat().st_size > 1000


OUTSIDE_MAIN = """() => ({mains: document.querySelectorAll("main").length,
  outside: [...document.body.querySelectorAll("*")].filter((e) => !e.closest("main")
    && !["SCRIPT", "NOSCRIPT", "STYLE"].includes(e.tagName) && e.getClientRects().length
    && (e.textContent.trim() || e.tagName === "INPUT")).map((e) => e.id || e.tagName)})"""


def test_the_page_keeps_what_it_shows_in_its_main_landmark(
    stack: Settings, browser: Browser
) -> None:
    """A screen reader's user jumps to a page's main content: the waiting room had none (axe:
    landmark-one-main, region), so the status, the products and the turn were found only by
    reading the page from its top."""
    with _admitted_to_two_models(stack, browser, "landmarks", first_stock=3) as live:
        shown = live.page.evaluate(OUTSIDE_MAIN)
        assert shown == {"mains": 1, "outside": []}, shown
        live.page.click("#reserve")
        live.page.wait_for_selector("#result[data-reservation]", timeout=15_000)
        assert live.page.evaluate(OUTSIDE_MAIN) == {"mains": 1, "outside": []}


FOCUSED_ID = "() => document.activeElement === document.body ? 'BODY' : document.activeElement.id"


def test_the_page_meets_the_accessibility_rules_in_each_state(
    stack: Settings, browser: Browser
) -> None:
    """axe-core's rules (WCAG 2.x A and AA, its best practices) on each state a buyer sees:
    the page was checked by hand, once, and what a later change broke would have gone out."""
    spec = sale_spec("Checked drop", "S1", 1)
    spec["skus"].append({**spec["skus"][0], "sku": "S2", "title": "Model 2", "stock": 3})
    spec["skus"][0]["title"] = "Model 1"
    with live_page(stack, browser, "Checked drop", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'checked')}")
        page.wait_for_selector("#join:not([disabled])")
        broken = {"before joining": accessibility_violations(page)}
        page.click("#join")
        page.wait_for_selector("#state[data-state='waiting']", timeout=20_000)
        broken["in line"] = accessibility_violations(page)
        page.click("#leave")
        page.wait_for_selector("#ask:not([hidden])", timeout=5_000)
        broken["asked to confirm leaving"] = accessibility_violations(page)
        page.click("#ask-no")
        gw.pump_forever(sale, ["S1", "S2"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        broken["admitted"] = accessibility_violations(page)
        _reserve_as(gw, sale, "rival", "S1")  # the last Model 1
        page.select_option("#sku", "S1")
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Model 1 is sold out')", timeout=10_000)
        broken["refused: sold out"] = accessibility_violations(page)
        assert page.evaluate(FOCUSED_ID) == "reserve"  # the next try is from there
        page.select_option("#sku", "S2")
        page.click("#reserve")
        page.wait_for_selector("#result[data-reservation]", timeout=10_000)
        broken["reserved"] = accessibility_violations(page)
        page.goto(f"{gw.base_url}/sales/sale-nope")  # a page of its own, from the server
        assert "This sale does not exist" in page.inner_text("body")
        broken["a sale that does not exist"] = accessibility_violations(page)
        page.goto(f"{gw.base_url}/")  # the page of what the gateway serves
        broken["an address not served"] = accessibility_violations(page)
    assert not any(broken.values()), broken


def test_what_the_page_says_of_a_failed_step_is_read_out(stack: Settings, browser: Browser) -> None:
    """ "Could not join: try again in a moment", "Could not cancel" and the like were only
    shown, under the status: a screen reader's user pressed Join and heard nothing."""
    with live_page(stack, browser, "Said drop") as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.route("**/queue", lambda route: route.fulfill(
            status=503, headers={"Retry-After": "1"}, content_type="application/json",
            body=BUSY))  # fmt: skip
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'unheard')}")
        page.click("#join")
        page.wait_for_function("document.getElementById('note').textContent !== ''")
        live_region = page.evaluate(
            "document.getElementById('note').closest('[role=status], [role=alert], [aria-live]')"
            " !== null"
        )
        assert live_region, page.text_content("#note")


def test_a_keyboard_keeps_its_place_as_the_buttons_come_and_go(
    stack: Settings, browser: Browser
) -> None:
    """Join, once pressed, hides; so do Reserve once granted and Leave once left. The focus
    they had went with them to the page's top: a keyboard's user Tabbed from the start again,
    and a screen reader's was left on nothing. It goes to the status card, whose controls
    follow it; a question answered No gives it back to the button that asked."""
    with live_page(stack, browser, "Keyed drop") as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'keyed')}")
        page.wait_for_selector("#join:not([hidden])")
        page.focus("#join")
        page.keyboard.press("Enter")
        page.wait_for_selector("#state[data-state='waiting']", timeout=20_000)
        assert page.evaluate(FOCUSED_ID) == "status"
        # Said as two sentences: it was "You are in line Position 1, …", read on in one breath
        said = page.text_content("#announce") or ""
        assert said.startswith("You are in line. Position 1, "), said
        page.focus("#leave")
        page.keyboard.press("Enter")
        page.wait_for_selector("#ask:not([hidden])", timeout=5_000)
        assert page.evaluate(FOCUSED_ID) == "ask-no"
        page.keyboard.press("Enter")
        page.wait_for_selector("#ask", state="hidden", timeout=5_000)
        assert page.evaluate(FOCUSED_ID) == "leave"
        page.click("h1")  # a tap beside the controls: the focus on nothing, and left there
        gw.pump_forever(sale, ["S1"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        assert page.evaluate(FOCUSED_ID) == "BODY"
        page.focus("#status")
        page.keyboard.press("Tab")  # the turn's control comes next
        assert page.evaluate(FOCUSED_ID) == "reserve"
        page.keyboard.press("Enter")
        page.wait_for_selector("#result[data-reservation]", timeout=10_000)
        assert page.evaluate(FOCUSED_ID) == "status"
        # no workers here: the hold stays ACTIVE until cancelled; the button shows once the
        # reservation is read back, after the result is marked (a race on a loaded machine)
        page.wait_for_selector("#cancel:not([hidden])", timeout=10_000)
        page.focus("#cancel")
        page.keyboard.press("Enter")
        page.wait_for_selector("#ask:not([hidden])", timeout=5_000)
        page.keyboard.press("Shift+Tab")  # from "No, keep it" to "Yes, cancel it"
        assert page.evaluate(FOCUSED_ID) == "ask-yes"
        page.keyboard.press("Enter")
        page.wait_for_selector("#state[data-state='cancelled']", timeout=10_000)
        assert page.evaluate(FOCUSED_ID) == "status"


def test_the_page_rides_out_a_spike_and_resumes_after_a_reload(
    stack: Settings, browser: Browser
) -> None:
    """429 and 503 with Retry-After and a dropped connection, injected into the page's own
    requests: it keeps polling and gets its turn. A reload in the queue carries on."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    faults = ["503", "429", "drop", "503"]
    seen: list[str] = []

    def chaos(route: Route) -> None:
        if faults:
            fault = faults.pop(0)
            seen.append(fault)
            if fault == "drop":
                route.abort("connectionreset")
            else:
                route.fulfill(status=int(fault), headers={"Retry-After": "1"},
                              content_type="application/json", body=BUSY)  # fmt: skip
            return
        route.continue_()

    with live_page(stack, browser, "Busy drop") as live:
        gw, sale, page = live.gw, live.sale, live.page
        _in_line(live, "patient", chaos)
        page.screenshot(path=str(SCREENSHOTS / "waiting-room-retrying.png"))
        page.reload()  # the ticket is kept: no second join
        page.wait_for_selector("#state[data-state='waiting']", timeout=20_000)
        assert not page.is_visible("#join") and page.is_visible("#leave")
        gw.pump_forever(sale, ["S1"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "waiting-room-admitted.png"))
    assert seen == ["503", "429", "drop", "503"]


def test_a_request_that_hangs_is_given_up_and_sent_again(stack: Settings, browser: Browser) -> None:
    """A connection that answers nothing and is not reset (a mobile network that lost it, a
    proxy holding it): the page waited on its poll for as long as the browser keeps a request
    (minutes), showing nothing new. It gives a request up after 20 s and sends it again, as it
    does one whose connection dropped."""
    with live_page(stack, browser, "Hung line") as live:
        gw, sale, page = live.gw, live.sale, live.page
        held = hang_the_first(page, "**/queue/status")
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'on-a-train')}")
        page.click("#join")
        for _ in range(100):
            if held:
                break
            page.wait_for_timeout(100)
        assert held, "the page never polled"
        page.wait_for_timeout(500)
        assert page.get_attribute("#state", "data-state") == "live"  # still waiting on the poll
        page.clock.fast_forward(21_000)
        page.wait_for_selector("#state[data-state='waiting']", timeout=10_000)


def test_the_page_joins_again_when_its_ticket_has_expired(
    stack: Settings, browser: Browser
) -> None:
    """A ticket refused as expired (kept in a closed tab past its sale's old end, the sale since
    moved later): the page joins again with the buyer's token, which gives the same place,
    instead of telling the buyer their place is gone."""

    refused: list[str] = []
    joins: list[str] = []

    def expired_once(route: Route) -> None:
        if not refused:
            refused.append(route.request.headers.get("x-queue-ticket", ""))
            route.fulfill(
                status=401,
                content_type="application/json",
                body='{"error": {"code": "invalid_token", "message": "token expired"}}',
            )
            return
        route.continue_()

    def count_joins(route: Route) -> None:
        if route.request.method == "POST":
            joins.append(route.request.url)
        route.continue_()

    with live_page(stack, browser, "Moved drop") as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.route("**/queue/status", expired_once)
        page.route("**/queue", count_joins)
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'returning')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='waiting']", timeout=20_000)
        assert "Position 1" in (page.text_content("#detail") or "")
        gw.pump_forever(sale, ["S1"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=30_000)
    assert len(refused) == 1 and refused[0] and len(joins) == 2


def test_a_sale_starting_another_day_says_when_in_the_buyers_time(
    stack: Settings, browser: Browser
) -> None:
    """Two days ahead the page said only "Starts in 48 h 0 min": a buyer planning their day
    had to work the date out. It says the day and the hour, in the buyer's time zone."""
    with live_gateway(stack) as gw:
        spec = sale_spec("Later drop", "S1", 1, starts_in=2 * 86400)
        spec["ends_at"] = (datetime.now(UTC) + timedelta(days=2, hours=1)).isoformat()
        sale = create_live_sale(gw.base_url, spec=spec)
        starts = datetime.fromisoformat(requests.get(f"{gw.base_url}/v1/sales/{sale}",
                                                     timeout=10).json()["starts_at"])  # fmt: skip
        berlin = starts.astimezone(ZoneInfo("Europe/Berlin"))
        page = browser.new_page(timezone_id="Europe/Berlin", locale="en-GB")
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'planner')}")
        page.wait_for_selector("#state[data-state='scheduled']", timeout=15_000)
        detail = page.text_content("#detail") or ""
        assert f"{berlin:%H:%M}" in detail and str(berlin.day) in detail, (detail, berlin)
        # ... and counts down in days and hours: "Starts in 47 h 59 min" was to be divided
        heading = page.text_content("#state") or ""
        assert re.fullmatch(r"Starts in (1 day 23 h|2 days 0 h)", heading), heading
        # Without a pass (a link passed on, a bookmark): sent to the shop, and told when
        # it opens; it was told nothing of when.
        visitor = browser.new_page(timezone_id="Europe/Berlin", locale="en-GB")
        visitor.goto(f"{gw.base_url}/sales/{sale}")
        visitor.wait_for_selector("#state[data-state='no_pass']", timeout=15_000)
        detail = visitor.text_content("#detail") or ""
        assert f"{berlin:%H:%M}" in detail and str(berlin.day) in detail, (detail, berlin)


def test_the_page_counts_down_by_the_servers_clock(stack: Settings, browser: Browser) -> None:
    """A phone whose clock is ten minutes slow: the countdown to the start and the hold's
    countdown follow the server's clock (its answers' Date header), not the phone's; at zero
    the page says the sale is open."""
    slow_ms = 600_000
    with live_page(stack, browser, "Clock drop", starts_in=3.0) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.clock.install(time=time.time() - slow_ms / 1000)
        page.clock.resume()  # the phone's clock runs, ten minutes behind
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'slow-phone')}")
        page.wait_for_selector("#state[data-state='scheduled']")
        shown = page.text_content("#state") or ""
        assert shown.startswith("Starts in 0:"), shown  # not "Starts in 10:…"
        page.wait_for_selector("#state[data-state='live']", timeout=20_000)
        join_and_reserve(page, gw, sale, admitted_ms=30_000)
        page.wait_for_selector("#result:has-text('held for')", timeout=20_000)
        held = page.text_content("#result") or ""
        assert "held for 1:" in held or "held for 2:00" in held, held  # a 120 s hold


def test_a_page_counting_down_to_a_postponed_start_reads_the_new_one(
    stack: Settings, browser: Browser
) -> None:
    """The drop is postponed by an hour, and its price changed, while a buyer's page counts
    down to the old start: at that moment the page reads the sale again, counts down to the
    new start rather than saying the sale is open, and shows the price that will be charged."""
    with live_page(stack, browser, "Postponed drop", starts_in=4.0) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'patient')}")
        page.wait_for_selector("#state[data-state='scheduled']")
        later = datetime.now(UTC) + timedelta(hours=1)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        moved = requests.patch(f"{gw.base_url}/admin/v1/sales/{sale}", headers=admin,
                               json={"starts_at": later.isoformat()}, timeout=10)  # fmt: skip
        assert moved.status_code == 200, moved.text
        priced = requests.patch(f"{gw.base_url}/admin/v1/sales/{sale}/skus/S1", headers=admin,
                                json={"price": 15900}, timeout=10)  # fmt: skip
        assert priced.status_code == 200, priced.text
        assert "129.00" in (page.text_content(".price") or "")  # as read at first
        time.sleep(5)  # past the old start
        shown = page.text_content("#state") or ""
        assert page.get_attribute("#state", "data-state") == "scheduled", shown
        assert shown.startswith(("Starts in 59:", "Starts in 1 h 0 min")), shown
        assert "159.00" in (page.text_content(".price") or "")
        assert page.locator("#sku option").count() == 1


def test_a_long_wait_is_told_in_minutes_and_hours(stack: Settings, browser: Browser) -> None:
    """A buyer registered 90 minutes before the start was told "about 5400 s (at most 5400 s, 9
    times in 10)": a wait is said as a person would, in minutes, or hours and minutes, and its
    "at most" only when it says more."""
    spec = sale_spec("Early drop", "S1", 3, starts_in=90 * 60)
    spec["ends_at"] = (datetime.now(UTC) + timedelta(hours=3)).isoformat()
    with live_page(stack, browser, "Early drop", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'very-early')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='registered']", timeout=10_000)
        detail = page.text_content("#detail") or ""
        assert detail.endswith(" · about 1 h 30 min."), detail  # as likely as at most
        # Told to keep the page open for the hour and a half: the turn cannot come before
        # the start, and a page closed and opened again finds the buyer still registered.
        assert page.text_content("#turn") == (
            "Your turn will last 60 s and may come as soon as the sale starts: have this page "
            "open then. Closing it until then keeps your registration."
        )
        # Nor is Leave offered before the draw: it was, asked "Leave the queue? Your place is
        # given up for good", and a Yes was refused (409 not_placed_yet).
        assert page.is_hidden("#leave")
        kept, link = page.context.storage_state(), page.url
        page.close()  # and opened again later in the same browser, which kept the site's data
        context = browser.new_context(storage_state=kept)
        try:
            again = context.new_page()
            again.goto(link)
            again.wait_for_selector("#state[data-state='registered']", timeout=10_000)
            assert again.is_hidden("#join")  # no second registration asked
        finally:
            context.close()


def test_a_place_far_back_is_written_as_a_number_is_read(stack: Settings, browser: Browser) -> None:
    """Behind 1,234 buyers the page said "Position 1235, 1234 ahead of you": the numbers are
    written in the buyer's locale, as the page's prices and counts are."""
    import aiohttp

    with live_page(stack, browser, "Crowded drop", stock=5_000) as live:
        gw, sale, page = live.gw, live.sale, live.page

        async def crowd() -> list[int]:
            async with aiohttp.ClientSession() as http:

                async def join(n: int) -> int:
                    headers = {"Authorization": f"Bearer {_pass(gw, f'crowd-{n}')}"}
                    async with http.post(f"{gw.base_url}/v1/sales/{sale}/queue",
                                         headers=headers) as answer:  # fmt: skip
                        return answer.status

                return await asyncio.gather(*(join(n) for n in range(1_234)))

        assert set(gw.run(crowd(), timeout=60)) == {200}
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'at-the-back')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='waiting']", timeout=10_000)
        detail = page.text_content("#detail") or ""
        assert detail.startswith("Position 1,235, 1,234 ahead of you"), detail


def _in_line(live: LivePage, buyer: str, status: Callable[[Route], None]) -> None:
    """Open ``live``'s page as ``buyer``, its status polls answered by ``status``, and join:
    back once the page says the buyer is in line."""
    live.page.route("**/queue/status", status)
    live.page.goto(f"{live.gw.base_url}/sales/{live.sale}#token={_buyer(live.gw, buyer)}")
    live.page.click("#join")
    live.page.wait_for_selector("#state[data-state='waiting']", timeout=20_000)


def test_the_front_of_the_line_is_told_its_turn_is_coming_not_about_0_s(
    stack: Settings, browser: Browser
) -> None:
    """First in line, the page said "Position 2, 0 ahead of you · about 0 s (at most 1 s, 9
    times in 10)": nobody is ahead, and the turn is due any moment now."""
    near = {"state": "waiting", "position": 2, "ahead": 0, "retry_after_ms": 60_000,
            "eta_seconds": {"p50": 0.3, "p90": 1.2}}  # fmt: skip

    def at_the_front(route: Route) -> None:
        route.fulfill(status=200, content_type="application/json", body=json.dumps(near))

    with live_page(stack, browser, "Front drop") as live:
        _in_line(live, "front", at_the_front)
        detail = live.page.text_content("#detail") or ""
        assert detail == (
            "Position 2, nobody ahead of you · any moment now (at most 1 s, 9 times in 10)"
        ), detail


def test_a_buyer_asking_for_more_than_is_left_is_offered_what_is(
    stack: Settings, browser: Browser
) -> None:
    """Two per buyer and one unit left: a buyer asking for two was told "This product is sold
    out." and the product was marked sold out, while its last unit waited for them."""
    spec = sale_spec("Last pair", "S1", 1, limit=2)
    with live_page(stack, browser, "Last pair", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        gw.pump_forever(sale, ["S1"])
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'wants-two')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        page.fill("#qty", "2")
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Only 1 left')", timeout=10_000)
        assert page.input_value("#qty") == "1"
        assert "sold out" not in page.inner_text("body").lower()
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Reserved')", timeout=10_000)


def test_a_buyer_registered_early_sees_the_price_charged_when_admitted(
    stack: Settings, browser: Browser
) -> None:
    """A buyer registers for the draw, then the merchandiser changes the price before the start
    (the last moment it may change): once admitted, the page shows the price to be charged,
    not the one it read when it opened."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with live_page(stack, browser, "Repriced drop", starts_in=4.0) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'early-bird')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='registered']", timeout=10_000)
        priced = requests.patch(f"{gw.base_url}/admin/v1/sales/{sale}/skus/S1", headers=admin,
                                json={"price": 15900}, timeout=10)  # fmt: skip
        assert priced.status_code == 200, priced.text
        gw.pump_forever(sale, ["S1"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        assert page.is_visible("#leave")  # placed by the draw: the place can be given up
        page.wait_for_selector(".price:has-text('159.00')", timeout=5_000)
        assert page.locator("#sku option").count() == 1 and page.is_visible("#reserve")


def test_a_pass_from_the_shop_that_expired_is_explained_and_a_new_one_carries_on(
    stack: Settings, browser: Browser
) -> None:
    """The buyer's token from the storefront expires while they wait: the page says to open it
    again from the shop (not "invalid token (expired)"), and with a new link the buyer keeps
    their place and reserves."""
    signer = Signer.from_setting(stack.buyer_token_secret.reveal(), "buyer")
    with live_page(stack, browser, "Slow drop") as live:
        gw, sale, page = live.gw, live.sale, live.page
        card = "&payment=tok_visa"
        page.goto(f"{gw.base_url}/sales/{sale}#token={signer.sign({'sub': 'slow'}, 2)}{card}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='waiting']", timeout=10_000)
        time.sleep(2.5)  # the pass expires while the buyer waits
        gw.pump_forever(sale, ["S1"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('from the shop')", timeout=10_000)
        assert "invalid token" not in (page.text_content("#result") or "")
        page.goto("about:blank")  # back to the shop, whose link opens the page anew
        page.goto(f"{gw.base_url}/sales/{sale}#token={signer.sign({'sub': 'slow'}, 600)}{card}")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Reserved')", timeout=20_000)


def test_two_buyers_on_one_browser_each_see_their_own_place(
    stack: Settings, browser: Browser
) -> None:
    """A family computer: one buyer reserved, then another opened the shop's link on the same
    browser. The page kept its place per sale, not per buyer: the second buyer was shown the
    first one's order, could cancel it, and would have paid with the first one's card (their
    link carried none). Each buyer now has a place of their own on the page; the second one's
    pass is a storefront's JWT, which names its buyer where the engine's own token does."""
    import jwt

    child = jwt.encode({"sub": "child", "exp": int(time.time()) + 600},
                       stack.buyer_token_secret.reveal(), algorithm="HS256")  # fmt: skip
    with live_page(stack, browser, "Family drop", stock=5) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'parent')}")
        join_and_reserve(page, gw, sale)
        page.wait_for_selector("#result:has-text('Reserved')", timeout=20_000)
        page.goto("about:blank")
        page.goto(f"{gw.base_url}/sales/{sale}#token={child}")  # no card in it
        page.wait_for_selector("#state[data-state='no_payment']", timeout=15_000)
        assert page.is_hidden("#cancel") and "Reserved" not in page.inner_text("body")
        page.goto("about:blank")
        page.goto(f"{gw.base_url}/sales/{sale}#token={child}&payment=tok_visa")
        page.wait_for_selector("#join:not([hidden])", timeout=15_000)
        page.click("#join")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Reserved')", timeout=20_000)
        page.goto("about:blank")
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'parent')}")
        page.wait_for_selector("#result:has-text('Reserved')", timeout=15_000)
        kept = page.evaluate("Object.keys(localStorage)")
        assert f"flashsale:{sale}:buyer:child:ticket" in kept, kept  # the JWT's sub
        admin = {"Authorization": f"Bearer {ADMIN}"}
        skus = requests.get(f"{gw.base_url}/admin/v1/sales/{sale}", headers=admin, timeout=10)
        assert skus.json()["skus"][0]["available"] == 3, skus.text  # two holds, one each


def test_a_place_kept_per_sale_by_an_older_page_is_its_buyers(
    stack: Settings, browser: Browser
) -> None:
    """A buyer whose page was served before places were kept per buyer reloads it after the
    gateway was upgraded: their reservation, kept under the sale alone, is still shown to
    them, and to nobody else."""
    with live_page(stack, browser, "Upgraded drop", stock=5) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'before')}")
        join_and_reserve(page, gw, sale)
        page.wait_for_selector("#result:has-text('Reserved')", timeout=20_000)
        moved = page.evaluate("""(sale) => {
            const mine = `flashsale:${sale}:buyer:before:`;
            let n = 0;
            for (const k of Object.keys(localStorage).filter((k) => k.startsWith(mine))) {
              localStorage.setItem(`flashsale:${sale}:${k.slice(mine.length)}`,
                                   localStorage.getItem(k));
              localStorage.removeItem(k);
              n += 1;
            }
            return n;
        }""", sale)  # fmt: skip
        assert moved >= 2, moved  # at least the ticket and the reservation
        page.reload()
        page.wait_for_selector("#result:has-text('Reserved')", timeout=15_000)
        page.goto("about:blank")
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'after')}")
        page.wait_for_selector("#join:not([hidden])", timeout=15_000)
        assert "Reserved" not in page.inner_text("body")


def test_an_admitted_buyer_is_told_the_sale_is_paused_and_keeps_the_turn(
    stack: Settings, browser: Browser
) -> None:
    """The merchandiser pauses the sale while a buyer's turn is on: the page says the sale is
    paused and the turn is kept, offers no Reserve meanwhile, and after the resume the buyer
    reserves."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with live_page(stack, browser, "Paused drop") as live:
        gw, sale, page = live.gw, live.sale, live.page
        gw.pump_forever(sale, ["S1"])
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'paused-buyer')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        assert page.is_visible("#reserve")
        paused = requests.post(f"{gw.base_url}/admin/v1/sales/{sale}/pause", headers=admin,
                               timeout=10)  # fmt: skip
        assert paused.status_code == 200, paused.text
        page.wait_for_selector("#detail:has-text('paused')", timeout=10_000)
        assert not page.is_visible("#reserve")
        page.screenshot(path=str(SCREENSHOTS / "waiting-room-paused.png"))
        resumed = requests.post(f"{gw.base_url}/admin/v1/sales/{sale}/resume", headers=admin,
                                timeout=10)  # fmt: skip
        assert resumed.status_code == 200, resumed.text
        page.wait_for_selector("#reserve", state="visible", timeout=10_000)
        assert "paused" not in (page.text_content("#detail") or "")
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Reserved')", timeout=20_000)


def test_a_page_opened_while_the_sale_is_paused_says_so(stack: Settings, browser: Browser) -> None:
    """Opened during a pause, the page said "The sale is open: join the queue to get your
    turn", and the buyer who joined learned of the pause only from their place in line."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with live_page(stack, browser, "Paused early") as live:
        gw, sale, page = live.gw, live.sale, live.page
        paused = requests.post(f"{gw.base_url}/admin/v1/sales/{sale}/pause", headers=admin,
                               timeout=10)  # fmt: skip
        assert paused.status_code == 200, paused.text
        _as_buyers_read_it(gw, sale, "paused")
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'early-in-pause')}")
        page.wait_for_selector("#state[data-state='paused']", timeout=10_000)
        assert "paused" in (page.text_content("#state") or "")
        assert "keep" in (page.text_content("#detail") or ""), page.text_content("#detail")
        page.click("#join")  # a place may be taken meanwhile
        page.wait_for_selector("#detail:has-text('Position 1')", timeout=10_000)


def test_a_join_after_the_sale_ended_says_it_ended(stack: Settings, browser: Browser) -> None:
    """The page was open when the sale ended: Join answered "sale … has ended" in small
    print under "The sale is open", with the Join button still offered."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with live_page(stack, browser, "Ended meanwhile") as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'too-late')}")
        page.wait_for_selector("#state[data-state='live']", timeout=10_000)
        ended = requests.post(f"{gw.base_url}/admin/v1/sales/{sale}/end", headers=admin,
                              timeout=10)  # fmt: skip
        assert ended.status_code == 200, ended.text
        page.click("#join")
        page.wait_for_selector("#state[data-state='ended']", timeout=10_000)
        assert page.is_hidden("#join")


def _as_buyers_read_it(gw: LiveGateway, sale: str, state: str) -> None:
    """Wait until the sale as buyers read it (a copy of 0.5 s or more) is in ``state``."""
    deadline = time.monotonic() + 15
    while requests.get(f"{gw.base_url}/v1/sales/{sale}", timeout=10).json()["state"] != state:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)


def _read_again_until(page: Any, selector: str) -> None:
    """Move the page's clock past its next timed step (a reading of the sale, a join tried
    again) until ``selector`` shows: a reading the browser answers from its cache (the sale's
    copy may be kept a second, and this test's seconds go by in a moment) is followed by
    another."""
    for _ in range(5):
        page.clock.fast_forward(13_000)
        with contextlib.suppress(PlaywrightTimeout):
            page.wait_for_selector(selector, timeout=1_500)
            return
    raise AssertionError(f"{selector} not shown: {page.inner_text('#state')}")


def test_a_page_not_in_line_yet_learns_of_a_pause_a_resume_and_the_end(
    stack: Settings, browser: Browser
) -> None:
    """Open and not joined yet, the page learned nothing of the sale after its first read: it
    said "The sale is open" through a pause, and offered Join long after the sale had ended.
    It reads the sale again about every 10 s while it offers Join."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with live_page(stack, browser, "Watched drop") as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.clock.install()
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'looking')}")
        page.wait_for_selector("#state[data-state='live']", timeout=10_000)
        for action, state, shown in (("pause", "paused", "paused"), ("resume", "live", "live"),
                                     ("end", "ended", "ended")):  # fmt: skip
            done = requests.post(f"{gw.base_url}/admin/v1/sales/{sale}/{action}",
                                 headers=admin, timeout=10)  # fmt: skip
            assert done.status_code == 200, done.text
            _as_buyers_read_it(gw, sale, state)
            _read_again_until(page, f"#state[data-state='{shown}']")
        assert page.is_hidden("#join")


def test_a_page_counting_down_to_a_sale_called_off_says_it_ended_and_stays_so(
    stack: Settings, browser: Browser
) -> None:
    """The countdown to the start went on rewriting the card each second, "Starts in 9:58",
    over the news that the sale had ended before it opened."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with live_page(stack, browser, "Called off later", starts_in=600) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.clock.install()
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'counting-down')}")
        page.wait_for_selector("#state[data-state='scheduled']", timeout=10_000)
        ended = requests.post(f"{gw.base_url}/admin/v1/sales/{sale}/end", headers=admin,
                              timeout=10)  # fmt: skip
        assert ended.status_code == 200, ended.text
        _as_buyers_read_it(gw, sale, "ended")
        _read_again_until(page, "#state[data-state='ended']")
        page.clock.run_for(3_000)  # three ticks of the countdown
        assert page.get_attribute("#state", "data-state") == "ended", page.inner_text("#state")
        assert page.is_hidden("#join")


def test_a_visitor_without_a_pass_is_told_when_the_sale_has_opened(
    stack: Settings, browser: Browser
) -> None:
    """Opened without a pass (a link passed on), the page said "The sale opens 05:11" and
    went on saying it after 05:11: it read the sale once. It says the sale is open now."""
    with live_page(stack, browser, "Opening soon", starts_in=6) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.clock.install()
        page.goto(f"{gw.base_url}/sales/{sale}")
        page.wait_for_selector("#state[data-state='no_pass']", timeout=10_000)
        assert "opens" in (page.text_content("#detail") or ""), page.text_content("#detail")
        _as_buyers_read_it(gw, sale, "live")
        _read_again_until(page, "#detail:has-text('The sale is open')")
        assert page.get_attribute("#state", "data-state") == "no_pass" and page.is_hidden("#join")


def _reserve_as(gw: LiveGateway, sale: str, buyer: str, sku: str) -> str:
    """``buyer`` joins, waits for admission and reserves ``sku``, over HTTP: the reservation's
    id."""
    auth = {"Authorization": f"Bearer {_pass(gw, buyer)}"}
    ticket = requests.post(f"{gw.base_url}/v1/sales/{sale}/queue", headers=auth,
                           timeout=10).json()["ticket"]  # fmt: skip
    deadline = time.monotonic() + 20
    while "admission_token" not in (status := requests.get(
        f"{gw.base_url}/v1/sales/{sale}/queue/status", headers={"X-Queue-Ticket": ticket},
        timeout=10,
    ).json()):  # fmt: skip
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    reserved = requests.post(
        f"{gw.base_url}/v1/sales/{sale}/reservations", timeout=10,
        headers={**auth, "X-Admission-Token": status["admission_token"], "Idempotency-Key": "k"},
        json={"sku": sku, "quantity": 1, "payment_token": "tok_visa"},
    )  # fmt: skip
    assert reserved.status_code == 201, reserved.text
    return str(reserved.json()["reservation_id"])


@contextlib.contextmanager
def _admitted_to_two_models(
    stack: Settings, browser: Browser, buyer: str, *, first_stock: int
) -> Iterator[LivePage]:
    """A running sale of Model 1 (``first_stock`` units, S1) and Model 2 (3 units, S2), and
    ``buyer``'s page on it, admitted."""
    spec = sale_spec("Two-model drop", "S1", first_stock)
    spec["skus"].append({**spec["skus"][0], "sku": "S2", "title": "Model 2", "stock": 3})
    spec["skus"][0]["title"] = "Model 1"
    with live_page(stack, browser, "Two-model drop", spec=spec) as live:
        live.gw.pump_forever(live.sale, ["S1", "S2"])
        live.page.goto(f"{live.gw.base_url}/sales/{live.sale}#token={_buyer(live.gw, buyer)}")
        live.page.click("#join")
        live.page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        yield live


def test_a_buyer_whose_product_sold_out_takes_another_in_the_same_turn(
    stack: Settings, browser: Browser
) -> None:
    """The product a buyer chose sells out as their turn comes: the page says so and the buyer
    reserves another product. The refusal used to spend the admission (403 admission_used),
    and the page sent the next try with the refused request's key (422)."""
    with _admitted_to_two_models(stack, browser, "second-choice", first_stock=1) as live:
        gw, sale, page = live.gw, live.sale, live.page
        assert page.is_hidden("#find")  # two products need no search field
        _reserve_as(gw, sale, "rival", "S1")  # the last Model 1 goes to another buyer
        page.select_option("#sku", "S1")
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Model 1 is sold out')", timeout=10_000)
        assert "may come back" in (page.text_content("#result") or "")  # the rival's hold
        page.select_option("#sku", "S2")
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Reserved')", timeout=10_000)


def test_a_product_sold_out_for_good_is_marked_and_cannot_be_chosen(
    stack: Settings, browser: Browser
) -> None:
    """A sale of two products, one of them sold for good: the page listed it as any other,
    offered it first and let the buyer reserve it, to be told it was sold out."""
    with _admitted_to_two_models(stack, browser, "late", first_stock=1) as live:
        gw, sale, page = live.gw, live.sale, live.page
        assert page.input_value("#sku") == "S1"  # the page read both products in stock
        sold = _reserve_as(gw, sale, "rival", "S1")
        with ThreadPoolExecutor(1) as thread:  # asyncio.run cannot run on Playwright's thread
            thread.submit(asyncio.run, _sell(stack, sale, sold)).result()
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Model 1 is sold out: choose')", timeout=10_000)
        assert page.is_disabled("#sku option[value='S1']")  # and marked so in the list
        assert page.input_value("#sku") == "S2"
        assert "Sold out" in (page.text_content(".item.sold-out") or "")
        newcomer = page.context.browser.new_page()  # opened after: marked from the start
        newcomer.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'newcomer')}")
        newcomer.wait_for_selector("#sku option[value='S1'][disabled]", state="attached")
        assert newcomer.input_value("#sku") == "S2"
        assert "Model 1" in (newcomer.text_content(".item.sold-out") or "")
        newcomer.screenshot(path=str(SCREENSHOTS / "waiting-room-one-product-sold-out.png"))
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Reserved')", timeout=10_000)


def test_a_buyer_who_left_on_another_device_is_told_so_when_reserving(
    stack: Settings, browser: Browser
) -> None:
    """The buyer gave the place up on their phone; the laptop's page, admitted, reserved and
    was told "this admission was already used for another request": nobody had used it."""
    with _admitted_to_two_models(stack, browser, "two-devices", first_stock=1) as live:
        gw, sale, page = live.gw, live.sale, live.page
        ticket = page.evaluate(f"localStorage.getItem('flashsale:{sale}:buyer:two-devices:ticket')")
        phone = requests.delete(f"{gw.base_url}/v1/sales/{sale}/queue", timeout=10,
                                headers={"X-Queue-Ticket": ticket})  # fmt: skip
        assert phone.json()["state"] == "left", phone.text
        page.click("#reserve")
        page.wait_for_selector("#state[data-state='left']", timeout=10_000)
        assert "another device" in (page.text_content("#detail") or "")
        assert page.is_hidden("#reserve") and page.is_hidden("#leave")
        time.sleep(1.0)  # the page polls every 250 ms while admitted: it no longer does
        assert page.get_attribute("#state", "data-state") == "left"


def test_a_buyer_who_reserved_on_another_device_is_told_so_when_reserving(
    stack: Settings, browser: Browser
) -> None:
    """The buyer reserved on their phone; the laptop's page, still showing the turn, reserved
    and was told "this admission was already used for another request" under "It's your
    turn!", with Reserve still offered, for as long as the turn lasted."""
    with _admitted_to_two_models(stack, browser, "phone-buyer", first_stock=3) as live:
        gw, sale, page = live.gw, live.sale, live.page
        _reserve_as(gw, sale, "phone-buyer", "S2")  # the same place: a join again finds it
        page.click("#reserve")
        _told_reserved_elsewhere(page)


def test_a_buyer_who_reserved_on_another_device_is_told_so_when_leaving(
    stack: Settings, browser: Browser
) -> None:
    """The same, leaving on the laptop: the page said "this place was already used for a
    reservation: cancel that instead" beside a turn it went on offering."""
    with _admitted_to_two_models(stack, browser, "phone-leaver", first_stock=3) as live:
        gw, sale, page = live.gw, live.sale, live.page
        _reserve_as(gw, sale, "phone-leaver", "S2")
        answer_yes_on_the_page(page, "#leave")
        _told_reserved_elsewhere(page)


def _told_reserved_elsewhere(page: Any) -> None:
    page.wait_for_selector("#state[data-state='reserved']", timeout=10_000)
    assert "another device" in (page.text_content("#detail") or "")
    assert page.is_hidden("#reserve") and page.is_hidden("#leave")
    time.sleep(1.0)  # the page polls every 250 ms while admitted: it no longer does
    assert page.get_attribute("#state", "data-state") == "reserved"


def test_a_join_refused_before_the_start_is_said_and_not_overwritten_by_the_countdown(
    stack: Settings, browser: Browser
) -> None:
    """The shop's link went out before the sale was preloaded: "Register for the draw" was
    refused (409 sale_not_open) and the page said so in the state card, which the countdown
    rewrote within the second: the button seemed to do nothing. Preloaded a little later,
    the buyer had to think of clicking again: the page tries again by itself."""
    with live_page(stack, browser, "Early link", starts_in=60, preload=False) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.clock.install()
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'early-bird')}")
        page.wait_for_selector("#state[data-state='scheduled']", timeout=15_000)
        page.click("#join")
        page.wait_for_selector("#note:has-text('Registration has not opened yet')",
                               timeout=5_000)  # fmt: skip
        page.wait_for_timeout(1_200)  # a tick of the countdown: the refusal stays said
        assert "not opened yet" in (page.text_content("#note") or "")
        assert page.is_visible("#join")
        admin = {"Authorization": f"Bearer {ADMIN}"}
        loaded = requests.post(f"{gw.base_url}/admin/v1/sales/{sale}/preload", headers=admin,
                               timeout=10)  # fmt: skip
        assert loaded.status_code == 200, loaded.text
        _read_again_until(page, "#state[data-state='registered']")  # no second click
        assert not page.text_content("#note"), page.text_content("#note")


def test_a_proof_of_work_asked_after_the_page_was_opened_is_solved(
    stack: Settings, browser: Browser
) -> None:
    """The merchandiser turned the sale's proof of work on (`sale update SALE --challenge 4`)
    while buyers had its page open: the page had read the sale without one, so "Register for
    the draw" was refused (403 challenge_required) and the page said "Something went wrong".
    It now solves one when the join asks for it, as it does for a spent challenge."""
    with live_page(stack, browser, "Guarded since", starts_in=60) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'opened-early')}")
        page.wait_for_selector("#state[data-state='scheduled']", timeout=15_000)
        ask_proof_of_work(gw.base_url, sale, 4)
        page.click("#join")
        page.wait_for_selector("#state[data-state='registered']", timeout=10_000)
        assert not page.text_content("#note"), page.text_content("#note")


def test_a_buyer_turned_away_by_a_full_waiting_room_is_told_so_and_gets_in_once_it_has_room(
    stack: Settings, browser: Browser
) -> None:
    """A waiting room at its cap turns newcomers away (503 queue_full): the page said "The
    shop is very busy; retrying…", as of a slow shop, to a buyer who had no place at all. It
    says the room is full and keeps trying, and joins once the operator raises the cap (at
    the answer's Retry-After, 5 s: the test moves the page's clock on)."""
    spec = {**sale_spec("Full room", "S1", 3), "max_queue": 1}
    with live_page(stack, browser, "Full room", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        first_in = {"Authorization": f"Bearer {_pass(gw, 'first-in')}"}
        first = requests.post(f"{gw.base_url}/v1/sales/{sale}/queue", headers=first_in, timeout=10)
        assert first.status_code == 200, first.text
        page.clock.install()
        page.clock.resume()
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'turned-away')}")
        page.wait_for_selector("#state[data-state='live']", timeout=15_000)
        page.click("#join")
        page.wait_for_selector("#note:has-text('The waiting room is full for now')",
                               timeout=10_000)  # fmt: skip
        admin = {"Authorization": f"Bearer {ADMIN}"}
        raised = requests.patch(f"{gw.base_url}/admin/v1/sales/{sale}", json={"max_queue": 2},
                                headers=admin, timeout=10)  # fmt: skip
        assert raised.status_code == 200, raised.text
        page.clock.fast_forward(7_000)  # past the Retry-After, jitter included
        page.wait_for_selector("#state[data-state='waiting']", timeout=15_000)
        assert not page.text_content("#note"), page.text_content("#note")


def test_a_join_refused_by_an_open_sale_not_preloaded_is_not_called_early(
    stack: Settings, browser: Browser
) -> None:
    """The page said "Registration has not opened yet" of a sale it showed as open."""
    with live_page(stack, browser, "Open, not ready", preload=False) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'on-time')}")
        page.wait_for_selector("#state[data-state='live']", timeout=15_000)
        page.click("#join")
        page.wait_for_selector("#note:has-text('The waiting room is not ready yet')",
                               timeout=5_000)  # fmt: skip


def test_a_buyer_waiting_when_the_sale_is_ended_is_told_it_ended(
    stack: Settings, browser: Browser
) -> None:
    """The merchandiser ends the sale while buyers still wait in line: the page told them
    "Your turn has passed", though their turn never came."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with live_page(stack, browser, "Cut-short drop") as live:
        gw, sale, page = live.gw, live.sale, live.page  # no pump: the buyer waits
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'still-waiting')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='waiting']", timeout=10_000)
        ended = requests.post(f"{gw.base_url}/admin/v1/sales/{sale}/end", headers=admin,
                              timeout=10)  # fmt: skip
        assert ended.status_code == 200, ended.text
        page.wait_for_selector("#state[data-state='ended']", timeout=20_000)
        assert page.text_content("#state") == "This sale has ended"


def test_a_product_taken_out_of_the_sale_leaves_the_list_and_another_is_reserved(
    stack: Settings, browser: Browser
) -> None:
    """The merchandiser takes a product nobody reserved out of a running sale while a buyer
    has it chosen: Reserve answered "unknown SKU 'S2' in sale sale-…" and kept offering it."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with _admitted_to_two_models(stack, browser, "recalled", first_stock=3) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.select_option("#sku", "S2")
        gone = requests.delete(f"{gw.base_url}/admin/v1/sales/{sale}/skus/S2", headers=admin,
                               timeout=10)  # fmt: skip
        assert gone.status_code == 200, gone.text
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('no longer in this sale')", timeout=10_000)
        options = page.eval_on_selector_all("#sku option", "os => os.map(o => o.value)")
        assert options == ["S1"], options
        page.click("#reserve")
        page.wait_for_selector("#result:has-text('Reserved')", timeout=10_000)


def test_a_buyer_behind_units_all_held_is_told_why_there_is_no_eta(
    stack: Settings, browser: Browser
) -> None:
    """Every unit left is held by another buyer: the page said "Sold out, everything is gone"
    and offered no join, though the unit may come back; once in line, it showed the place
    and no ETA, without saying why."""
    with live_page(stack, browser, "Held drop", stock=1) as live:
        gw, sale, page = live.gw, live.sale, live.page
        gw.pump_forever(sale, ["S1"])
        _reserve_as(gw, sale, "holder", "S1")
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'behind')}")
        page.click("#join")
        page.wait_for_selector("#detail:has-text('held by buyers ahead')", timeout=10_000)
        assert page.get_attribute("#state", "data-state") == "waiting"


def test_a_page_for_one_product_reads_that_product_only(stack: Settings, browser: Browser) -> None:
    """A storefront sends a buyer to one product of a catalogue sale (``?sku=``): the page
    read and listed every SKU of the sale (40 MB of JSON for 200,000). It asks for the
    product alone, and says so when the sale does not have it."""
    from playwright.sync_api import Request

    spec = sale_spec("Catalogue drop", "S1", 5)
    spec["skus"] += [{**spec["skus"][0], "sku": f"S{i}", "title": f"Model {i}"} for i in (2, 3)]
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, spec=spec)
        asked: list[str] = []

        def seen(request: Request) -> None:
            if f"/v1/sales/{sale}" in request.url and "/queue" not in request.url:
                asked.append(request.url)

        page = browser.new_page()
        page.on("request", seen)
        page.goto(f"{gw.base_url}/sales/{sale}?sku=S2#token={_buyer(gw, 'one-product')}")
        page.wait_for_selector("#sku option", state="attached")
        options = page.eval_on_selector_all("#sku option", "os => os.map(o => o.value)")
        assert options == ["S2"], options
        assert [u.split("?", 1)[1] for u in asked] == ["sku=S2"], asked
        assert page.text_content(".item b") == "Model 2"
        page.click("#join")
        page.wait_for_selector("#state[data-state='waiting'], #state[data-state='admitted']")
        other = browser.new_page()
        other.goto(f"{gw.base_url}/sales/{sale}?sku=NOPE#token={_buyer(gw, 'lost')}")
        other.wait_for_selector("#state[data-state='no_item']", timeout=20_000)
        assert not other.is_visible("#join")


def test_a_catalogue_opened_without_a_product_finds_one_by_its_name(
    stack: Settings, browser: Browser
) -> None:
    """A shop links to a catalogue sale as a whole (no ``?sku=``): the page listed every
    product in one endless list and a select of them all (50,000 took 6.3 s to show). It
    shows a few, with a field that finds the rest by name or SKU, and reserves the one found.
    Those shown are products that can still be had: with its first twelve sold out, it showed
    those twelve alone, and the buyer's turn a Reserve button that could not be pressed."""
    spec = sale_spec("Whole catalogue", "S1", 5)
    spec["skus"] = [{**spec["skus"][0], "sku": f"S{i}", "title": f"Model {i}"}
                    for i in range(1, 301)]  # fmt: skip
    with live_page(stack, browser, "catalogue", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        _sold_out(stack, sale, [f"S{i}" for i in range(1, 13)])
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'browsing')}")
        page.wait_for_selector("#find", timeout=15_000)
        rows = page.locator("#product .item")
        assert rows.count() == 12 and page.locator("#product .sold-out").count() == 0
        assert page.text_content("#product .item b") == "Model 13"  # then in the sale's order
        assert page.locator("#sku option").count() == rows.count()
        page.fill("#find", "1")  # 138 of them, twelve sold out: those after the others
        page.wait_for_selector("#more:has-text('12 of 138 shown')")
        assert page.locator("#product .sold-out").count() == 0
        assert "300" in (page.text_content("#more") or "")  # how many there are to find
        page.fill("#find", "model 217")
        page.wait_for_function("document.querySelectorAll('#product .item').length === 1")
        assert page.text_content("#product .item b") == "Model 217"
        assert page.input_value("#sku") == "S217"
        page.fill("#find", "no such shoe")
        page.wait_for_selector("#more:has-text('Nothing matches')")
        assert page.locator("#sku option").count() == 0
        page.fill("#find", "S217")  # by its SKU too
        page.wait_for_function("document.querySelectorAll('#product .item').length === 1")
        page.click("#join")
        gw.pump_forever(sale, ["S217"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        page.screenshot(path=str(SCREENSHOTS / "waiting-room-catalogue-search.png"))
        page.click("#reserve")
        page.wait_for_selector("#result[data-reservation]", timeout=15_000)


def test_the_quantity_offered_is_what_the_buyer_may_take(stack: Settings, browser: Browser) -> None:
    """The quantity field took any number: a buyer of a product limited to 2 asked for 3 and
    was refused with "per-buyer limit reached for this SKU", and a product limited to one
    still asked how many."""
    spec = sale_spec("Limited drop", "S1", 5, limit=2)
    spec["skus"].append({**spec["skus"][0], "sku": "S2", "title": "Model 2", "per_buyer_limit": 1})
    with live_page(stack, browser, "Limited drop", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        gw.pump_forever(sale, ["S1", "S2"])
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'pair')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        assert page.get_attribute("#qty", "max") == "2"
        assert "At most 2 per buyer" in (page.text_content("#qty-note") or "")
        page.fill("#qty", "3")
        page.click("#reserve")  # the page asks for the most it may
        page.wait_for_selector("#result[data-reservation]", timeout=15_000)
        assert page.input_value("#qty") == "2"
        reservation = str(page.get_attribute("#result", "data-reservation"))
        looked = requests.get(
            f"{gw.base_url}/v1/reservations/{reservation}",
            timeout=10,
            headers={"Authorization": f"Bearer {_pass(gw, 'pair')}"},
        )
        assert looked.json()["quantity"] == 2, looked.text
        # ... and says what it holds: it read "Reserved! Order processing", of how many not a
        # word, to a buyer who had typed 3 (it says which product, too)
        title = spec["skus"][0]["title"]
        said = f"Reserved: 2 \N{MULTIPLICATION SIGN} {title}"
        page.wait_for_selector(f"#result:has-text('{said}')", timeout=10_000)
        other = page.context.browser.new_page()
        other.goto(f"{gw.base_url}/sales/{sale}?sku=S2#token={_buyer(gw, 'single')}")
        other.wait_for_selector("#sku option", state="attached")
        assert other.get_attribute("#qty-label", "hidden") is not None  # nothing to ask
        assert "One per buyer" in (other.text_content("#qty-note") or "")


def test_a_page_open_on_a_sale_deleted_since_says_it_is_gone(
    stack: Settings, browser: Browser
) -> None:
    """A sale deleted before its start (never preloaded) while a buyer had its page open: at
    the start the page said "The sale is open" and offered Join, which failed "Could not
    join" again and again."""
    with live_page(stack, browser, "Called off", starts_in=3, preload=False) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'too-early')}")
        page.wait_for_selector("#state[data-state='scheduled']", timeout=10_000)
        gone = requests.delete(f"{gw.base_url}/admin/v1/sales/{sale}", timeout=10,
                               headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
        assert gone.status_code == 200, gone.text
        page.wait_for_selector("#state[data-state='gone']", timeout=15_000)
        assert page.text_content("#state") == "This sale cannot be found"
        assert page.is_hidden("#join")


PHONE = {"width": 360, "height": 740}


def _laid_out(page: Any) -> dict[str, Any]:
    """Where the buyer's turn puts things: the tops of Reserve and Leave, whether the item
    picker shows, and what runs past its card or the screen."""
    return dict(
        page.evaluate("""() => {
      const top = (id) => document.getElementById(id).getBoundingClientRect().top;
      const card = document.getElementById("buy").getBoundingClientRect();
      const pick = document.getElementById("sku");
      return {reserve: top("reserve"), leave: top("leave"),
              picker: !document.getElementById("sku-label").hidden,
              picker_past_card: pick.getBoundingClientRect().right > card.right,
              page_wider: document.documentElement.scrollWidth > window.innerWidth};
    }""")
    )


def test_a_buyer_on_a_phone_sees_the_reservation_first(stack: Settings, browser: Browser) -> None:
    """At a phone's width, the turn showed "Leave the queue" above the reservation, a picker
    of one item naming the product the card above names (cut off at the screen's edge), and
    the Reserve button in the middle of the quantity's line."""
    spec = sale_spec("Phone drop", "S1", 5, limit=2)
    spec["skus"][0]["title"] = "Air Max 90 — Infrared, a long product title that goes on"
    with live_page(stack, browser, "Phone drop", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.set_viewport_size(PHONE)
        gw.pump_forever(sale, ["S1"])
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'phone')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        one = _laid_out(page)
        assert one["reserve"] < one["leave"], one  # the turn's action first
        assert not one["picker"] and not one["page_wider"], one
        assert "At most 2 per buyer" in (page.text_content("#qty-note") or "")
    with _admitted_to_two_models(stack, browser, "phone-two", first_stock=1) as live:
        live.page.set_viewport_size(PHONE)
        two = _laid_out(live.page)
        assert two["picker"] and not two["picker_past_card"] and not two["page_wider"], two
        assert two["reserve"] < two["leave"], two


def test_a_buyer_on_a_phone_sees_the_price_of_the_product_chosen(
    stack: Settings, browser: Browser
) -> None:
    """At a phone's width the picker cut "Limited edition running sneaker Aurora Borealis
    glow-in-the-dark, size 42 EU (€129.00)" at "Aurora": beside Reserve, the price of the
    product chosen was nowhere."""
    spec = sale_spec("Price drop", "S1", 5, limit=2)
    spec["skus"][0]["title"] = ("Limited edition running sneaker Aurora Borealis "
                                "glow-in-the-dark, size 42 EU")  # fmt: skip
    spec["skus"].append({**spec["skus"][0], "sku": "S2", "title": "Hoodie", "price": 4900,
                         "per_buyer_limit": 1})  # fmt: skip
    with live_page(stack, browser, "Price drop", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.set_viewport_size(PHONE)
        gw.pump_forever(sale, ["S1", "S2"])
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'priced')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        assert page.evaluate("(s => s.scrollWidth > s.clientWidth)(document.getElementById('sku'))")
        assert page.text_content("#qty-note") == "€129.00 each. At most 2 per buyer."
        page.select_option("#sku", "S2")
        assert page.text_content("#qty-note") == "€49.00. One per buyer."


def test_the_products_say_their_limit_per_buyer_before_the_queue(
    stack: Settings, browser: Browser
) -> None:
    """A buyer learnt how many of a product one buyer may have only once admitted, a minute
    of a turn to decide in; the list they read while waiting showed the prices alone."""
    spec = sale_spec("Limits drop", "S1", 5, limit=2)
    spec["skus"].append({**spec["skus"][0], "sku": "S2", "title": "Hoodie", "price": 4900,
                         "per_buyer_limit": 1})  # fmt: skip
    with live_page(stack, browser, "Limits drop", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'limits')}")
        page.wait_for_selector("#product .item")
        said = page.eval_on_selector_all("#product .price", "ps => ps.map(p => p.textContent)")
        assert said == ["€129.00 · at most 2 per buyer", "€49.00 · one per buyer"], said


def test_a_buyer_in_line_is_told_how_long_the_turn_will_last(
    stack: Settings, browser: Browser
) -> None:
    """The length of a turn, the time a buyer has to reserve once admitted, was said only once
    the turn had begun: a buyer in line had no reason to stay by the page."""
    spec = sale_spec("Turn drop", "S1", 5)
    spec["admission_window_seconds"] = 90
    with live_page(stack, browser, "Turn drop", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'turn-told')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='waiting']", timeout=20_000)
        lasts = "Your turn will last 90 s: keep this page open, its tab's title says when it comes."
        assert page.text_content("#turn") == lasts
        said = page.text_content("#announce") or ""  # a screen reader is told it too, once
        assert said.startswith("You are in line. Position 1, ") and said.endswith(f". {lasts}"), (
            said
        )
        gw.pump_forever(sale, ["S1"])
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        assert not page.is_visible("#turn")


def test_names_without_a_space_wrap_at_a_phones_width(stack: Settings, browser: Browser) -> None:
    """A title or a sale's name with no space to break at (a model code, a compound word, a
    link) ran past the screen: the page was 4,252 px wide at 360."""
    name = "Winter-drop-" + "W" * 120
    spec = sale_spec(name, "S1", 5)
    spec["skus"][0]["title"] = "Sneaker-" + "X" * 150
    spec["skus"].append({**spec["skus"][0], "sku": "S2", "title": "Boot-" + "B" * 180})
    with live_page(stack, browser, name, spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.set_viewport_size(PHONE)
        gw.pump_forever(sale, ["S1", "S2"])
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'no-space')}")
        page.wait_for_selector("#join:not([hidden])", timeout=10_000)
        wider = "document.documentElement.scrollWidth - window.innerWidth"
        assert page.evaluate(wider) <= 0, page.evaluate("document.documentElement.scrollWidth")
        page.click("#join")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        assert page.evaluate(wider) <= 0, page.evaluate("document.documentElement.scrollWidth")
        page.click("#reserve")
        page.wait_for_selector("#result[data-outcome]", timeout=20_000)
        assert page.evaluate(wider) <= 0, page.evaluate("document.documentElement.scrollWidth")


def test_a_buyer_on_a_phone_sees_the_turn_above_a_catalogue(
    stack: Settings, browser: Browser
) -> None:
    """A catalogue's twelve products came first: on a phone, "It's your turn!" and Reserve
    were screens down the page, and a turn of a minute could pass unseen. A wrapped price also sat
    as close to the next product's name as to its own."""
    spec = sale_spec("Phone catalogue", "S1", 5)
    title = "Runner {} in colour number {}, wide fit"  # wraps its price at a phone's width
    spec["skus"] = [{**spec["skus"][0], "sku": f"S{i}", "title": title.format(i, i)}
                    for i in range(1, 21)]  # fmt: skip
    with live_page(stack, browser, "Phone catalogue", spec=spec) as live:
        gw, sale, page = live.gw, live.sale, live.page
        page.set_viewport_size(PHONE)
        gw.pump_forever(sale, [f"S{i}" for i in range(1, 21)])
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, 'phone-list')}")
        page.click("#join")
        page.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        seen = page.evaluate("""() => {
          const box = (q) => document.querySelector(q).getBoundingClientRect();
          const rows = [...document.querySelectorAll("#product .item")].map((row) => ({
            name: row.querySelector("b").getBoundingClientRect(),
            price: row.querySelector(".price").getBoundingClientRect()}));
          return {screen: window.innerHeight, state: box("#state").bottom + window.scrollY,
                  reserve: box("#reserve").bottom + window.scrollY, rows: rows.length,
                  own: rows.slice(0, -1).map((r) => r.price.top - r.name.bottom),
                  next: rows.slice(1).map((r, i) => r.name.top - rows[i].price.bottom)};
        }""")
        assert seen["rows"] == 12, seen
        assert all(n > o for o, n in zip(seen["own"], seen["next"], strict=True)), seen
        assert seen["state"] <= seen["screen"] and seen["reserve"] <= seen["screen"], seen


def _sold_out(stack: Settings, sale: str, skus: list[str]) -> None:
    """Each of ``skus`` sold to its last unit, as Redis counts it (what the page reads)."""
    import redis

    kind = redis.RedisCluster if stack.redis_cluster else redis.Redis
    client = kind.from_url(stack.require_redis())
    try:
        for sku in skus:
            stock = SkuKeys(sale, sku).stock
            total = int(client.hget(stock, "total") or 0)
            client.hset(stock, mapping={"available": 0, "sold": total})
    finally:
        client.close()


def _summary_sold_out(gw: LiveGateway, sale: str) -> None:
    """Until the public sale summary, which the page reads, says ``sale`` is sold out: each
    gateway process keeps its copy 0.5 s, or ten times as long as reading it took (a sleep
    of 0.6 s was not enough on a busy machine)."""
    deadline = time.monotonic() + 20
    while not requests.get(f"{gw.base_url}/v1/sales/{sale}", timeout=10).json()["sold_out"]:
        assert time.monotonic() < deadline, f"{sale} never read as sold out"
        time.sleep(0.1)


async def _sell(stack: Settings, sale: str, reservation_id: str | None) -> None:
    """Move a hold to SOLD, as the workers do once its payment is captured."""
    assert reservation_id
    client = redis_client(stack)
    try:
        scripts, keys = HoldScripts(client), SkuKeys(sale, "S1")
        assert (await scripts.begin_payment(keys, reservation_id)).ok
        assert (await scripts.confirm(keys, reservation_id)).ok
    finally:
        await client.aclose()


def test_the_page_says_ended_or_sold_out_and_offers_no_join(
    stack: Settings, browser: Browser
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with live_gateway(stack) as gw:
        gone = create_live_sale(gw.base_url, stock=1, name="Ended drop")
        sold = create_live_sale(gw.base_url, stock=1, name="Tiny drop")
        requests.post(f"{gw.base_url}/admin/v1/sales/{gone}/end", headers=admin, timeout=10)
        gw.pump_forever(sold, ["S1"])
        # A line full up to the cutoff: its 2 units are free, and promised to those in it.
        full = create_live_sale(gw.base_url, stock=2, name="Full drop")
        gw.pump_forever(full, ["S1"])
        for i in range(50):
            joined = requests.post(
                f"{gw.base_url}/v1/sales/{full}/queue",
                timeout=10,
                headers={"Authorization": f"Bearer {_pass(gw, f'q{i}')}"},
            )
            assert joined.status_code == 200, joined.text
            if joined.json()["state"] == "sold_out":
                break
            time.sleep(0.05)  # the pump publishes its cutoff soon after the start
        assert joined.json()["state"] == "sold_out", "the line never reached the cutoff"
        _summary_sold_out(gw, full)
        first = browser.new_page()
        first.goto(f"{gw.base_url}/sales/{sold}#token={_buyer(gw, 'lucky')}")
        first.click("#join")
        first.wait_for_selector("#state[data-state='admitted']", timeout=20_000)
        first.click("#reserve")
        first.wait_for_selector("#result[data-reservation]", timeout=20_000)
        # Sold, not only held: a held unit may come back, and buyers still queue for it.
        rid = first.get_attribute("#result", "data-reservation")
        with ThreadPoolExecutor(1) as aside:  # Playwright's loop runs on this thread
            aside.submit(asyncio.run, _sell(stack, sold, rid)).result()
        _summary_sold_out(gw, sold)
        late = browser.new_page()
        late.goto(f"{gw.base_url}/sales/{sold}#token={_buyer(gw, 'late')}")
        late.wait_for_selector("#state[data-state='sold_out']", timeout=20_000)
        assert not late.is_visible("#join")
        late.screenshot(path=str(SCREENSHOTS / "waiting-room-sold-out.png"))
        turned = browser.new_page()
        turned.goto(f"{gw.base_url}/sales/{full}#token={_buyer(gw, 'newcomer')}")
        turned.wait_for_selector("#state[data-state='sold_out']", timeout=20_000)
        assert not turned.is_visible("#join")
        assert "no more places in line" in turned.inner_text("body")
        ended = browser.new_page()
        ended.goto(f"{gw.base_url}/sales/{gone}#token={_buyer(gw, 'someone')}")
        ended.wait_for_selector("#state[data-state='ended']", timeout=20_000)
        assert not ended.is_visible("#join")
        ended.screenshot(path=str(SCREENSHOTS / "waiting-room-ended.png"))
        nopass = browser.new_page()
        nopass.goto(f"{gw.base_url}/sales/{sold}")
        nopass.wait_for_selector("#state[data-state='sold_out'], "
                                 "#state[data-state='no_pass']", timeout=20_000)  # fmt: skip


def test_the_page_follows_a_reservation_to_its_outcome(
    stack: Settings, browser: Browser, tmp_path: Path
) -> None:
    """Through the whole engine (pump, workers, payment simulator): one buyer's payment goes
    through and the page says confirmed; another's card is declined and the page says the
    payment failed and the item went back on sale."""
    from playwright.sync_api import Response

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    port = free_ports(UP_PORTS)
    base = f"http://127.0.0.1:{port}"
    listener = f"http://127.0.0.1:{port + 5}"  # `up`'s reservations listener
    admin = {"Authorization": f"Bearer {stack.admin_token.current()}"}
    signer = Signer.from_setting(stack.buyer_token_secret.reveal(), "buyer")
    with engine(stack, port, tmp_path / "engine.log"):
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the engine never became healthy"
            time.sleep(0.2)
        created = requests.post(f"{base}/admin/v1/sales", json=sale_spec("Outcome drop", "S1", 2),
                                headers=admin, timeout=10)  # fmt: skip
        assert created.status_code == 201, created.text
        sale = created.json()["id"]
        loaded = requests.post(f"{base}/admin/v1/sales/{sale}/preload", headers=admin, timeout=10)
        assert loaded.status_code == 200, loaded.text
        journeys = (("payer", "tok_visa", "confirmed"),
                    ("decliner", "tok_decline", "payment_failed"))  # fmt: skip
        pages = []  # the two buyers at once: each page looks at its order every 2 s
        for buyer, payment, _ in journeys:
            page = browser.new_page()
            reserved: list[tuple[str, int]] = []  # (url, status) of each reservation sent

            def seen(answer: Response, into: list[tuple[str, int]] = reserved) -> None:
                if answer.request.method == "POST" and "/reservations" in answer.url:
                    into.append((answer.url, answer.status))

            page.on("response", seen)
            token = signer.sign({"sub": buyer}, 3600)
            page.goto(f"{base}/sales/{sale}#token={token}&payment={payment}")
            page.click("#join")
            pages.append((page, reserved))
        for page, _ in pages:
            page.wait_for_selector("#state[data-state='admitted']", timeout=30_000)
            page.click("#reserve")
        for (page, reserved), (_, _, outcome) in zip(pages, journeys, strict=True):
            page.wait_for_selector(f"#result[data-outcome='{outcome}']", timeout=60_000)
            # The page reserved at the listener the status answer named: another origin,
            # allowed by the page's CSP and the listener's CORS.
            assert reserved == [(f"{listener}/v1/sales/{sale}/reservations", 201)], reserved
            page.screenshot(path=str(SCREENSHOTS / f"waiting-room-{outcome}.png"))
            assert not page.is_visible("#cancel")
            if outcome == "confirmed":  # what was bought, what it cost, what to quote
                said = page.inner_text("#result")
                rid = page.get_attribute("#result", "data-reservation")
                bought = "1 \N{MULTIPLICATION SIGN} Sneaker, €129.00"
                assert bought in said and f"Order reference: {rid}." in said, said
            # ... and what a screen reader says last: the state's title, "Order confirmed",
            # said after the card, had taken its place, and with it what was bought
            assert page.text_content("#announce") == page.inner_text("#result")


def test_the_page_solves_a_join_challenge_and_how_long_it_takes(
    stack: Settings, browser: Browser
) -> None:
    """A sale that asks a proof of work at join: the page solves it in a worker and joins.
    The solve times per difficulty are written beside the screenshots (docs/BENCHMARKS.md)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    times: dict[int, list[int]] = {}
    with live_gateway(stack) as gw:
        for bits in (8, 12, 14):
            spec = {**sale_spec(f"Guarded drop {bits}", "S1", 50), "join_challenge": bits}
            sale = create_live_sale(gw.base_url, spec=spec)
            for n in range(3):
                page = browser.new_page()
                page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, f'human-{bits}-{n}')}")
                page.wait_for_selector("#join:not([hidden])")
                page.click("#join")
                joined = "#state[data-state='waiting'], #state[data-state='admitted']"
                page.wait_for_selector(joined, timeout=120_000)
                solved = page.get_attribute("body", "data-solve-ms")
                times.setdefault(bits, []).append(int(solved or -1))
                page.close()
    assert all(t >= 0 for ts in times.values() for t in ts), times
    (SCREENSHOTS / "challenge-solve-ms.json").write_text(json.dumps(times))
    print("join challenge solve ms in Chromium:", times)


def test_a_join_whose_challenge_was_spent_by_a_busy_answer_solves_a_new_one(
    stack: Settings, browser: Browser
) -> None:
    """The gateway spent the buyer's solved challenge, then answered 503 (the queue full, Redis
    busy). The page tried the join again with the same solution at the Retry-After, and was
    refused for good: "this challenge was used already". It solves a new one."""
    busy = {"left": 1}

    def first_join_busy(route: Route, _gw: LiveGateway, _sale: str) -> None:
        if route.request.method != "POST" or not busy["left"]:
            return route.continue_()
        busy["left"] -= 1
        route.fetch()  # the gateway checks the solution and spends it
        route.fulfill(
            status=503,
            body='{"error": {"code": "queue_full", "message": "full"}}',
            headers={"Retry-After": "1", "Content-Type": "application/json"},
        )
        return None

    joined, note = _guarded_join(stack, browser, "Guarded busy drop", "patient", "queue",
                                 first_join_busy)  # fmt: skip
    assert busy["left"] == 0
    assert joined, note


def test_a_join_whose_challenge_was_raised_meanwhile_solves_the_new_price(
    stack: Settings, browser: Browser
) -> None:
    """The operator raised the proof of work (`--challenge 8`) while a buyer's page solved a
    4-bit challenge: the join was refused `challenge_invalid` (below the sale's base now) and
    the page said so, where a new challenge at the new price would have joined."""
    raised = {"done": False}

    def raise_after_the_offer(route: Route, gw: LiveGateway, sale: str) -> None:
        offer = route.fetch()  # a 4-bit challenge, then the price rises
        if not raised["done"]:
            raised["done"] = True
            ask_proof_of_work(gw.base_url, sale, 8)
        route.fulfill(response=offer)

    joined, note = _guarded_join(stack, browser, "Guarded, raised", "caught-by-the-rise",
                                 "queue/challenge", raise_after_the_offer)  # fmt: skip
    assert raised["done"] and joined, note


def _guarded_join(
    stack: Settings, browser: Browser, name: str, buyer: str, path: str,
    handler: Callable[[Route, LiveGateway, str], None],
) -> tuple[bool, str]:  # fmt: skip
    """A buyer's page joining a live sale that asks a 4-bit proof of work, its requests to
    ``/v1/sales/{sale}/<path>`` passed through ``handler``: whether it joined (or was refused:
    the button offered again, busy answers retried meanwhile), and the page's note."""
    spec = {**sale_spec(name, "S1", 5), "join_challenge": 4}
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, spec=spec)
        page = browser.new_page()
        page.route(f"**/v1/sales/{sale}/{path}", lambda route: handler(route, gw, sale))
        page.goto(f"{gw.base_url}/sales/{sale}#token={_buyer(gw, buyer)}")
        page.wait_for_selector("#join:not([hidden])")
        page.click("#join")
        joined = "#state[data-state='waiting'], #state[data-state='admitted']"
        page.wait_for_selector(f"{joined}, #join:not([hidden])", timeout=20_000)
        result = page.is_visible(joined), page.text_content("#note") or ""
    return result


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
    stack: Settings, browser: Browser
) -> None:
    """Chromium runs a storefront page served from another loopback port; its fetch calls
    (with preflights, for the custom headers) reach the gateway through CORS."""
    shop_port = free_port()
    shop = http.server.ThreadingHTTPServer(("127.0.0.1", shop_port), _Shop)
    threading.Thread(target=shop.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{shop_port}"
    try:
        with live_gateway(stack, cors_origins=(origin,)) as gw:
            sale = create_live_sale(gw.base_url, stock=2, name="Cross-origin drop")
            gw.pump_forever(sale, ["S1"])
            token = _pass(gw, "shop-buyer")
            page = browser.new_page()
            page.goto(f"{origin}/#gateway={gw.base_url}&sale={sale}&token={token}")
            page.wait_for_selector("#result[data-state='reserved'], "
                                   "#result[data-state='refused'], "
                                   "#result[data-state='failed']", timeout=30_000)  # fmt: skip
            outcome = page.get_attribute("#result", "data-state")
            rid = page.text_content("#result")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "storefront-cross-origin.png"))
            assert outcome == "reserved", rid
            bearer = {"Authorization": f"Bearer {token}"}
            held = requests.get(f"{gw.base_url}/v1/reservations/{rid}", headers=bearer, timeout=10)
            assert held.status_code == 200 and held.json()["state"] == "ACTIVE"
    finally:
        shop.shutdown()
        shop.server_close()
