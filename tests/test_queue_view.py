"""When the operators' summary says a waiting room is full (``QueueView.full``): when
``lua/join.lua`` turns a newcomer away with 503 queue_full, and only then. Over HTTP, against
the script itself: tests/test_gateway_queue.py."""

from __future__ import annotations

import dataclasses

from allocator.queue_view import QUEUE_FIELDS, ROOM_SALE_FIELDS, QueueView

STARTS, ENDS = 10_000, 100_000  # the sale's window (Redis ms)
SALE = {"status": "active", "starts_at_ms": str(STARTS), "ends_at_ms": str(ENDS),
        "max_queue": "2"}  # fmt: skip


def _room(**counters: object) -> QueueView:
    view = QueueView.parse([SALE.get(name) for name in ROOM_SALE_FIELDS],
                           [None] * len(QUEUE_FIELDS))  # fmt: skip
    return dataclasses.replace(view, **counters)  # type: ignore[arg-type]


def test_before_the_start_the_draws_registrations_fill_it() -> None:
    assert not _room(pre=1).full(STARTS - 1)
    assert _room(pre=2).full(STARTS - 1)


def test_after_the_start_the_buyers_not_admitted_yet_fill_it() -> None:
    # The first join after the start seals the pre-queue: its registrations are the line.
    assert _room(pre=2).full(STARTS)
    assert _room(sealed=True, tail=5, serving=3).full(STARTS + 1)
    assert not _room(sealed=True, tail=5, serving=4).full(STARTS + 1)


def test_a_line_closed_to_newcomers_an_ended_sale_or_an_unknown_cap_is_never_full() -> None:
    # Newcomers are told sold out there, never queue_full.
    assert not _room(sealed=True, tail=5, serving=0, cutoff=5).full(STARTS + 1)
    assert not _room(sealed=True, tail=5, serving=0, sold_out=True).full(STARTS + 1)
    assert not _room(sealed=True, tail=5, serving=0).full(ENDS)
    assert not _room(sealed=True, tail=5, serving=0, status="ended").full(STARTS + 1)
    assert not _room(sealed=True, tail=5, serving=0, max_queue=0).full(STARTS + 1)
