"""How long a waiting buyer has left: the p50 and p90 of the wait that the status answers
quote (``eta_seconds``).

Before the pump's first admissions (the sale has not opened, or has just opened), the wait is
the time to the opening, plus the pump's first step (seal, draw, admit: ``OPENING_*``), plus
the buyer's turn at the sale's configured rate beyond the burst the pump admits at once (the
credit it saved up, half a second of the rate). A buyer in the pre-queue does not know their
place yet: it is drawn uniformly among everyone in the pre-queue at the opening, so the
quantiles are those of a place drawn among the places the stock can reach (``reach``: the
units over the share of admitted buyers expected to show up) or, when fewer buyers than that
will be drawn, among those: the pre-queue as it is, plus the buyers still to join before the
opening at the rate they join now. That is the wait of a buyer who gets in; one drawn beyond
the reach is told ``sold_out`` once the stock is gone.

Once the pump admits, the wait is the buyer's turn at the rates it measured (the median and
the 10th percentile of admissions per second over the last few seconds; the p90 also waits
for the pump's next step). It is unknown (``None``) while the pump measures no rate, and when
the units free now do not reach the buyer's place (admitted buyers expected to show up
already hold them): that wait is for held units to come back (declined payments, lapsed
admissions, expired holds), which nobody can time.
"""

from __future__ import annotations

import math

from allocator.queue_view import QueueView

OPENING_P50_S = 0.2  # from the opening to the first admissions: about two pump steps
# ... and to the second wave, admitted as the first buyers' reservations settle (measured up
# to 0.5 s after the first in the 50,000-buyer demo)
OPENING_P90_S = 0.7
STEP_S = 0.2  # an admission waits for the pump's next step (0.1 s apart), plus rounding
STALLED_MS = 5_000  # no pump step for this long since the opening: the allocator is down
BURST_S = 0.5  # the pump's saved-up credit at the opening, in seconds of the rate
PRIOR_SPREAD = 0.8  # until measured, the rate's 10th percentile is this share of the rate


def reach(v: QueueView) -> int | None:
    """How many places the stock can serve at the current no-show rate; None when the pump
    has not reported the stock yet."""
    if v.available is None or v.held is None:
        return None
    show = max(0.05, 1.0 - v.noshow)
    return math.ceil((v.available + v.held) / show)


def estimate(
    v: QueueView, position: int, now_ms: int, joining: float = 0.0
) -> tuple[float | None, float | None]:
    """(p50, p90) seconds until the buyer at ``position`` (0: in the pre-queue, not drawn
    yet) is admitted; None where nothing honest can be said (paused, no measured rate).
    ``joining``: buyers joining the pre-queue per second now (they are drawn too)."""
    if v.status != "active":
        return None, None
    if now_ms - max(v.beat_ms, v.starts_at_ms) > STALLED_MS:
        return None, None  # no pump has stepped for a while: nobody can say when one will
    if v.serving == 0:  # nobody admitted yet: the opening and the configured rate
        until = max(0.0, (v.starts_at_ms - now_ms) / 1000)
        if position == 0:
            drawn = v.pre if v.sealed else v.pre + math.floor(max(0.0, joining) * until)
            places = max(1, min(drawn, reach(v) or drawn))
            turn50, turn90 = math.ceil(0.5 * places), math.ceil(0.9 * places)
        else:
            turn50 = turn90 = position
        burst = v.admission_rate * BURST_S
        p50 = until + OPENING_P50_S + max(0.0, turn50 - burst) / v.admission_rate
        p90 = until + OPENING_P90_S + max(0.0, turn90 - burst) / (v.admission_rate * PRIOR_SPREAD)
        return round(p50, 1), round(p90, 1)
    if beyond_free_units(v, position):
        return None, None
    ahead = max(0, position - v.serving)  # the buyer's turn, counting their own admission
    rate50 = v.rate_p50 if v.beat_ms else v.admission_rate
    rate10 = v.rate_p10 if v.beat_ms else v.admission_rate * PRIOR_SPREAD
    return _wait(ahead, rate50, 0.0), _wait(ahead, rate10, STEP_S)


def beyond_free_units(v: QueueView, position: int) -> bool:
    """Whether the units free now, for the buyers expected to show up, do not reach the waiting
    buyer at ``position``: only held units that come back can (a waitlist). False while the
    sale is not running its queue (not active, nobody admitted yet) or its stock is unknown."""
    if v.status != "active" or v.serving == 0 or v.available is None or position <= v.serving:
        return False
    show = max(0.05, 1.0 - v.noshow)
    room = math.ceil(max(0.0, v.available - v.outstanding * show) / show)
    return position - v.serving > room


def _wait(turn: int, rate: float, margin: float) -> float | None:
    return round(turn / rate + margin, 1) if rate > 0 else None
