"""A pause does not use up an admitted buyer's turn: an admission window is ``window_ms`` of the
sale not paused (``QueueView.window_closes_ms``), from the pauses the sale hash keeps
(``lua/lib.lua`` pause_fields). Over HTTP: tests/test_gateway_queue.py and test_pump.py."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from allocator.queue_view import QUEUE_FIELDS, ROOM_SALE_FIELDS, QueueView

SALE = {"status": "active", "window_ms": "60000", "pauses": None, "paused_at_ms": None}


def _view(**sale: str | None) -> QueueView:
    fields = {**SALE, **sale}
    return QueueView.parse([fields.get(name) for name in ROOM_SALE_FIELDS],
                           [None] * len(QUEUE_FIELDS))  # fmt: skip


def test_a_window_is_lengthened_by_the_pauses_inside_it_and_by_one_going_on() -> None:
    never = _view()
    assert never.window_closes_ms(1_000, 5_000) == 61_000
    view = _view(pauses="500:2000,10000:15000,200000:300000")
    # admitted at 1,000: 1,000 ms of the first pause and all 5,000 of the second came after
    assert view.window_closes_ms(1_000, 20_000) == 61_000 + 1_000 + 5_000
    assert view.window_closes_ms(1_000, 12_000) == 61_000 + 1_000 + 2_000  # as known at 12,000
    # a window long closed is not reopened by a later pause: now is past it either way
    late = view.window_closes_ms(1_000, 250_000)
    assert late < 250_000 and 250_000 - 1_000 - view.paused_between(1_000, 250_000) >= 60_000
    going = _view(status="paused", pauses="500:2000", paused_at_ms="30000")
    assert going.window_closes_ms(1_000, 40_000) == 61_000 + 1_000 + 10_000  # still running
    assert _view(paused_at_ms="30000").window_closes_ms(1_000, 40_000) == 61_000  # not paused


@given(
    spans=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 10**5)), max_size=6),
    going=st.one_of(st.none(), st.integers(0, 2 * 10**6)),
    admitted=st.lists(st.integers(0, 2 * 10**6), min_size=2, max_size=20),
    now=st.integers(0, 3 * 10**6),
)
def test_later_admissions_never_close_sooner(
    spans: list[tuple[int, int]], going: int | None, admitted: list[int], now: int
) -> None:
    """The pump bisects its steps by when their windows close: that order must follow the
    order of admission, whatever the pauses."""
    ordered: list[tuple[int, int]] = []
    end = 0
    for begins, length in sorted(spans):  # finished pauses, one after another
        start = max(begins, end)
        ordered.append((start, start + length))
        end = start + length
    view = dataclasses.replace(_view(), pauses=tuple(ordered))
    if going is not None and going >= end:
        view = dataclasses.replace(view, status="paused", paused_at_ms=going)
    now = max(now, *admitted)  # every step is in the past
    closes = [view.window_closes_ms(at, now) for at in sorted(admitted)]
    assert closes == sorted(closes)
