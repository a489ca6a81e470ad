"""The waiting room: ``POST /v1/sales/{sale}/queue`` and ``GET .../queue/status``.

Joining is one Lua call (``lua/join.lua``), shared by the joins that arrive within a
millisecond in this process (:class:`~allocator.queue_scripts.Joins`). Polling is answered from the
signed ticket and this process's copy of the sale's counters (:mod:`gateway.counters`,
refreshed at most every 100 ms), so a poll costs no Redis round trip in the common case. Redis is
asked only at two moments of a buyer's wait: the first poll after the pre-queue shuffle (to
learn the assigned position), and after an admission window closed (to tell "reserved" from
"lapsed").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from allocator.queue_view import QueueView
from flashsale.errors import Conflict, QueueFull, RateLimited, Unavailable
from flashsale.keys import SaleKeys
from flashsale.sales import sale_state
from flashsale.tokens import Signer
from gateway import challenge
from gateway.catalog import ended_by_postgres
from gateway.counters import Counters
from gateway.eta import beyond_free_units, estimate
from gateway.http import buyer_of, json_response, queue_ticket, rate_keys, rate_limit, sale_of
from gateway.state import (
    COUNTERS,
    JOINS,
    MARKS,
    METRICS,
    PLACES,
    QUEUE,
    SALES,
    SETTINGS,
    SIGNERS,
)

TICKET_GRACE_S = 3600  # tickets outlive the sale's end by this much
TICKET_RENEW_SLACK_S = 60  # a ticket is signed again once the sale's end moved later by more
MIN_RETRY_MS, MAX_RETRY_MS = 250, 10_000
# A buyer whose turn came polls once a second while choosing: enough to learn of a pause, a
# sell-out or the turn passing, without four status requests a second beside the reserves.
ADMITTED_RETRY_MS = 1000


# -- answers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    state: str  # waiting | admitted | sold_out | expired
    position: int | None
    ahead: int | None
    eta_p50: float | None
    eta_p90: float | None
    retry_after_ms: int
    admission_deadline_ms: int | None = None  # admitted: Redis time the window closes
    check_claim: bool = False  # the window closed: ask Redis whether the buyer reserved

    def body(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "position": self.position,
            "ahead": self.ahead,
            "eta_seconds": {"p50": self.eta_p50, "p90": self.eta_p90},
            "retry_after_ms": self.retry_after_ms,
        }


def status_of(c: Counters, position: int, now_ms: int) -> Status:
    """The state of the buyer at ``position`` (0: still in the unshuffled pre-queue)."""
    v = c.view
    if v.status == "ended" or now_ms >= v.ends_at_ms:
        state = "sold_out" if v.sold_out else "expired"
        return Status(state, position or None, None, None, None, MAX_RETRY_MS)
    if position == 0:  # pre-queue: the order is drawn at the start
        p50, p90 = estimate(v, 0, now_ms, c.join_rate)
        wait = max(0.0, (v.starts_at_ms - now_ms) / 1000)
        retry = max(MIN_RETRY_MS, min(MAX_RETRY_MS, int(wait * 250)))
        return Status("waiting", None, None, p50, p90, retry)
    if v.sold_out or (v.cutoff is not None and position > v.cutoff):
        return Status("sold_out", position, None, None, None, MAX_RETRY_MS)
    if position <= v.serving:
        at = c.admitted_at_ms(position)  # the window does not run while the sale is paused
        deadline = None if at is None else v.window_closes_ms(at, now_ms)
        if deadline is None or deadline <= now_ms:
            return Status("expired", position, 0, None, None, MAX_RETRY_MS, check_claim=True)
        return Status("admitted", position, 0, 0.0, 0.0, ADMITTED_RETRY_MS, deadline)
    ahead = position - v.serving - 1
    p50, p90 = estimate(v, position, now_ms)
    # A quarter of the wait; when it is unknown (held units must come back, a paused sale),
    # the soonest the configured rate could reach the place: the front learns of its turn.
    soonest_ms = (p50 * 250) if p50 is not None else (ahead * 1000 / max(1, v.admission_rate))
    retry = max(MIN_RETRY_MS, min(MAX_RETRY_MS, int(soonest_ms)))
    return Status("waiting", position, ahead, p50, p90, retry)


# -- routes ---------------------------------------------------------------------------------


def sign_ticket(signer: Signer, sale_id: str, buyer: str, position: int, v: QueueView, *,
                left: bool = False) -> str:  # fmt: skip
    """A queue ticket for ``position``, lasting until the sale's end and its grace; ``left``:
    one for a place its buyer gave up (polls with it are answered ``left`` at once)."""
    ttl = max(60.0, v.ends_at_ms / 1000 - time.time() + TICKET_GRACE_S)
    claims = {"s": sale_id, "sub": buyer, "p": position}
    return signer.sign({**claims, "left": 1} if left else claims, ttl)


def outlived(claims: dict[str, Any], v: QueueView) -> bool:
    """Whether the ticket expires before the sale's end (and its grace) now falls: the sale was
    moved later after the ticket was signed. A poll hands out one that lasts."""
    return bool(claims["exp"] + TICKET_RENEW_SLACK_S < v.ends_at_ms / 1000 + TICKET_GRACE_S)


async def join(request: web.Request) -> web.Response:
    app = request.app
    buyer = await buyer_of(request)
    sale_id = sale_of(request)
    metrics = app[METRICS]
    known = app[COUNTERS].peek(sale_id)
    if known is not None and known.view.sold_out:
        # Sold out for good (no unit left, none held): the answer every buyer gets, queued or
        # not, so this process gives it without asking Redis, not even for the rate limit.
        metrics.count(metrics.joins, "sold_out")
        return json_response({"ticket": None, "position": None, "state": "sold_out"})
    bits = (await app[COUNTERS].get(sale_id)).view.challenge
    # On a single Redis node the join script counts the rate limits itself (one round trip).
    # On a cluster their keys live in other slots; with a challenge, a request over its limit
    # must be refused before it spends its challenge.
    limits = None
    if app[SETTINGS].redis_cluster or bits:
        await rate_limit(request, buyer)
    else:
        limits = rate_keys(request, buyer)
    if bits:
        await challenge.check(request, sale_id, buyer, bits)
    result = await app[JOINS].join(SaleKeys(sale_id), buyer, limits)
    outcome = result.outcome
    if outcome == "rate_limited":
        raise RateLimited("too many requests; slow down", retry_after_s=result.position / 1e6)
    if outcome == "unavailable":
        sale = await app[SALES].row(sale_id, named=False)  # NotFound for an unknown sale
        if sale_state(sale) == "ended":  # no restore changes that (none comes for an old sale)
            raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
        if sale["preloaded_at"] is not None:  # Redis lost the waiting room: being restored
            raise Unavailable("the waiting room is being restored; retry", code="unavailable")
        if sale_state(sale) == "live":  # the merchant's to mend: FlashsaleSaleNotPreloaded
            raise Conflict(f"sale {sale_id} is open but its waiting room is not ready yet (it "
                           "was not preloaded); retry shortly", code="sale_not_open")  # fmt: skip
        raise Conflict(f"sale {sale_id} is not open for queueing yet", code="sale_not_open")
    if outcome == "ended":
        raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
    if outcome == "full":
        metrics.count(metrics.joins, "full")
        raise QueueFull("the waiting room is full; try again later")
    if outcome == "sold_out":
        metrics.count(metrics.joins, "sold_out")
        return json_response({"ticket": None, "position": None, "state": "sold_out"})
    counters = await app[COUNTERS].get(sale_id)
    if outcome == "left":  # the buyer gave this place up: it stays given up
        metrics.count(metrics.joins, "rejoined_left")
        return left_answer(app, sale_id, buyer, result.position, counters.view)
    position = result.position
    app[MARKS].note_position(sale_id, position)
    metrics.count(metrics.joins, "pre_queue" if position == 0 else "queued")
    ticket = sign_ticket(app[SIGNERS].ticket, sale_id, buyer, position, counters.view)
    status = status_of(counters, position, counters.redis_now_ms())
    body = {"ticket": ticket, "position": position or None, "state": status.state,
            "pre_queue": position == 0}  # fmt: skip
    return json_response(body)


async def queue_status(request: web.Request) -> web.Response:
    app = request.app
    sale_id = sale_of(request)
    claims, buyer, position = queue_ticket(request, sale_id)
    metrics = app[METRICS]
    if claims.get("left"):  # the ticket leaving the queue handed out: nothing to look up
        metrics.count(metrics.polls, "left", "ticket")
        return json_response(Status("left", position, None, None, None, MAX_RETRY_MS).body())
    counters = await app[COUNTERS].get(sale_id)
    if not (counters.view.live and counters.view.preloaded):
        # Redis lost the room or the sale's hash (the ticket proves both existed): nothing here
        # is true until the reconciler restores them, so no verdict, least of all "expired";
        # unless Postgres says the sale ended, which no restore changes.
        if await ended_by_postgres(app, sale_id):
            metrics.count(metrics.polls, "expired", "postgres")
            return json_response(Status("expired", position or None, None, None, None,
                                        MAX_RETRY_MS).body())  # fmt: skip
        raise Unavailable("the waiting room is being restored; retry", code="unavailable")
    queue, keys, source = app[QUEUE], SaleKeys(sale_id), "cache"
    body: dict[str, Any] = {}
    if position == 0 and counters.view.shuffled:
        assigned = await app[PLACES].position_of(keys, buyer)
        source = "redis"
        if assigned:
            position = assigned
            body["ticket"] = sign_ticket(
                app[SIGNERS].ticket, sale_id, buyer, position, counters.view
            )
    if "ticket" not in body and outlived(claims, counters.view):
        body["ticket"] = sign_ticket(app[SIGNERS].ticket, sale_id, buyer, position, counters.view)
    now_ms = counters.redis_now_ms()
    status = status_of(counters, position, now_ms)
    if status.check_claim:
        source = "redis"
        used = await queue.used_by(keys, position)
        if used == "reserved":
            status = Status("admitted", position, 0, 0.0, 0.0, MAX_RETRY_MS)
            body["reserved"] = True
        elif used == "left":  # given up on another device, whose ticket could not say so
            status = Status("left", position, None, None, None, MAX_RETRY_MS)
    body.update(status.body())
    if counters.view.status == "paused" and status.state in ("waiting", "admitted"):
        body["paused"] = True  # nobody is admitted or reserves; an admitted turn is kept
    if status.state == "waiting" and position and beyond_free_units(counters.view, position):
        body["waitlist"] = True  # every unit left is held ahead: only returns reach this place
    if counters.view.status == "ended" or now_ms >= counters.view.ends_at_ms:
        body["ended"] = True  # over for everyone: no turn passed, none is coming
    if status.admission_deadline_ms is not None:
        deadline_s = status.admission_deadline_ms / 1000 - counters.offset_ms / 1000
        body["admission_token"] = app[SIGNERS].admission.sign(
            {"s": sale_id, "sub": buyer, "p": position, "d": status.admission_deadline_ms},
            ttl_s=deadline_s - time.time(),
        )
        body["admission_expires_in_ms"] = status.admission_deadline_ms - now_ms
        reservations_url = app[SETTINGS].reservations_url
        if reservations_url:  # the listener kept for admitted buyers (docs/ARCHITECTURE.md)
            body["reserve_url"] = f"{reservations_url}/v1/sales/{sale_id}/reservations"
        metrics.admissions.inc()
    metrics.count(metrics.polls, status.state, source)
    return json_response(body)


async def leave(request: web.Request) -> web.Response:
    """``DELETE /v1/sales/{sale}/queue``: the ticket holder gives up their place. Its admission
    can no longer be used, and the pump stops counting on the buyer. The answer carries a
    ticket that says so (polls with it are answered ``left``)."""
    app = request.app
    sale_id = sale_of(request)
    _, buyer, position = queue_ticket(request, sale_id)
    await rate_limit(request, buyer)
    keys = SaleKeys(sale_id)
    if position == 0:  # a pre-queue ticket: its place may have been drawn since
        position = await app[PLACES].position_of(keys, buyer) or 0
    if position == 0:
        raise Conflict("your place is drawn when the sale starts; leave once you have one",
                       code="not_placed_yet")  # fmt: skip
    outcome = await app[QUEUE].leave(keys, position)
    if outcome == "unavailable":
        if await ended_by_postgres(app, sale_id):  # as for a join
            raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
        raise Unavailable("the waiting room is being restored; retry", code="unavailable")
    if outcome == "reserved":
        raise Conflict("this place was already used for a reservation: cancel that instead",
                       code="already_reserved")  # fmt: skip
    metrics = app[METRICS]
    metrics.count(metrics.joins, "left")
    counters = await app[COUNTERS].get(sale_id)
    return left_answer(app, sale_id, buyer, position, counters.view)


def left_answer(app: web.Application, sale_id: str, buyer: str, position: int,
                v: QueueView) -> web.Response:  # fmt: skip
    """The answer about a place its buyer gave up, with a ticket that says so."""
    ticket = sign_ticket(app[SIGNERS].ticket, sale_id, buyer, position, v, left=True)
    return json_response({"state": "left", "position": position, "ticket": ticket})


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/sales/{sale}/queue", join)
    app.router.add_delete("/v1/sales/{sale}/queue", leave)
    app.router.add_get("/v1/sales/{sale}/queue/status", queue_status)
