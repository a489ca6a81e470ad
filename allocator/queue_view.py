"""What one read of a sale's waiting room gives: its configuration and counters as a
:class:`QueueView` (how many still wait, whether a newcomer may still join, the summary
operators read), and the pump's admission steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flashsale.queue_marks import Mark
from flashsale.records import integer, number, text
from flashsale.timefmt import iso_ms

# Fields of the sale hash (put there by preload) that the waiting room reads.
ROOM_SALE_FIELDS = (
    "status", "starts_at_ms", "ends_at_ms", "admission_rate", "window_ms", "capacity",
    "challenge", "challenge_max", "pauses", "paused_at_ms", "max_queue",
)  # fmt: skip
QUEUE_FIELDS = (
    "serving", "cutoff", "tail", "pre", "sealed", "shuffled", "sold_out",
    "rate_p50", "rate_p10", "noshow", "outstanding", "beat_ms", "live", "restored_ms",
    "available", "held", "sold_out_ms", "rate_measured",
)  # fmt: skip


def still_waiting(tail: int, serving: int, cutoff: int | None, sold_out: bool) -> int:
    """Buyers holding a place who may still be admitted: those behind the last admitted one,
    up to the cutoff (a place beyond it is told sold out at once); none once sold out."""
    if sold_out:
        return 0
    return max(0, (tail if cutoff is None else min(tail, cutoff)) - serving)


@dataclass(frozen=True, slots=True)
class QueueView:
    """One consistent read of a sale's configuration and waiting-room counters."""

    preloaded: bool
    status: str
    starts_at_ms: int
    ends_at_ms: int
    admission_rate: int
    window_ms: int
    capacity: int
    serving: int
    cutoff: int | None  # the last position that may ever be admitted; None: not yet known
    tail: int
    pre: int
    sealed: bool
    shuffled: bool
    sold_out: bool
    rate_p50: float  # measured admissions per second (median, and 10th percentile) ...
    rate_p10: float  # ... or, while nobody has waited long enough, the configured rate
    noshow: float
    outstanding: int
    beat_ms: int  # Redis time of the pump's last step (0: no pump has run)
    live: bool  # the waiting room is open in Redis (False: never opened, or lost)
    restored_ms: int = 0  # Redis time of the last restore after a loss (0: never lost)
    challenge: int = 0  # the join's proof-of-work difficulty in bits (0: none asked)
    challenge_max: int = 0  # the most it rises to with the join rate (0: fixed)
    available: int | None = None  # units free and held, as the pump last read them
    held: int | None = None
    sold_out_ms: int = 0  # Redis time the pump found the sale sold out (0: not, or unknown)
    pauses: tuple[tuple[int, int], ...] = ()  # the sale's finished pauses (lua/lib.lua)
    paused_at_ms: int = 0  # the pause going on began then (0: none)
    max_queue: int = 0  # buyers not yet admitted the line holds at most (0: not known)
    rate_measured: bool = False  # rate_p50 is measured (buyers waited), not the configured rate

    def paused_between(self, start_ms: int, end_ms: int) -> int:
        """How long the sale was paused between two Redis times."""
        spans = self.pauses
        if self.status == "paused" and self.paused_at_ms:
            spans = (*spans, (self.paused_at_ms, end_ms))
        return sum(max(0, min(e, end_ms) - max(s, start_ms)) for s, e in spans) if spans else 0

    def window_closes_ms(self, admitted_ms: int, now_ms: int) -> int:
        """Redis time the admission window of a buyer admitted at ``admitted_ms`` closes, as
        of ``now_ms``: the window is ``window_ms`` of the sale not paused (a pause does not use
        up a turn). It never falls as ``admitted_ms`` grows, so steps can be bisected by it."""
        return admitted_ms + self.window_ms + self.paused_between(admitted_ms, now_ms)

    def waiting(self, now_ms: int) -> int:
        """Buyers in line who may still be admitted at ``now_ms`` (Redis time): none once
        the sale is sold out or over, whatever places were handed out."""
        if self.status == "ended" or now_ms >= self.ends_at_ms:
            return 0
        return still_waiting(self.tail, self.serving, self.cutoff, self.sold_out)

    def stranded(self, now_ms: int) -> int:
        """Units free that nobody can buy any more, as the pump last counted them: the line
        is closed to newcomers and nobody in it is left to admit or within a turn, as more
        buyers walked away than the cutoff allowed for. 0 once the sale is over."""
        if self.status == "ended" or now_ms >= self.ends_at_ms or self.sold_out:
            return 0
        if not self.closed_to_newcomers or self.waiting(now_ms) or self.outstanding:
            return 0
        return self.available or 0

    def full(self, now_ms: int) -> bool:
        """Whether a buyer joining at ``now_ms`` is turned away with 503 queue_full
        (lua/join.lua): the line holds ``max_queue`` buyers not admitted yet (before the
        start, the draw's registrations). Never once the line is closed to newcomers, who
        are told it is sold out instead."""
        if not self.max_queue or self.status == "ended" or now_ms >= self.ends_at_ms:
            return False
        if self.closed_to_newcomers:
            return False
        if not self.sealed and now_ms < self.starts_at_ms:
            return self.pre >= self.max_queue
        line = self.tail if self.sealed else self.pre  # the first join after the start seals
        return line - self.serving >= self.max_queue

    @property
    def closed_to_newcomers(self) -> bool:
        """Whether a buyer joining now is told the sale is sold out (lua/join.lua): it sold
        out, or the line reaches the cutoff, the last place the pump will ever admit. That
        stays so: the line only grows and the cutoff only moves back."""
        reached = self.sealed and self.cutoff is not None and self.tail >= self.cutoff
        return self.sold_out or reached

    def summary(self, now_ms: int, cap: int) -> dict[str, Any]:
        """The waiting room as operators read it at ``now_ms`` (Redis time): `sale status`,
        the admin API's sale and the live page. ``cap``: the sale's own queue cap (Postgres),
        said while Redis has none (before the preload)."""
        return {
            "live": self.live, "pre_queue": self.pre, "waiting": self.waiting(now_ms),
            "admitted": self.serving, "joined": self.tail, "cutoff": self.cutoff,
            "sold_out": self.sold_out,
            "sold_out_at": iso_ms(self.sold_out_ms) if self.sold_out_ms else None,
            "closed_to_newcomers": self.closed_to_newcomers,
            "stranded": self.stranded(now_ms),
            "max_queue": self.max_queue or cap, "full": self.full(now_ms),
        }  # fmt: skip

    def mark(self) -> Mark:
        """These counters as a queue mark (what a restore must not go below)."""
        return Mark(self.tail, self.serving, self.pre, self.cutoff, self.sealed, self.shuffled,
                    self.sold_out)  # fmt: skip

    @classmethod
    def parse(cls, sale: list[Any], queue: list[Any]) -> QueueView:
        s = dict(zip(ROOM_SALE_FIELDS, sale, strict=True))
        q = dict(zip(QUEUE_FIELDS, queue, strict=True))
        cutoff = integer(q["cutoff"], -1)
        return cls(
            preloaded=s["status"] is not None,
            status=text(s["status"]) if s["status"] is not None else "",
            starts_at_ms=integer(s["starts_at_ms"]),
            ends_at_ms=integer(s["ends_at_ms"]),
            admission_rate=integer(s["admission_rate"], 1),
            window_ms=integer(s["window_ms"], 60_000),
            capacity=integer(s["capacity"], 1000),
            serving=integer(q["serving"]),
            cutoff=None if cutoff < 0 else cutoff,
            tail=integer(q["tail"]),
            pre=integer(q["pre"]),
            sealed=integer(q["sealed"]) == 1,
            shuffled=integer(q["shuffled"]) == 1,
            sold_out=integer(q["sold_out"]) == 1,
            rate_p50=number(q["rate_p50"]),
            rate_p10=number(q["rate_p10"]),
            noshow=number(q["noshow"]),
            outstanding=integer(q["outstanding"]),
            beat_ms=integer(q["beat_ms"]),
            live=integer(q["live"]) == 1,
            restored_ms=integer(q["restored_ms"]),
            challenge=integer(s["challenge"]),
            challenge_max=integer(s["challenge_max"]),
            available=None if q["available"] is None else integer(q["available"]),
            held=None if q["held"] is None else integer(q["held"]),
            sold_out_ms=integer(q["sold_out_ms"]),
            pauses=_spans(s["pauses"]),
            paused_at_ms=integer(s["paused_at_ms"]),
            max_queue=integer(s["max_queue"]),
            rate_measured=integer(q["rate_measured"]) == 1,
        )


def _spans(raw: Any) -> tuple[tuple[int, int], ...]:
    """A sale hash's ``pauses``: "start:end,start:end" (ms)."""
    if not raw:
        return ()
    pairs = (span.partition(":") for span in text(raw).split(","))
    return tuple((int(start), int(end)) for start, _, end in pairs)


@dataclass(frozen=True, slots=True)
class Step:
    """The pump admitted every position up to ``to`` at ``at_ms`` (Redis time)."""

    to: int
    at_ms: int

    @classmethod
    def parse(cls, member: Any) -> Step:
        to, _, at = text(member).partition(":")
        return cls(int(to), int(at))
