"""Reservations: ``POST /v1/sales/{sale}/reservations``, ``GET`` and ``DELETE
/v1/reservations/{id}``.

A reservation needs the buyer's bearer token, an admission token for that buyer and sale, and
an ``Idempotency-Key``. The admission is first bound to this one request in the sale's slot
(``lua/claim.lua``: one admission, one request, judged by Redis ``TIME``); the request then
goes to the in-process :class:`~allocator.sku_allocator.SkuAllocator`, which batches concurrent
requests for the SKU into one script call. A replay of the same key and body gets the same
answer; the same key with another body gets 422 ``idempotency_mismatch``.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from allocator.hold_scripts import Admit, ReserveRequest
from allocator.ids import hold_keys, route_of
from flashsale.errors import (
    Conflict,
    FlashsaleError,
    Forbidden,
    InvalidInput,
    InvalidToken,
    NotEnoughLeft,
    NotFound,
    RateLimited,
    SoldOut,
    Unavailable,
    out_of_range,
    refused_value,
    shown,
)
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.orders import HOLD_FOR, STATE_CAUSE, TERMINAL, OrderView, order_view
from flashsale.outages import is_outage
from flashsale.records import SEPARATORS, ClaimMember, HoldRecord, idempotency_key
from flashsale.timefmt import iso_ms
from gateway.catalog import ended_by_postgres, sku_limits
from gateway.http import buyer_of, json_body, json_response, rate_keys, rate_limit, sale_of
from gateway.state import (
    ALLOCATORS,
    ANNOUNCER,
    CLIENTS,
    COUNTERS,
    HOLDS,
    METRICS,
    QUEUE,
    SETTINGS,
    SIGNERS,
)  # fmt: skip

log = logging.getLogger("flashsale.gateway")
MAX_PAYMENT_TOKEN = 200

# Refusals of the reserve script, as HTTP answers.
REFUSALS: dict[str, tuple[type[FlashsaleError], str, str]] = {
    "limit_exceeded": (Conflict, "limit_exceeded", "per-buyer limit reached for this SKU"),
    "idempotency_mismatch": (
        InvalidInput, "idempotency_mismatch", "this Idempotency-Key was used for another request"
    ),
    "invalid_quantity": (InvalidInput, "invalid_quantity", "quantity must be a positive integer"),
    "not_started": (Conflict, "sale_not_started", "the sale has not started"),
    "paused": (Conflict, "sale_paused", "the sale is paused"),
    "ended": (Conflict, "sale_ended", "the sale has ended"),
    "unavailable": (Unavailable, "unavailable", "this SKU is not available right now; retry"),
}  # fmt: skip


# Decisions remembered for the request's idempotency key (lua/reserve.lua): a request they
# refused is refused again, whenever it is asked.
REMEMBERED = frozenset({"sold_out", "limit_exceeded", "invalid_quantity"})


def _refuse(outcome: str, holds_pending: bool = False, left: int | None = None) -> FlashsaleError:
    if outcome == "sold_out" and left:  # fewer than asked: a smaller request may be granted
        return NotEnoughLeft(left, holds_pending)
    if outcome == "sold_out":
        return SoldOut(holds_pending)
    kind, code, message = REFUSALS.get(outcome, (Unavailable, "unavailable", outcome))
    if kind is InvalidInput:
        field = "Idempotency-Key" if code == "idempotency_mismatch" else "quantity"
        return InvalidInput(field, message, code=code)
    return kind(message, code=code)


# An admission token past its deadline: the turn may have ended, or have been extended by a
# pause since the token was handed out (each admitted status answer carries the current one).
STALE_ADMISSION = ("this admission token has expired: the queue status answers with the "
                   "current one while your turn lasts")  # fmt: skip


def _admission(request: web.Request, sale_id: str, buyer: str) -> tuple[int, int]:
    """(position, deadline ms) of the request's admission token; 403 for any problem."""
    raw = request.headers.get("X-Admission-Token")
    if raw is None:
        raise Forbidden("an X-Admission-Token is required: wait for admission", code="not_admitted")
    if not raw:
        raise Forbidden("the X-Admission-Token header is empty: send the admission_token of the "
                        "admitted status answer", code="not_admitted")  # fmt: skip
    try:
        claims = request.app[SIGNERS].admission.verify(raw)
    except InvalidToken as exc:
        if exc.reason == "expired":
            raise Forbidden(STALE_ADMISSION, code="admission_expired") from None
        raise Forbidden(f"admission token refused ({exc.reason})",
                        code="admission_invalid") from None  # fmt: skip
    if claims.get("s") != sale_id:
        raise Forbidden("this admission is for another sale", code="admission_other_sale")
    if claims.get("sub") != buyer:
        raise Forbidden("this admission belongs to another buyer", code="admission_other_buyer")
    position, deadline = claims.get("p"), claims.get("d")
    if type(position) is not int or type(deadline) is not int or position < 1:
        raise Forbidden("admission token refused (malformed)", code="admission_invalid")
    return position, deadline


def _body(raw: dict[str, Any], limit: int) -> tuple[str, int, str]:
    sku, quantity, payment = raw.get("sku"), raw.get("quantity"), raw.get("payment_token")
    if not isinstance(sku, str) or not sku:
        raise InvalidInput("sku", refused_value(sku, "a SKU id of this sale"))
    if type(quantity) is not int and not out_of_range(quantity, 1, limit):
        raise InvalidInput("quantity", refused_value(quantity, "an integer"),
                           code="invalid_quantity")  # fmt: skip
    if type(quantity) is not int or not 1 <= quantity <= limit:
        rule = f"must be between 1 and the per-buyer limit {limit}"
        raise InvalidInput("quantity", f"{rule}, got {shown(quantity)}", code="invalid_quantity")
    if (
        not isinstance(payment, str) or not payment or len(payment) > MAX_PAYMENT_TOKEN
        or not payment.isprintable() or any(c in payment for c in SEPARATORS)
    ):  # fmt: skip
        rule = f"printable text of 1..{MAX_PAYMENT_TOKEN}"  # the token itself is not echoed
        raise InvalidInput("payment_token", f"must be {rule}" if payment else f"required: {rule}")
    return sku, quantity, payment


# Refusals of the admission claim (``lua/claim.lua``, or the gate of ``lua/reserve.lua`` as
# ``admission_<claim>``), as HTTP answers.
CLAIM_REFUSALS: dict[str, tuple[str, str]] = {
    "used": ("admission_used", "this admission was already used for another request"),
    "left": ("admission_left", "this place in line was given up: its buyer left the queue"),
    "expired": ("admission_expired", STALE_ADMISSION),
    "not_admitted": ("not_admitted", "this position has not been admitted"),
}


def _claim_refused(claim: str) -> FlashsaleError:
    if claim == "unavailable":
        return Unavailable("the waiting room is being restored; retry", code="unavailable")
    if claim == "mismatch":
        return InvalidInput("Idempotency-Key", "this key was used for another request",
                            code="idempotency_mismatch")  # fmt: skip
    code, message = CLAIM_REFUSALS.get(claim, ("admission_invalid", claim))
    return Forbidden(message, code=code)


async def _unless_ended(request: web.Request, sale_id: str,
                        refusal: FlashsaleError) -> FlashsaleError:  # fmt: skip
    """``refusal``, unless it is a 503 for Redis state that is gone (the SKU, the room) and
    Postgres says the sale ended (:func:`~gateway.catalog.ended_by_postgres`): 409
    ``sale_ended`` then. Postgres is read only for such a refusal."""
    if refusal.code == "unavailable" and await ended_by_postgres(request.app, sale_id):
        return Conflict(f"sale {sale_id} has ended", code="sale_ended")
    return refusal


def _gate(request: web.Request, buyer: str, member: str, deadline_ms: int) -> Admit:
    """The rate limits and the admission claim of a reserve, for the reserve script to check
    in the same call (a single Redis node; see lua/reserve.lua)."""
    return Admit(member, deadline_ms, rate_keys(request, buyer))


async def _claim(request: web.Request, sale_id: str, claim: ClaimMember, deadline_ms: int) -> None:
    """The admission claim on a Redis Cluster, made before the decision on the SKU's slot.
    While the sale is paused (as this process's counters say, at most 100 ms old) no claim is
    made: a refusal by the sale's state leaves its claim in place, since the same request asked
    again after the resume may be granted. A request that holds its claim already goes on, to
    be answered as it was."""
    app = request.app
    paused = (await app[COUNTERS].get(sale_id)).view.status == "paused"
    claimed = await app[QUEUE].claim(SaleKeys(sale_id), claim.position, claim.idempotency_key,
                                     claim.fingerprint, deadline_ms, paused=paused)  # fmt: skip
    if claimed == "paused":
        raise _refuse("paused")
    if claimed != "ok":
        app[METRICS].count(app[METRICS].reservations, f"admission_{claimed}")
        raise await _unless_ended(request, sale_id, _claim_refused(claimed))


async def reserve(request: web.Request) -> web.Response:
    """One Redis round trip on a single node: the rate limits, the admission claim and the
    decision are one script call (batched per SKU). On Redis Cluster the sale's claims and the
    SKU's stock live in different slots, so the rate limits and the claim go first."""
    app = request.app
    buyer = await buyer_of(request)
    sale_id = sale_of(request)
    gated = not app[SETTINGS].redis_cluster
    if not gated:
        await rate_limit(request, buyer)
    limits = await sku_limits(request, sale_id)  # 404 for an unknown sale comes first
    position, deadline_ms = _admission(request, sale_id, buyer)
    key = idempotency_key(request.headers.get("Idempotency-Key"), required=True)
    assert key is not None
    raw = await json_body(request, allowed={"sku", "quantity", "payment_token"})
    sku = raw.get("sku")
    if isinstance(sku, str) and sku not in limits:  # a SKU added since the copy was read?
        limits = await sku_limits(request, sale_id, sku)
    limit = limits[sku].limit if isinstance(sku, str) and sku in limits else 1
    sku, quantity, payment = _body(raw, limit)
    if sku not in limits:
        raise NotFound(f"unknown SKU {shown(sku)} in sale {sale_id}", code="unknown_sku")
    metrics = app[METRICS]
    claim = ClaimMember.of(position, key, sku, quantity, payment)
    admit = None
    if gated:
        admit = _gate(request, buyer, claim.encode(), deadline_ms)
    else:
        await _claim(request, sale_id, claim, deadline_ms)
    allocator = app[ALLOCATORS].for_sku(sale_id, sku, limits[sku].buckets)
    fresh = allocator.new_id(buyer)
    asked = ReserveRequest(fresh, buyer, quantity, key, payment, str(position), admit)
    result = await allocator.reserve(asked)
    outcome = result.outcome
    metrics.count(metrics.reservations, outcome)
    if outcome == "rate_limited":
        raise RateLimited("too many requests; slow down",
                          retry_after_s=(result.wait_us or 0) / 1_000_000)  # fmt: skip
    if outcome == "not_admitted" or outcome.startswith("admission_"):
        raise await _unless_ended(
            request, sale_id, _claim_refused(outcome.removeprefix("admission_"))
        )
    if outcome != "reserved":
        # A hot SKU's buckets do not remember a sold_out (it says only that one is empty): a
        # final one is remembered for the key, as any SKU's (a replay of it has left 0),
        # unless a replay of the request was decided meanwhile (and may hold a grant).
        remembered = (
            limits[sku].buckets == 1
            or outcome != "sold_out"
            or result.left == 0
            or (result.left is None and await allocator.remember(asked, result))
        )
        if not gated and outcome in REMEMBERED and remembered:
            # A refusal the request would be given again uses no admission up: its claim is
            # marked refused, so another key may claim the admission while the turn lasts
            # (with the gate the reserve script marks it itself). Marked while a replay could
            # still be granted, the admission could buy twice.
            await app[QUEUE].refused(SaleKeys(sale_id), position, key, claim.fingerprint)
        raise await _unless_ended(
            request, sale_id, _refuse(outcome, result.holds_pending, result.left)
        )
    rid, expires_ms = result.reservation_id, result.hold_expires_at_ms
    assert rid is not None and expires_ms is not None
    # The hold as it stands now (a replay's may have moved on since it was granted), and its
    # event, both returned with the decision: published before the buyer hears of it (see
    # gateway.announcer).
    granted = app[HOLDS].created(hold_keys(sale_id, sku, rid), result)
    if granted is None:  # Redis lost it just now: the reconciler restores what it can
        raise Unavailable("the reservation is being restored; retry with the same "
                          "Idempotency-Key", code="unavailable")  # fmt: skip
    hold, event = granted
    if hold.state == "ACTIVE":
        try:
            await app[ANNOUNCER].announce(event)
        except Exception:
            metrics.count(metrics.reservations, "unannounced")
            raise
    state, cause = hold.state, hold.cause or None
    log.info("reservation %s", state.lower(), extra={"reservation_id": rid, "sale": sale_id,
                                                     "sku": sku})  # fmt: skip
    return json_response(
        {
            "reservation_id": rid,
            "state": state,
            "cause": cause,
            "sku": sku,
            "quantity": quantity,
            "hold_expires_at": iso_ms(expires_ms),
            "message": "order processing" if state in ("ACTIVE", "PAYING") else state.lower(),
        },
        201,
    )


async def _owned_hold(request: web.Request) -> tuple[str, SkuKeys, HoldRecord | OrderView]:
    """The caller's hold; where Redis no longer has it (an archived sale, a hold Redis lost),
    the reservation's order, if the order store knows it as the caller's. 404 for unknown ids
    and for other buyers' reservations alike."""
    buyer = await buyer_of(request)
    reservation_id = request.match_info["id"]
    keys = route_of(reservation_id)
    if keys is not None:
        raw = await request.app[HOLDS].hold(keys, reservation_id)
        if raw is not None:
            hold = HoldRecord.parse(raw)
            if hold.buyer_id == buyer:
                return reservation_id, keys, hold
        else:  # Postgres down here is a 503 (the middleware): the answer is not known yet
            order = await order_view(request.app[CLIENTS].pool, reservation_id)
            if order is not None and order.buyer_id == buyer:
                return reservation_id, keys, order
    raise NotFound(f"no reservation {shown(reservation_id)} of yours", code="unknown_reservation")


async def _reservation_json(request: web.Request, rid: str, keys: SkuKeys,
                            owned: HoldRecord | OrderView) -> dict[str, Any]:  # fmt: skip
    """The hold as Redis has it, with its order. Without the hold, its order alone: final, or
    503 while the hold is being restored (the order cannot tell an ACTIVE hold's deadline)."""
    body: dict[str, Any] = {"reservation_id": rid, "sale_id": keys.sale_id, "sku": keys.sku}
    if isinstance(owned, OrderView):
        if owned.state not in TERMINAL:
            raise Unavailable("this reservation is being restored; retry", code="unavailable")
        return {**body, "quantity": owned.quantity, "state": HOLD_FOR[owned.state],
                "cause": STATE_CAUSE.get(owned.state), "hold_expires_at": None,
                "order": owned.json()}  # fmt: skip
    try:
        order = await order_view(request.app[CLIENTS].pool, rid)
    except Exception as exc:
        if not is_outage(exc):
            raise
        order = None  # Postgres is down: the hold, which Redis has, is the answer for now
    return {**body, "quantity": owned.quantity, "state": owned.state,
            "cause": owned.cause or None, "hold_expires_at": iso_ms(owned.deadline_ms),
            "order": None if order is None else order.json()}  # fmt: skip


async def get_reservation(request: web.Request) -> web.Response:
    rid, keys, owned = await _owned_hold(request)
    return json_response(await _reservation_json(request, rid, keys, owned))


async def cancel_reservation(request: web.Request) -> web.Response:
    rid, keys, owned = await _owned_hold(request)
    if isinstance(owned, OrderView):  # only its order is left: released (cancel again), or sold
        body = await _reservation_json(request, rid, keys, owned)
        if body["state"] == "SOLD":
            raise Conflict("reservation is SOLD: cannot cancel", code="already_sold")
        return json_response(body)
    await rate_limit(request)
    result = await request.app[HOLDS].cancel(keys, rid)
    if not result.ok:
        code = {"SOLD": "already_sold", "PAYING": "payment_in_progress"}.get(result.state)
        raise Conflict(f"reservation is {result.state}: cannot cancel", code=code or "conflict")
    hold = HoldRecord.parse(await request.app[HOLDS].hold(keys, rid) or b"")
    metrics = request.app[METRICS]
    metrics.count(metrics.reservations, "cancelled")
    return json_response(await _reservation_json(request, rid, keys, hold))


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/sales/{sale}/reservations", reserve)
    app.router.add_get("/v1/reservations/{id}", get_reservation)
    app.router.add_delete("/v1/reservations/{id}", cancel_reservation)
