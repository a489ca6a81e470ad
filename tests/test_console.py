"""The operators' live sale page in Chromium, during a running spike through the whole engine:
log in once (the token never in a URL), the numbers move while buyers arrive, they match
``sale status`` at the end, the audit runs from its button. Screenshots go beside the
waiting room's."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import requests
from playwright.sync_api import expect

from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.keys import SkuKeys
from flashsale.settings import Settings
from flashsale.tokens import Signer
from gateway.state import CLIENTS
from loadtest.driver import Buyers, Person
from loadtest.processes import engine
from tests.harness import (
    ADMIN,
    SCREENSHOTS,
    LivePage,
    accessibility_violations,
    create_live_sale,
    hang_the_first,
    healthy,
    live_gateway,
    live_page,
    packed_and_revalidated,
    sale_spec,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

SKU = "LIVE-1"
PAGE = 100  # sales a page of the list shows
DASH = "\N{EN DASH}"


def digits(shown: str) -> int:
    """A number as the page shows it, in the browser's locale (200,000 or 200 000)."""
    return int("".join(c for c in shown if c.isdigit()))


def _spike(base: str, sale: str, settings: Settings, buyers: int) -> threading.Thread:
    """Buyers arriving over 6 s, in a thread of their own while the browser watches."""
    signer = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer")

    def run() -> None:
        start = time.monotonic() + 0.5
        people = [Person(signer.sign({"sub": f"live-{sale}-{i}"}, 600),
                         "tok_decline" if i % 10 == 9 else "tok_visa", start + 6 * i / buyers)
                  for i in range(buyers)]  # fmt: skip
        asyncio.run(Buyers(base, sale, SKU, patience_s=60).run(people, concurrency=100))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _sale_status(base: str, admin: dict[str, str], sale: str) -> str:
    answer = requests.get(f"{base}/admin/v1/sales/{sale}", headers=admin, timeout=10)
    return str(answer.json()["sale"]["status"])


def _row(page: object, sku: str) -> list[str]:
    cells = page.query_selector_all(f"#skus tr[data-sku='{sku}'] td")  # type: ignore[attr-defined]
    return [c.inner_text() for c in cells]


def test_the_live_page_follows_a_spike_and_agrees_with_sale_status(
    stack: Settings,
    browser: Browser,
    tmp_path: Path,
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    port = free_ports(UP_PORTS)
    base = f"http://127.0.0.1:{port}"
    token = stack.admin_token.current()
    admin = {"Authorization": f"Bearer {token}"}
    with engine(stack, port, tmp_path / "engine.log"):
        healthy(f"{base}/healthz", patience=60)
        created = requests.post(f"{base}/admin/v1/sales", json=sale_spec("Live drop", SKU, 150),
                                headers=admin, timeout=10)  # fmt: skip
        sale = created.json()["id"]
        assert requests.post(f"{base}/admin/v1/sales/{sale}/preload", headers=admin,
                             timeout=10).status_code == 200  # fmt: skip
        # Without the token the data stays shut; the page's shell does not hold any.
        assert requests.get(f"{base}/admin/v1/sales/{sale}/live", timeout=5).status_code == 401
        assert requests.get(f"{base}/admin/", timeout=5).status_code == 200
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(f"{base}/admin/")
        page.fill("#token", "wrong-token")
        page.click("button[type=submit]")
        page.wait_for_selector("#login-error:has-text('refused')")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_selector(f"text={sale}")
        page.click(f"text={sale}")
        page.wait_for_selector(f"#skus tr[data-sku='{SKU}']")
        assert token not in page.url

        spike = _spike(base, sale, stack, buyers=220)
        seen: set[tuple[str, ...]] = set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(seen) < 3:
            seen.add(tuple(_row(page, SKU)))
            time.sleep(0.7)
        assert len(seen) >= 3, seen  # the numbers moved while buyers arrived
        page.screenshot(path=str(SCREENSHOTS / "live-sale-during-spike.png"), full_page=True)
        spike.join(timeout=90)
        assert not spike.is_alive()

        # Once every order is final, the page shows what `sale status` says (by its next
        # refresh, once a second).
        deadline = time.monotonic() + 60
        while True:
            status = requests.get(f"{base}/admin/v1/sales/{sale}", headers=admin,
                                  timeout=10).json()  # fmt: skip
            [row] = status["skus"]
            expected = [f"{v:,}" if isinstance(v, int) else v for v in (
                SKU, row["stock_total"], row["available"], row["held"], row["paying"],
                row["sold"], row["confirmed"], row["orders"].get("PAYMENT_FAILED", 0),
            )]  # fmt: skip
            shown = _row(page, SKU)
            if (row["held"] == 0 and shown == expected) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert row["held"] == 0 and shown == expected, (shown, expected)
        # The answers by route, the busiest first (they came in the metrics' order: the
        # admin's few page loads above the buyers' thousands).
        counts = page.eval_on_selector_all(
            "#routes tr",
            "rows => rows.map(r => Number(r.cells[1].textContent.replaceAll(',', '')))",
        )
        assert len(counts) > 3 and counts == sorted(counts, reverse=True), counts
        # The sale's totals over its SKUs (a large sale's table shows its busiest alone).
        note = page.inner_text("#skus-note")
        assert note.startswith(f"1 SKU: stock {row['stock_total']:,}, ") and (
            f"sold {row['sold']:,}, confirmed {row['confirmed']:,}" in note
        ), note
        assert row["sold"] > 0 and row["orders"].get("PAYMENT_FAILED", 0) > 0
        # Opened again (a reload, or an operator arriving now), the charts start at the
        # sale's start with the units confirmed and the buyers admitted so far: they drew
        # only what happened while the page was open.
        curves = requests.get(f"{base}/admin/v1/sales/{sale}/history", headers=admin,
                              timeout=10).json()  # fmt: skip
        opened = datetime.fromisoformat(status["sale"]["starts_at"]).timestamp()
        assert curves["sold"][0] == [opened, 0], curves["sold"][:2]
        assert curves["sold"][-1][1] == row["confirmed"], curves["sold"][-3:]
        times = [t for t, _ in curves["sold"] + curves["admitted"]]
        assert all(opened <= t < time.time() + 1 for t in times), times
        page.reload()
        page.wait_for_selector("#chart-note:has-text('from the sale')")
        sold, admitted = page.evaluate("[charts.sold.data, charts.queue.data]")
        assert (sold[0][0], sold[1][0]) == (opened, 0), sold
        assert sold[1][len(curves["sold"]) - 1] == row["confirmed"], sold
        assert admitted[0][0] == opened and admitted[1][0] == 0, admitted
        assert max(admitted[1]) > 0 and admitted[2][0] is None, admitted  # no waiting known
        # What it took, as `sale status` adds it up (Intl's format: "€12,900.00").
        assert status["revenue"] == {"EUR": 12900 * row["confirmed"]}, status["revenue"]
        assert f"revenue €{129 * row['confirmed']:,}.00" in note, note

        # The audit compares Redis with Postgres once nothing is in flight: on a busy
        # machine the last payments may still be, and it says "not drained" (asked
        # again, as its operator would).
        deadline = time.monotonic() + 60
        while True:
            page.click("#audit")
            page.wait_for_selector("#invariants li:nth-child(8)", timeout=60_000)
            assert page.inner_text("#audit-state") in ("PASSED", "FAILED")
            said = page.inner_text("#invariants")
            passed = len(page.query_selector_all("#invariants li.pass"))
            if passed == 8 or "not drained" not in said or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert passed == 8, said
        # A failed invariant says why: counts and ids, or a sentence.
        failing = {
            "sale_id": sale,
            "passed": False,
            "facts": {},
            "invariants": [
                {
                    "name": "2. conservation",
                    "passed": False,
                    "details": {
                        "cannot_compare": "pipeline not drained: 3 open orders",
                        "counters_do_not_add_up": {"count": 12, "ids": ["A", "B"]},
                    },
                }
            ],
        }
        page.route("**/audit", lambda route: route.fulfill(json=failing))
        page.click("#audit")
        page.wait_for_selector("#invariants li.fail .why")
        assert page.inner_text("#audit-state") == "FAILED"
        # Numbered once, by the invariant's own number: "1. ✗ 2. conservation", it said.
        marker = page.eval_on_selector("#invariants li", "e => getComputedStyle(e).listStyleType")
        assert marker == "none", marker
        assert [w.inner_text() for w in page.query_selector_all("#invariants .why")] == [
            "cannot compare: pipeline not drained: 3 open orders",
            "counters do not add up: 12: A, B, …",
        ]
        page.unroute("**/audit")
        page.screenshot(path=str(SCREENSHOTS / "live-sale-after.png"), full_page=True)
        # Asked again, it shows no report while the new one runs: the last one's invariants
        # beside "running…" read as its answer (a check waiting for the eighth took them).
        held: list[Any] = []

        def hold(route: Any) -> None:  # not answered while the page is looked at
            held.append(route)

        page.route("**/audit", hold)
        page.click("#audit")
        page.wait_for_selector("#audit-state:has-text('running')")
        assert page.query_selector_all("#invariants li") == [], page.inner_text("#invariants")
        assert len(held) == 1
        page.unroute("**/audit")

        # Pause asks first: dismissed, nothing happens; accepted, the sale is paused.
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("[data-action=pause]")
        assert _sale_status(base, admin, sale) == "active"
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("[data-action=pause]")
        page.wait_for_selector("#sale-title:has-text('paused')")
        assert _sale_status(base, admin, sale) == "paused"


def test_the_live_page_offers_only_what_can_still_be_done(
    stack: Settings, browser: Browser
) -> None:
    """An ended sale's page offered Pause, Resume, End the sale, the rate, the proof of work,
    the queue cap and Extend, each refused once tried; a paused one offered Pause again."""
    with live_page(stack, browser, "Drop to end") as live:
        page, base = live.page, live.gw.base_url
        admin = {"Authorization": f"Bearer {ADMIN}"}
        _open(live)
        # The title and the buttons are set by the same read of the sale.
        page.wait_for_selector("#sale-title:has-text('Drop to end')", timeout=10_000)
        assert page.is_visible("[data-action=pause]") and page.is_hidden("[data-action=resume]")
        paused = requests.post(f"{base}/admin/v1/sales/{live.sale}/pause", headers=admin,
                               timeout=10)  # fmt: skip
        assert paused.status_code == 200, paused.text
        page.wait_for_selector("[data-action=resume]", state="visible", timeout=10_000)
        assert page.is_hidden("[data-action=pause]")
        ended = requests.post(f"{base}/admin/v1/sales/{live.sale}/end", headers=admin,
                              timeout=10)  # fmt: skip
        assert ended.status_code == 200, ended.text
        page.wait_for_selector("#controls", state="hidden", timeout=10_000)
        assert page.is_visible("#ended-note") and page.is_visible("#audit")


def test_the_live_page_says_why_the_sales_are_not_listed_and_tries_again(
    stack: Settings, browser: Browser
) -> None:
    """An operator opens the page while a dependency is down: the list of sales answers 503.
    The page says so and asks again, rather than showing an empty list of sales."""
    from playwright.sync_api import Route

    down: list[str] = []

    def outage(route: Route) -> None:
        if len(down) < 2:
            down.append(route.request.url)
            route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                content_type="application/json",
                body='{"error": {"code": "unavailable", "message": "postgres is down"}}',
            )
            return
        route.continue_()

    with live_page(stack, browser, "Listed drop") as live:
        page = live.page
        page.route(re.compile(r"/admin/v1/sales\?"), outage)  # a glob's ? is any character
        page.goto(f"{live.gw.base_url}/admin/")
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_selector("#list-error:has-text('postgres is down')", timeout=10_000)
        assert page.is_visible("#list") and not page.is_visible("#login")
        page.wait_for_selector(f"#sales a:text('{live.sale}')", timeout=20_000)
        assert (page.text_content("#list-error") or "") == ""
    assert len(down) == 2


def test_a_login_without_a_token_is_not_sent(stack: Settings, browser: Browser) -> None:
    """Log in pressed with the field empty sent an empty token, and said "the token was
    refused", as of a wrong one: the field asks for it instead."""
    with live_page(stack, browser, "Unsent drop") as live:
        page, sent = live.page, []
        page.on("request", lambda request: sent.append(request.url))
        page.goto(f"{live.gw.base_url}/admin/")
        page.wait_for_selector("#token")
        sent.clear()
        page.click("button[type=submit]")
        assert page.evaluate("document.activeElement.id") == "token"
        assert page.evaluate("$('token').validity.valueMissing")
        page.fill("#token", "   ")  # spaces alone are no token either
        page.click("button[type=submit]")
        page.wait_for_timeout(300)
        assert sent == [] and page.text_content("#login-error") == "", sent
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_selector(f"#sales a:text('{live.sale}')", timeout=10_000)


def test_the_link_to_a_sale_leads_to_it_after_the_login(stack: Settings, browser: Browser) -> None:
    """`flashsale demo` prints where to watch its sale, `/admin/#sale=ID`: opened by someone
    not yet logged in, the login led to the list of sales, and the sale was to be found."""
    with live_page(stack, browser, "Linked drop") as live:
        page = live.page
        page.goto(f"{live.gw.base_url}/admin/#sale={live.sale}")
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_selector("#sale-title:has-text('Linked drop')", timeout=10_000)
        assert not page.is_visible("#list")


FOCUSED = "a => { a.focus(); return document.activeElement === a; }"
FOCUSED_ID = """() => { const at = document.activeElement;
  return at === document.body ? "BODY" : at.id || at.dataset.action; }"""


def test_the_live_page_meets_the_accessibility_rules(stack: Settings, browser: Browser) -> None:
    """axe-core's rules (WCAG 2.x A and AA, its best practices) on the login, the list of
    sales and a sale, its audit answered: checked by hand once, not on each change."""
    with live_page(stack, browser, "Checked drop") as live:
        page = live.page
        page.goto(f"{live.gw.base_url}/admin/")
        page.wait_for_selector("#token")
        broken = {"login": accessibility_violations(page)}
        _open(live, click=False)
        broken["sales"] = accessibility_violations(page)
        page.click(f"#sales a:text('{live.sale}')")
        page.wait_for_selector("#sale-title:has-text('Checked drop')", timeout=10_000)
        page.wait_for_selector("#skus tr", timeout=10_000)
        broken["a sale"] = accessibility_violations(page)
        page.click("#audit")
        page.wait_for_selector("#invariants li", timeout=30_000)
        broken["its audit"] = accessibility_violations(page)
        # What an action's answer or a failed read says is read out as it appears: it was
        # only shown, so a screen reader's user heard nothing of "pause failed: …"
        unsaid = page.evaluate(
            """["login-error", "list-error", "sale-error", "act-error", "audit-state"].filter(
                 (id) => !$(id).closest("[role=alert], [role=status], [aria-live]"))"""
        )
    assert not any(broken.values()), broken
    assert unsaid == [], unsaid


def test_a_keyboard_opens_a_sale_and_back_returns_to_the_list(
    stack: Settings, browser: Browser
) -> None:
    """The list's sales and the sale's "all sales" were links without an address: a keyboard
    never reached them (no Tab stop), one could not be opened in a new tab, and the browser's
    Back left the live page instead of going back to the list. A link pasted into the tab
    showing the list did nothing either."""
    with live_page(stack, browser, "Keyed drop") as live:
        page, link = live.page, f"#sales a:text('{live.sale}')"
        _open(live, click=False)
        assert page.eval_on_selector(link, FOCUSED), "the sale's link takes no focus"
        page.keyboard.press("Enter")
        page.wait_for_selector("#sale-title:has-text('Keyed drop')", timeout=10_000)
        # The link's focus went to the top with the list; a keyboard goes on from the sale.
        assert page.evaluate(FOCUSED_ID) == "sale-title"
        page.on("dialog", lambda dialog: dialog.accept())
        page.focus("[data-action=pause]")
        page.keyboard.press("Enter")  # Pause hides, Resume takes its place and its focus
        page.wait_for_selector("[data-action=resume]:visible", timeout=10_000)
        assert page.evaluate(FOCUSED_ID) == "resume"
        assert page.eval_on_selector("#back", FOCUSED), "'all sales' takes no focus"
        page.go_back()
        page.wait_for_selector(link, timeout=10_000)
        assert page.is_visible("#list") and not page.is_visible("#sale")
        assert page.evaluate(FOCUSED_ID) == "sales-title"
        page.go_forward()
        page.wait_for_selector("#sale-title:has-text('Keyed drop')", timeout=10_000)
        page.click("#back")
        page.wait_for_selector(link, timeout=10_000)
        page.goto(f"{live.gw.base_url}/admin/#sale={live.sale}")  # pasted into this tab
        page.wait_for_selector("#sale-title:has-text('Keyed drop')", timeout=10_000)
        assert not page.is_visible("#list") and not page.is_visible("#login")


def test_a_keyboard_hides_and_shows_a_charts_line(stack: Settings, browser: Browser) -> None:
    """The queue chart's legend hides a line ("admitted", "waiting") when clicked; a keyboard
    could not reach its entries (no Tab stop) and a screen reader heard nothing of them being
    switches, or of their state."""
    with live_page(stack, browser, "Charted drop") as live:
        page = live.page
        _open(live)
        page.wait_for_selector("#sale-title:has-text('Charted drop')", timeout=10_000)
        entry = "#chart-queue .u-legend .u-series:has-text('waiting')"
        page.wait_for_selector(entry, timeout=10_000)
        assert page.eval_on_selector(entry, FOCUSED), "the legend's entry takes no focus"
        said = "e => [e.getAttribute('role'), e.getAttribute('aria-pressed')]"
        assert page.eval_on_selector(entry, said) == ["button", "true"]
        page.keyboard.press("Enter")
        expect(page.locator(entry)).to_have_class(re.compile(r"\bu-off\b"))
        assert page.eval_on_selector(entry, said) == ["button", "false"]
        page.keyboard.press("Space")
        expect(page.locator(entry)).not_to_have_class(re.compile(r"\bu-off\b"))
        assert page.eval_on_selector(entry, said) == ["button", "true"]
        # the x row (the time under the cursor) is no switch
        time_row = "#chart-queue .u-legend .u-series >> nth=0"
        assert page.eval_on_selector(time_row, "e => e.tabIndex") == -1


def test_the_lists_refresh_keeps_a_keyboards_place(stack: Settings, browser: Browser) -> None:
    """The list of sales is read again every 5 s, and each read put new links in place of the
    old ones: a keyboard on a sale's link was sent back to the top of the page, on nothing,
    and an Enter pressed then opened nothing."""
    with live_page(stack, browser, "Refreshed drop") as live:
        page, link = live.page, f"#sales a:text('{live.sale}')"
        _open(live, click=False)
        assert page.eval_on_selector(link, FOCUSED)
        focused = page.query_selector(link)
        assert focused is not None
        page.wait_for_function("a => !a.isConnected", arg=focused, timeout=15_000)  # read again
        assert page.evaluate("() => document.activeElement.getAttribute('href')") == (
            f"#sale={live.sale}")  # fmt: skip
        page.keyboard.press("Enter")
        page.wait_for_selector("#sale-title:has-text('Refreshed drop')", timeout=10_000)


def _open(live: LivePage, *, click: bool = True) -> None:
    """Log in to the live page and open ``live``'s sale from the list, as an operator does."""
    live.page.goto(f"{live.gw.base_url}/admin/")
    live.page.fill("#token", ADMIN)
    live.page.click("button[type=submit]")
    if click:
        live.page.click(f"text={live.sale}")
    else:
        live.page.wait_for_selector(f"#sales a:text('{live.sale}')", timeout=10_000)


def _register_early(live: LivePage, stack: Settings, buyers: int) -> Signer:
    """``buyers`` buyers join the pre-queue of ``live``'s sale (before its start); the
    storefront's signer, for more."""
    signer = Signer.from_setting(stack.buyer_token_secret.reveal(), "buyer")
    for n in range(buyers):
        token = signer.sign({"sub": f"early-{n}"}, 600)
        joined = requests.post(f"{live.gw.base_url}/v1/sales/{live.sale}/queue", timeout=10,
                               headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert joined.status_code == 200 and joined.json()["position"] is None, joined.text
    return signer


def _open_with_another(live: LivePage) -> tuple[Any, str]:
    """The live page, logged in, showing ``live``'s sale; and another sale, to open next."""
    page, other = live.page, create_live_sale(live.gw.base_url, name="Other drop")
    page.goto(f"{live.gw.base_url}/admin/#sale={live.sale}")
    page.fill("#token", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_selector(f"#sale-title:has-text('{live.sale}')", timeout=10_000)
    return page, other


def test_an_audit_answered_after_another_sale_was_opened_is_not_shown_on_it(
    stack: Settings, browser: Browser
) -> None:
    """An operator ran the audit of one sale, and opened another while it ran: when the first
    one's report came, the page showed it, PASSED, under the other sale's name."""
    with live_page(stack, browser, "Audited drop") as live:
        page, other = _open_with_another(live)
        held = hang_the_first(page, "**/audit")  # answered once the other sale is open
        page.click("#audit")
        page.wait_for_selector("#audit-state:has-text('running')")
        page.click("#back")
        page.click(f"text={other}")
        page.wait_for_selector("#sale-title:has-text('Other drop')", timeout=10_000)
        [route] = held
        route.fulfill(
            json={
                "sale_id": live.sale,
                "passed": True,
                "facts": {},
                "invariants": [
                    {"name": f"{n}. invariant", "passed": True, "details": {}} for n in range(1, 9)
                ],
            }
        )
        page.wait_for_timeout(500)  # the answer has been read
        assert page.inner_text("#audit-state") == ""
        assert page.query_selector_all("#invariants li") == []


def test_a_sale_opened_while_anothers_read_hangs_is_read_and_shown_alone(
    stack: Settings, browser: Browser
) -> None:
    """One read of a sale at a time, for the whole page: while the last sale's read hung, the
    sale opened next was not read at all (for up to 10 s), and when the hung read came back,
    the page showed the last sale under the new one's link, its end used by "Extend by"."""
    with live_page(stack, browser, "Hung drop") as live:
        page, other = _open_with_another(live)
        held = hang_the_first(page, f"**/admin/v1/sales/{live.sale}/live")  # the next read
        deadline = time.monotonic() + 5
        while not held and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert held, "the page never read the first sale again"
        page.click("#back")
        page.click(f"text={other}")
        page.wait_for_selector("#sale-title:has-text('Other drop')", timeout=5_000)
        held[0].continue_()  # the first sale's answer, late
        page.wait_for_timeout(500)
        assert "Other drop" in page.inner_text("#sale-title")


def test_a_list_that_fails_after_a_sale_was_opened_leaves_the_sale_shown(
    stack: Settings, browser: Browser
) -> None:
    """Back at the list, its read hung; the operator opened a sale from the rows still shown.
    When the read failed, the page asked again two seconds later, and took them from the
    sale back to the list, its refresh left running."""
    with live_page(stack, browser, "Listed again") as live:
        page, other = live.page, create_live_sale(live.gw.base_url, name="Other drop")
        _open(live)
        page.wait_for_selector("#sale-title:has-text('Listed again')", timeout=10_000)
        held = hang_the_first(page, re.compile(r"/admin/v1/sales\?"))  # the list's next read
        page.click("#back")
        page.click(f"text={other}")
        page.wait_for_selector("#sale-title:has-text('Other drop')", timeout=10_000)
        [route] = held
        route.fulfill(
            status=503,
            headers={"Retry-After": "1"},
            json={"error": {"code": "unavailable", "message": "Postgres is down"}},
        )
        page.wait_for_timeout(3_000)  # past the list's next try, were it made
        assert page.is_visible("#sale-title") and not page.is_visible("#list")
        assert "Other drop" in page.inner_text("#sale-title")


def test_the_live_page_fits_a_phone(stack: Settings, browser: Browser) -> None:
    """An SRE paged away from a desk opens the live page on a phone: the page was 650 px wide
    at 360 (the two charts side by side, each at least 300 px, and the tables), so every
    figure was read by scrolling sideways. A sale's name with no space to break at (a
    compound word, a model code) still ran past the screen."""
    with live_page(stack, browser, "Pocket-drop-" + "P" * 120) as live:
        page = live.page
        page.set_viewport_size({"width": 360, "height": 740})
        page.goto(f"{live.gw.base_url}/admin/#sale={live.sale}")
        wide = "document.documentElement.scrollWidth - window.innerWidth"
        assert page.evaluate(wide) <= 0  # the login
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_selector("#skus tr[data-sku='S1']", timeout=10_000)
        page.wait_for_selector("#chart-sold canvas", timeout=10_000)
        assert page.evaluate(wide) <= 0, page.evaluate("document.documentElement.scrollWidth")
        # The name wraps: its section scrolls, which hid most of it past the card's edge.
        title = page.evaluate("(t => [t.scrollWidth, t.clientWidth])"
                              "(document.getElementById('sale-title'))")  # fmt: skip
        assert title[0] <= title[1], title
        page.click("#back")
        page.wait_for_selector(f"#sales :text('{live.sale}')", timeout=10_000)
        assert page.evaluate(wide) <= 0, page.evaluate("document.documentElement.scrollWidth")


def test_a_request_of_the_live_page_that_hangs_is_given_up_and_said(
    stack: Settings, browser: Browser
) -> None:
    """The list of sales is asked on a connection that answers nothing (a proxy holding it):
    the page showed an empty list, with no word, for as long as the browser waits (minutes).
    It gives up after 10 s, says so and asks again."""
    with live_page(stack, browser, "Held-up list") as live:
        page = live.page
        held = hang_the_first(page, re.compile(r"/admin/v1/sales\?"))
        page.goto(f"{live.gw.base_url}/admin/")
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_timeout(500)
        assert held and (page.text_content("#list-error") or "") == ""
        page.clock.fast_forward(11_000)
        page.wait_for_selector("#list-error:has-text('no answer within 10 s')", timeout=10_000)
        page.wait_for_selector(f"#sales a:text('{live.sale}')", timeout=20_000)


def test_the_live_page_pages_back_to_older_sales(stack: Settings, browser: Browser) -> None:
    """The list showed the newest 100 sales and no way to the older ones: a shop with a drop
    a day could not find last season's from the page."""
    with live_page(stack, browser, "Last season's drop") as live:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for n in range(PAGE):  # newer sales push it off the first page
            made = requests.post(f"{live.gw.base_url}/admin/v1/sales", headers=headers,
                                 json=sale_spec(f"Newer drop {n}", "S1", 1),
                                 timeout=10)  # fmt: skip
            made.raise_for_status()
        page = live.page
        page.goto(f"{live.gw.base_url}/admin/")
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_selector("#sales a", timeout=10_000)
        assert page.locator("#sales tr").count() == PAGE
        # A start is shown in the operator's own time, the exact UTC instant on hover: the
        # column showed "2026-12-05T06:10:37.204956Z".
        starts = page.locator("#sales tr td:nth-child(4)").first
        shown, exact = starts.text_content() or "", starts.get_attribute("title") or ""
        assert exact.endswith("Z") and shown and "T" not in shown and shown != exact, shown
        # Names read from the left, as text does (they were pushed to the right, as figures).
        aligned = page.eval_on_selector_all(
            "#sales tr:first-child td", "cells => cells.map(c => getComputedStyle(c).textAlign)"
        )
        assert set(aligned) == {"left"}, aligned
        assert page.locator(f"#sales a:text('{live.sale}')").count() == 0
        assert page.is_disabled("#newer") and page.is_enabled("#older")
        assert (page.text_content("#shown") or "").startswith(f"sales 1{DASH}{PAGE}")
        page.click("#older")
        page.wait_for_selector(f"#sales a:text('{live.sale}')", timeout=10_000)
        assert (page.text_content("#shown") or "").startswith(f"sales {PAGE + 1}{DASH}")
        page.click("#newer")
        page.wait_for_selector(f"#sales td:text('Newer drop {PAGE - 1}')", timeout=10_000)


def test_the_list_of_sales_follows_new_sales_and_their_states(
    stack: Settings, browser: Browser
) -> None:
    """The list was read once: a sale a colleague made meanwhile never showed, and a sale
    went on reading "scheduled · not preloaded" after its preload and its opening."""
    with live_page(stack, browser, "Listed early", starts_in=2, preload=False) as live:
        page, base = live.page, live.gw.base_url
        page.clock.install()
        page.goto(f"{base}/admin/")
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        row = page.locator(f"#sales tr:has-text('{live.sale}')")
        expect(row).to_contain_text("scheduled · not preloaded")
        headers = {"Authorization": f"Bearer {ADMIN}"}
        other = create_live_sale(base, name="Made meanwhile")
        assert requests.post(f"{base}/admin/v1/sales/{live.sale}/preload", headers=headers,
                             timeout=10).status_code == 200  # fmt: skip
        deadline = time.monotonic() + 20
        while "live" not in (row.text_content() or "") or not page.is_visible(f"text={other}"):
            assert time.monotonic() < deadline, page.inner_text("#sales")
            page.clock.fast_forward(6_000)
            time.sleep(0.3)  # the read the fast-forward started
        assert "not preloaded" not in (row.text_content() or "")


def test_the_chart_library_is_sent_compressed_and_revalidated(stack: Settings) -> None:
    """51 KB of script went out whole at each page load, read from disk each time."""
    with live_gateway(stack) as gw:
        plain = packed_and_revalidated(f"{gw.base_url}/admin/static/uPlot.iife.min.js")
        assert plain.headers["Cache-Control"] == "public, max-age=86400"


def test_the_live_page_sets_the_rate_the_proof_of_work_and_the_queue_cap_after_asking(
    stack: Settings, browser: Browser
) -> None:
    """An SRE watching a sale from the page, seeing the queue move too slowly or the payment
    pipeline fall behind, had to leave it for `sale set-rate`: the page paused, resumed and
    ended, but could not change the pace. Nor, facing a flood of bots, turn on the proof of
    work asked at join, nor raise the cap of a full waiting room, which may change while the
    sale runs."""
    with live_page(stack, browser, "Paced drop") as live:
        page, base = live.page, live.gw.base_url
        admin = {"Authorization": f"Bearer {ADMIN}"}

        def setting(name: str) -> int:
            sale = requests.get(f"{base}/admin/v1/sales/{live.sale}", headers=admin, timeout=10)
            return int(sale.json()["sale"][name])

        def rate() -> int:
            return setting("admission_rate")

        before = rate()
        _open(live)
        page.wait_for_selector("#rate", timeout=10_000)
        page.fill("#rate", "250")
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("#rate-form button")
        assert rate() == before  # asked first: dismissed, nothing changed
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#rate-form button")
        page.wait_for_function("() => document.body.innerText.includes('250')")
        deadline = time.monotonic() + 10
        while rate() != 250:
            assert time.monotonic() < deadline, rate()
            time.sleep(0.2)
        tile = "#queue .kpi:has-text('proof of work at join')"
        page.wait_for_selector(f"{tile}:has-text('off')", timeout=10_000)
        page.fill("#challenge", "8")
        asked: list[str] = []

        def answer(dialog: Any, accept: bool) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        page.once("dialog", lambda dialog: answer(dialog, False))
        page.click("#challenge-form button")
        assert setting("join_challenge") == 0  # asked first: dismissed, nothing changed
        assert asked == ["Ask every new join for a proof of work of 8 bits from now on? "
                         "Buyers in line keep their places."], asked  # fmt: skip
        page.once("dialog", lambda dialog: answer(dialog, True))
        page.click("#challenge-form button")
        page.wait_for_selector(f"{tile}:has-text('8 bits')", timeout=10_000)
        assert setting("join_challenge") == 8
        # A base above the most the sale may ask as joins rise is refused by the API, and said.
        raised = requests.patch(f"{base}/admin/v1/sales/{live.sale}", headers=admin,
                                json={"join_challenge_max": 12}, timeout=10)  # fmt: skip
        assert raised.status_code == 200, raised.text
        page.wait_for_selector(f"{tile}:has-text('8 to 12 bits')", timeout=10_000)
        page.fill("#challenge", "14")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#challenge-form button")
        page.wait_for_selector("#act-error:has-text('proof of work not set')", timeout=10_000)
        assert "join_challenge_max" in (page.text_content("#act-error") or "")
        assert setting("join_challenge") == 8
        page.fill("#challenge", "0")
        page.once("dialog", lambda dialog: answer(dialog, True))
        page.click("#challenge-form button")
        page.wait_for_selector(f"{tile}:has-text('off')", timeout=10_000)
        assert asked[-1] == "Turn the proof of work at join off from now on?", asked
        assert (setting("join_challenge"), setting("join_challenge_max")) == (0, 0)  # both off
        # The queue cap, against a full waiting room: it can only rise once the sale started.
        cap = "#queue .kpi:has-text('queue cap')"
        assert digits(page.inner_text(f"{cap} b")) == setting("max_queue") == 200_000
        page.fill("#queue-cap", "1000")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#queue-form button")
        page.wait_for_selector("#act-error:has-text('queue cap not set')", timeout=10_000)
        assert "can only rise" in (page.text_content("#act-error") or "")
        page.fill("#queue-cap", "300000")
        page.once("dialog", lambda dialog: answer(dialog, True))
        page.click("#queue-form button")
        expect(page.locator(f"{cap} b")).to_have_text(re.compile(r"^300\D?000$"))
        # The figure as the page shows figures (300,000 here), not 300000.
        assert re.fullmatch(r"Let up to 300\D000 buyers wait in line from now on\? Once the sale "
                            r"has started, the cap can only rise\.", asked[-1]), asked  # fmt: skip
        assert setting("max_queue") == 300_000

        # A later end: a sale that ran through a pause or an outage is given its time back.
        def ends() -> datetime:
            sale = requests.get(f"{base}/admin/v1/sales/{live.sale}", headers=admin, timeout=10)
            return datetime.fromisoformat(sale.json()["sale"]["ends_at"])

        end = ends()
        page.fill("#extend", "30")
        page.once("dialog", lambda dialog: answer(dialog, True))
        page.click("#extend-form button")
        deadline = time.monotonic() + 10
        while ends() == end:
            assert time.monotonic() < deadline, asked
            time.sleep(0.2)
        assert ends() - end == timedelta(minutes=30)
        assert asked[-1].startswith("Extend this sale by 30 minutes, to end at "), asked
        # Refused by the API (the sale ended before the page read it again): said on the
        # page, nothing written. The page's next read is held until then.
        held = hang_the_first(page, f"**/admin/v1/sales/{live.sale}/live")
        deadline = time.monotonic() + 5
        while not held and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert held, "the page never read the sale again"
        ended = requests.post(f"{base}/admin/v1/sales/{live.sale}/end", headers=admin,
                              timeout=10)  # fmt: skip
        assert ended.status_code == 200, ended.text
        page.fill("#rate", "300")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#rate-form button")
        page.wait_for_selector("#act-error:has-text('has ended')", timeout=10_000)
        assert rate() == 250
        held[0].continue_()  # the page's read, answered now: the sale has ended
        page.wait_for_selector("#controls", state="hidden", timeout=10_000)
        assert "has ended" in (page.text_content("#act-error") or "")  # the refusal stays said
        # Nothing more can be taken: it said "revenue none yet" of an ended sale.
        note = page.text_content("#skus-note") or ""
        assert note.endswith("revenue none"), note


def test_the_live_page_counts_the_buyers_registered_for_the_draw(
    stack: Settings, browser: Browser
) -> None:
    """Before the opening, buyers join the pre-queue, whose places are drawn at the start: the
    page said "0 waiting, 0 joined" while they registered, the minutes an operator watches
    most closely. Registrations up to the queue cap turn every next buyer away (503
    queue_full): the page says the room is full, and raises its cap."""
    spec = {**sale_spec("Drop to come", "S1", 3, starts_in=600), "max_queue": 3}
    with live_page(stack, browser, "Drop to come", spec=spec) as live:
        page, base = live.page, live.gw.base_url
        signer = _register_early(live, stack, 3)
        _open(live)
        page.wait_for_selector("#queue .kpi:has-text('registered for the draw')", timeout=10_000)
        kpi = page.inner_text("#queue .kpi:has-text('registered for the draw') b")
        assert kpi == "3", kpi
        # When it opens, what an operator watches for before it: the page said only its end.
        starts = page.evaluate("at => new Date(at).toLocaleString()", spec["starts_at"])
        ends = page.evaluate("at => new Date(at).toLocaleString()", spec["ends_at"])
        assert page.inner_text("#updated").startswith(f"opens {starts} · ends {ends} · "), (
            page.inner_text("#updated")
        )
        # Registrations up to the queue cap: every next buyer is turned away, and it is said.
        cap = "#queue .kpi:has-text('queue cap') b"
        assert page.inner_text(cap).startswith("full at 3"), page.inner_text(cap)
        page.fill("#queue-cap", "4")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#queue-form button")
        expect(page.locator(cap)).to_have_text("4")
        joined = requests.post(f"{base}/v1/sales/{live.sale}/queue", timeout=10, headers={
            "Authorization": f"Bearer {signer.sign({'sub': 'early-3'}, 600)}"})  # fmt: skip
        assert joined.status_code == 200, joined.text


def test_after_the_opening_the_live_page_says_the_draw_is_done(
    stack: Settings, browser: Browser
) -> None:
    """Once the sale opened, the live page still said "2 registered for the draw", read as two
    buyers still waiting for a draw that had been made: it now says how many were drawn."""
    with live_page(stack, browser, "Drop opening", starts_in=3) as live:
        page = live.page
        _register_early(live, stack, 2)
        _open(live)
        page.wait_for_selector("#queue .kpi:has-text('registered for the draw')", timeout=10_000)
        live.gw.pump_forever(live.sale, ["S1"])
        drawn = "#queue .kpi:has-text('drawn at the opening')"
        page.wait_for_selector(drawn, timeout=15_000)
        assert page.inner_text(f"{drawn} b") == "2"
        assert page.locator("#queue .kpi:has-text('registered for the draw')").count() == 0


def test_the_live_page_says_new_buyers_are_turned_away_and_what_nobody_can_buy(
    stack: Settings, browser: Browser
) -> None:
    """A line full up to its cutoff, everyone in it admitted and gone without buying: the
    page said "sold out: no" and "0 waiting" while every newcomer was told the sale is sold
    out and its 2 units could no longer sell."""
    with live_page(stack, browser, "Walked away", stock=2) as live:
        page, base = live.page, live.gw.base_url
        live.gw.pump_forever(live.sale, ["S1"])
        signer = Signer.from_setting(stack.buyer_token_secret.reveal(), "buyer")
        queue = f"{base}/v1/sales/{live.sale}/queue"
        tickets = []
        for n in range(50):  # until the line reaches the cutoff the pump publishes
            token = signer.sign({"sub": f"b-{n}"}, 600)
            joined = requests.post(queue, timeout=10,
                                   headers={"Authorization": f"Bearer {token}"}).json()  # fmt: skip
            if joined["state"] == "sold_out":
                break
            tickets.append(joined["ticket"])
            time.sleep(0.05)
        assert tickets and joined["state"] == "sold_out", joined
        for ticket in tickets:  # each leaves once admitted
            deadline = time.monotonic() + 10
            while (state := requests.get(f"{queue}/status", timeout=10, headers={
                    "X-Queue-Ticket": ticket}).json()["state"]) == "waiting":  # fmt: skip
                assert time.monotonic() < deadline, "never admitted"
                time.sleep(0.05)
            if state == "admitted":
                left = requests.delete(queue, timeout=10, headers={"X-Queue-Ticket": ticket})
                assert left.status_code == 200, left.text
        _open(live)
        kpi = "#queue .kpi:has-text('sold out')"
        page.wait_for_selector(f"{kpi}:has-text('nobody can buy')", timeout=10_000)
        said = (page.inner_text(f"{kpi} b"), page.inner_text(kpi))
        assert said[0] == "to new buyers" and said[1].endswith(  # the figure short, then why
            "sold out: the line reaches the cutoff; 2 units nobody can buy any more"
        ), said


def test_the_live_page_says_a_sale_is_not_preloaded_and_preloads_it(
    stack: Settings, browser: Browser, rdb: redis.Redis
) -> None:
    """A sale not preloaded, which no buyer can join, showed dashes in its stock table,
    "available 0" in its totals and an admission rate of 1 (the sale's was 37), and said
    nothing of why: `sale status` says "not preloaded" and names the command. The page says
    it and preloads the sale after asking; SKUs added after a preload are said the same way."""
    spec = {**sale_spec("Drop not loaded", "S1", 5, starts_in=600), "admission_rate": 37}
    with live_page(stack, browser, "Drop not loaded", spec=spec, preload=False) as live:
        page, base = live.page, live.gw.base_url
        page.goto(f"{base}/admin/")
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        listed = page.locator(f"#sales tr:has-text('{live.sale}')")
        expect(listed).to_contain_text("scheduled · not preloaded")  # in the list already
        page.click(f"text={live.sale}")
        page.wait_for_selector("#sale-title:has-text('Drop not loaded')", timeout=10_000)
        assert page.is_visible("#preload-note"), page.inner_text("#sale")
        assert "not preloaded" in page.inner_text("#preload-note")
        assert f"available {DASH}," in page.inner_text("#skus-note"), page.inner_text("#skus-note")
        assert page.inner_text("#queue .kpi:has-text('admission rate') b") == "37"
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("#preload")
        assert page.is_visible("#preload-note")  # asked first: dismissed, nothing done
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#preload")
        page.wait_for_selector("#preload-note", state="hidden", timeout=10_000)
        expect(page.locator("#skus tr[data-sku='S1'] td").nth(2)).to_have_text("5")
        added = requests.post(f"{base}/admin/v1/sales/{live.sale}/skus", timeout=10,
                              headers={"Authorization": f"Bearer {ADMIN}"},
                              json={"skus": [{"sku": "S2", "stock": 2, "price": 100,
                                              "currency": "EUR"}]})  # fmt: skip
        assert added.status_code == 200, added.text
        page.wait_for_selector("#preload-note:has-text('S2')", timeout=10_000)
        assert "1 SKU added since the preload" in page.inner_text("#preload-note")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#preload")
        page.wait_for_selector("#preload-note", state="hidden", timeout=10_000)
        expect(page.locator("#skus tr[data-sku='S2'] td").nth(2)).to_have_text("2")
        # Preloaded, then lost by Redis: not a preload to make, the reconciler's rebuild.
        rdb.delete(*SkuKeys(live.sale, "S1").all())
        page.wait_for_selector("#lost-note:has-text('1 SKU lost by Redis: S1.')", timeout=10_000)
        assert page.is_hidden("#preload-note")


def test_the_live_page_says_when_an_ended_sale_is_archived_and_when_it_was(
    stack: Settings, browser: Browser
) -> None:
    """An ended sale's page said only that nothing could change it: not that the reconciler
    archives it a day after its end (its audit recorded, its buyers' Redis state deleted) nor
    how to do it sooner, nor, once it was archived, that it had been."""
    with live_page(stack, browser, "Drop to archive") as live:
        page, base = live.page, live.gw.base_url
        _open(live)
        page.wait_for_selector("#sale-title:has-text('Drop to archive')", timeout=10_000)
        ended = requests.post(f"{base}/admin/v1/sales/{live.sale}/end", timeout=10,
                              headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
        assert ended.status_code == 200, ended.text
        page.wait_for_selector("#ended-note", state="visible", timeout=10_000)
        note = page.inner_text("#ended-note")
        assert "The reconciler archives it on " in note and "24 h after its end" in note, note
        assert f"`flashsale sale archive {live.sale}` does it sooner" in note, note
        pool = live.gw.app[CLIENTS].pool
        # Kept by a benchmark for its orders, its Redis state deleted (tests/test_sales.py):
        # the archive does not take it.
        live.gw.run(pool.execute("UPDATE sales SET redis_cleared_at = now() WHERE id = $1",
                                 live.sale))  # fmt: skip
        expect(page.locator("#ended-note")).to_contain_text(
            "on purpose (a benchmark's sale): no service visits it, and it cannot be archived",
            timeout=10_000)  # fmt: skip
        assert "reconciler" not in page.inner_text("#ended-note")
        # as `sale archive` marks it (tested with it)
        live.gw.run(pool.execute("UPDATE sales SET archived_at = now() WHERE id = $1", live.sale))
        expect(page.locator("#ended-note")).to_contain_text("It was archived on ", timeout=10_000)
        assert "reconciler" not in page.inner_text("#ended-note")
