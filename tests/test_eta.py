"""The ETAs the waiting room quotes (``gateway.eta``): the opening, the draw, the measured
rates, and the honest "unknown"."""

from __future__ import annotations

import dataclasses

from allocator.queue_view import QueueView, Step
from gateway.counters import Counters
from gateway.eta import OPENING_P50_S, OPENING_P90_S, STEP_S, estimate
from gateway.waiting_room import ADMITTED_RETRY_MS, MAX_RETRY_MS, MIN_RETRY_MS, status_of

START_MS = 1_000_000


def view(**changes: object) -> QueueView:
    base = QueueView(
        preloaded=True, status="active", starts_at_ms=START_MS, ends_at_ms=START_MS + 3_600_000,
        admission_rate=100, window_ms=60_000, capacity=1000, serving=0, cutoff=None, tail=0,
        pre=0, sealed=False, shuffled=False, sold_out=False, rate_p50=0.0, rate_p10=0.0,
        noshow=0.2, outstanding=0, beat_ms=0, live=True, available=1000, held=0,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_before_the_opening_the_wait_counts_the_opening_and_the_first_step() -> None:
    # 3 s before the opening, 30th in line: inside the burst the pump admits at once (50).
    assert estimate(view(), 30, START_MS - 3000) == (3 + OPENING_P50_S, 3 + OPENING_P90_S)
    # 250th: 200 beyond the burst at 100/s (p50) and at 80/s (p90).
    p50, p90 = estimate(view(), 250, START_MS - 3000)
    assert p50 == round(3 + OPENING_P50_S + 2.0, 1)
    assert p90 == round(3 + OPENING_P90_S + 200 / 80, 1)


def test_a_pre_queue_place_is_drawn_among_the_places_the_stock_reaches() -> None:
    # 1,000 in the pre-queue, 40 units at a 20 % no-show: 50 places can be reached; a winner
    # is drawn among them, all inside the opening burst.
    assert estimate(view(pre=1000, available=40), 0, START_MS - 2000) == (2.2, 2.7)
    # Plenty of stock: the draw spreads the 1,000 over 10 s at 100/s.
    p50, p90 = estimate(view(pre=1000, available=5000), 0, START_MS - 2000)
    assert p50 == round(2 + OPENING_P50_S + (500 - 50) / 100, 1)
    assert p90 == round(2 + OPENING_P90_S + (900 - 50) / 80, 1)


def test_a_pre_queue_still_filling_draws_among_the_buyers_still_to_come() -> None:
    """The draw is among everyone in the pre-queue at the opening. Quoting the pre-queue as it
    is 4 s before the opening told the first joiners of a filling queue a third of their wait
    (rate-bound demo: p50 off by 35 %, 66 % within the p90)."""
    # 200 in, joining at 250/s for 4 s more: about 1,200 will be drawn, spread at 100/s.
    p50, p90 = estimate(view(pre=200, available=5000), 0, START_MS - 4000, joining=250.0)
    assert p50 == round(4 + OPENING_P50_S + (600 - 50) / 100, 1)
    assert p90 == round(4 + OPENING_P90_S + (1080 - 50) / 80, 1)
    # The stock still bounds the places a winner is drawn among.
    assert estimate(view(pre=200, available=40), 0, START_MS - 4000, joining=250.0) == (4.2, 4.7)
    # A buyer with a place is not drawn: the joins to come are behind them.
    assert estimate(view(), 30, START_MS - 3000, joining=250.0) == estimate(
        view(), 30, START_MS - 3000
    )


def test_once_admitting_the_measured_rates_give_the_wait() -> None:
    v = view(serving=500, beat_ms=START_MS + 5000, rate_p50=50.0, rate_p10=25.0)
    assert estimate(v, 600, START_MS + 5000) == (2.0, round(4.0 + STEP_S, 1))
    # No measured rate (the pump admits nobody) is no promise at all.
    assert estimate(dataclasses.replace(v, rate_p50=0.0, rate_p10=0.0), 600, 0) == (None, None)


def test_no_wait_is_promised_while_no_pump_steps() -> None:
    """With no allocator running (or a sale whose pump had nothing to admit to), the buyers
    first in line were told "about 0 s" for good, as if the pump stepped."""
    v = view(serving=500, beat_ms=START_MS + 5000, rate_p50=50.0, rate_p10=25.0)
    assert estimate(v, 600, START_MS + 9000)[0] is not None  # a step 4 s ago: still running
    assert estimate(v, 600, START_MS + 11_000) == (None, None)  # none for 6 s
    assert estimate(view(), 30, START_MS + 3000)[0] is not None  # the opening's first steps
    assert estimate(view(), 30, START_MS + 6000) == (None, None)  # no step since the opening


def test_beyond_the_units_free_now_the_wait_is_unknown() -> None:
    # 10 units free, 8 admitted buyers expected to take them: 3 more places are reachable.
    v = view(serving=100, beat_ms=1, rate_p50=50.0, rate_p10=25.0, available=10,
             outstanding=10, noshow=0.2)  # fmt: skip
    assert estimate(v, 103, START_MS)[0] is not None
    assert estimate(v, 104, START_MS) == (None, None)


def test_a_paused_sale_promises_nothing() -> None:
    assert estimate(view(status="paused"), 10, START_MS - 1000) == (None, None)


def test_a_buyer_near_the_front_polls_soon_even_when_the_wait_is_unknown() -> None:
    """Unknown waits (units that must come back from holds, a paused sale) were polled every
    10 s from every place, so the buyer first in line learned of the turn up to 10 s late:
    now as soon as the configured rate could reach the place, within 0.25-10 s."""
    held = view(serving=100, beat_ms=1, rate_p50=50.0, rate_p10=25.0, available=0, held=10)
    for v in (held, view(status="paused", serving=100, beat_ms=1, available=10)):
        front, later, far = (status_of(Counters(v), p, START_MS) for p in (101, 151, 5000))
        assert front.eta_p50 is None and front.state == "waiting"
        assert front.retry_after_ms == MIN_RETRY_MS
        assert later.ahead == 50 and later.retry_after_ms == 500  # 50 places at 100 a second
        assert far.retry_after_ms == MAX_RETRY_MS


def test_an_admitted_buyer_polls_once_a_second_not_four_times() -> None:
    """A buyer whose turn came was told to poll every 250 ms, as the first in line is: four
    status requests a second while choosing (240 in a minute's turn; 4,000 a second from
    1,000 admitted buyers), beside the reservations the gateway serves first. Once a second
    still tells of a pause, a sell-out, a turn passing or a reservation made elsewhere."""
    v = view(serving=100, beat_ms=1, available=10)
    turn = status_of(Counters(v, steps=[Step(100, START_MS)]), 100, START_MS + 5000)
    assert turn.state == "admitted" and turn.retry_after_ms == ADMITTED_RETRY_MS == 1000
    assert status_of(Counters(v), 101, START_MS).retry_after_ms == MIN_RETRY_MS  # the front
