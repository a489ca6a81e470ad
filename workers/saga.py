"""The order saga, a batch of reservation events at a time.

For each ``reservation.created`` (DESIGN §3 step 5)::

    already finished?    ->  skip (the order row, keyed by the reservation id, is the dedupe)
    hold ACTIVE->PAYING  ->  order inserted PAYING (log: order.created in PAYING)
                         ->  charge (idempotency key = reservation id)
                         ->  captured: hold PAYING->SOLD, then order CONFIRMED + sold += qty
                             declined: hold ->RELEASED (stock back), then order PAYMENT_FAILED
                             with the payment row (CAPTURED, DECLINED; UNKNOWN if no answer)

The hold moves first, so the order is written once in the state its hold is already in:
PAYING, or terminal when the hold was released before the worker got to it (an order the
hold of which Redis has lost is written PENDING and left to the reconciler). The order and
its log row are written before the charge starts.

Every step is written before the next one starts and every step is idempotent, so a batch
can be run again from the top at any time (a redelivery, a restarted worker, two workers
after a rebalance) and resumes where the last run stopped:

* Redis holds decide between a sale and an expiry. A hold that is PAYING cannot expire, and
  ``confirm`` refuses a released one; Postgres follows what Redis decided.
* The provider answers a repeated key with its first outcome, so charging again is looking up.
  An outcome that stays unknown is never guessed: the order stays PAYING and the event is
  reported back as unresolved.
* A capture whose hold was released meanwhile (a late capture racing an expiry) is refunded,
  and the refund is recorded.

``reservation.expired`` / ``.released`` move a still-open order to the terminal state their
cause names. Each stage is one pipelined Redis round trip or one Postgres statement for the
whole batch; charges go to the provider in batches of up to ``concurrency``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from allocator.hold_scripts import HoldScripts
from allocator.ids import hold_keys
from flashsale.errors import PaymentConflict, PaymentError, PaymentUnknown, ProviderDown
from flashsale.events import ReservationEvent, event_id
from flashsale.keys import SkuKeys
from flashsale.orders import TERMINAL, Order, OrderStore, state_for_cause
from flashsale.payments import Charge, ChargeRequest, PaymentProvider
from flashsale.records import HoldRecord

log = logging.getLogger("flashsale.saga")
UNKNOWN = "payment outcome unknown"


@dataclass
class BatchResult:
    """What one run did. ``unresolved`` maps event ids to why they could not finish (they are
    not marked processed; the caller retries or parks them)."""

    confirmed: int = 0
    failed: int = 0  # payment failed
    closed: int = 0  # expired or cancelled
    refunded: int = 0
    duplicates: int = 0  # already processed (inbox)
    unresolved: dict[str, str] = field(default_factory=dict)
    moved: list[tuple[str, str]] = field(default_factory=list)  # (order id, state reached)


def _keys(event: ReservationEvent) -> SkuKeys:
    """The keys of the stock bucket that holds the event's reservation."""
    return hold_keys(event.sale_id, event.sku, event.reservation_id)


class Saga:
    def __init__(
        self,
        store: OrderStore,
        holds: HoldScripts,
        provider: PaymentProvider,
        *,
        concurrency: int = 1000,
        charge_attempts: int = 4,
        retry_backoff_s: float = 0.2,
    ) -> None:
        self.store = store
        self.holds = holds
        self.provider = provider
        self.concurrency = concurrency
        self.charge_attempts = charge_attempts
        self.retry_backoff_s = retry_backoff_s

    async def run(self, events: Sequence[ReservationEvent]) -> BatchResult:
        """Take ``events`` as far as they can go. Raises on an unreachable dependency
        (Postgres, Redis, ProviderDown): nothing is lost, the batch is simply run again.
        Events that finished are marked processed (the inbox) in the transaction that wrote
        their last effect."""
        result = BatchResult()
        unique = {event_id(e): e for e in events}
        created = [e for e in unique.values() if e.type == "reservation.created"]
        closing = [e for e in unique.values() if e.type != "reservation.created"]
        # Dedupe: a reservation.created is done once its order is terminal (the order row,
        # keyed by the reservation id, is its inbox entry); the other events use the inbox.
        finished = await self.store.finished([e.reservation_id for e in created])
        seen = await self.store.seen([event_id(e) for e in closing])
        result.duplicates = len(events) - len(unique) + len(finished) + len(seen)
        created = [e for e in created if e.reservation_id not in finished]
        closing = [e for e in closing if event_id(e) not in seen]
        if created:
            await self._created(created, result)
        if closing:
            await self._closing(closing, result)
        for order_id, state in result.moved:  # committed: an order's id is its reservation's
            log.info("order %s", state, extra={"reservation_id": order_id})
        return result

    # -- reservation.created ------------------------------------------------------------

    async def _created(self, events: list[ReservationEvent], result: BatchResult) -> None:
        by_id = {e.reservation_id: e for e in events}
        # 1. Hold ACTIVE -> PAYING in Redis first: from then on it cannot expire. Asking again
        #    is harmless (already_paying, already_sold, released).
        begun = await self.holds.transition(
            "begin_payment", [(_keys(e), e.reservation_id) for e in events]
        )
        targets: dict[str, tuple[str, str]] = {}
        released: list[str] = []
        for event, answer in zip(events, begun, strict=True):
            rid = event.reservation_id
            if answer.ok or answer.state == "SOLD":
                targets[rid] = ("PAYING", "payment_started")
            elif answer.state == "RELEASED":
                released.append(rid)
            else:  # Redis does not know the hold: the reconciler rebuilds it from Postgres
                targets[rid] = ("PENDING", "reservation.created")
                result.unresolved[event_id(event)] = f"hold {answer.reason}"
        for rid, cause in await self._release_causes(released, by_id):
            targets[rid] = (state_for_cause(cause), cause)

        # 2. The order, inserted once in the state its hold is in, with its log, before any
        #    charge.
        orders = await self.store.create(events, targets)
        for event in events:
            if event.reservation_id not in orders:  # nothing written: bad data, not an outage
                result.unresolved[event_id(event)] = (
                    f"no such sale or SKU: {event.sale_id}/{event.sku}"
                )
        late_paying = [rid for rid, o in orders.items()
                       if o.state == "PENDING" and targets[rid][0] == "PAYING"]  # fmt: skip
        late_closed = [(rid, targets[rid][1]) for rid, o in orders.items()
                       if o.state == "PENDING" and targets[rid][0] in TERMINAL]  # fmt: skip
        if late_paying or late_closed:  # orders written as PENDING by an earlier run
            async with self.store.pool.acquire() as conn, conn.transaction():
                await self.store.advance(
                    conn, [(rid, "payment_started") for rid in late_paying], ["PENDING"],
                    "PAYING", "order.paying",
                )  # fmt: skip
                await self._close(conn, late_closed, ["PENDING"], result)
        paying = [o for o in orders.values() if o.state == "PAYING" or o.id in late_paying]

        # 3. Charge (asking again is looking up: same key, same answer).
        charges = await self._charge_all(paying, by_id, result)

        # 4. Redis decides between the sale and a release that came first.
        captured = [(o, c) for o, c in charges if c.status in ("captured", "refunded")]
        declined = [(o, c) for o, c in charges if c.status == "declined"]
        confirmed = await self.holds.transition(
            "confirm", [(_keys(by_id[o.id]), o.id) for o, _ in captured]
        )
        await self.holds.transition(
            "release", [(_keys(by_id[o.id]), o.id) for o, _ in declined], cause="payment_failed"
        )
        to_confirm = [(o, c) for (o, c), a in zip(captured, confirmed, strict=True) if a.ok]
        # Released first (expired, cancelled): refund. A hold Redis no longer knows is not a
        # release: the order waits PAYING for the reconciler to rebuild it, nothing refunded.
        late = [(o, c) for (o, c), a in zip(captured, confirmed, strict=True)
                if a.state == "RELEASED"]  # fmt: skip
        for (order, _), answer in zip(captured, confirmed, strict=True):
            if not answer.ok and answer.state != "RELEASED":
                result.unresolved[event_id(by_id[order.id])] = f"hold {answer.reason}"
        refunds = await self._refund(late)
        late_causes = await self._release_causes([o.id for o, _ in late], by_id)
        charged = {o.id for o, _ in charges}
        unknown = [o.id for o in paying if o.id not in charged
                   and result.unresolved.get(event_id(by_id[o.id])) == UNKNOWN]  # fmt: skip

        # 5. Postgres follows, in one transaction: the orders that reach a terminal state here
        #    are what marks their events done.
        async with self.store.pool.acquire() as conn, conn.transaction():
            confirmed_ids = await self.store.advance(
                conn, [(o.id, "payment_captured") for o, _ in to_confirm], ["PAYING"],
                "CONFIRMED", "order.confirmed", count_sold=True,
            )  # fmt: skip
            failed_ids = await self.store.advance(
                conn, [(o.id, "payment_declined") for o, _ in declined], ["PAYING"],
                "PAYMENT_FAILED", "order.payment_failed",
            )  # fmt: skip
            result.confirmed += len(confirmed_ids)
            result.failed += len(failed_ids)
            result.moved += [(rid, "CONFIRMED") for rid in sorted(confirmed_ids)]
            result.moved += [(rid, "PAYMENT_FAILED") for rid in sorted(failed_ids)]
            await self._close(conn, late_causes, ["PENDING", "PAYING"], result)
            await self.store.note(conn, [(c.key, "late_capture_refunded") for c in refunds],
                                  "payment.refunded")  # fmt: skip
            await self.store.settle_payments(conn, [
                *((c.key, c.provider_ref, "CAPTURED") for _, c in to_confirm),
                *((c.key, c.provider_ref, "DECLINED") for _, c in declined),
                *((c.key, c.provider_ref, "REFUNDED") for c in refunds),
                *((rid, "", "UNKNOWN") for rid in unknown),
            ])  # fmt: skip
        result.closed += sum(1 for rid in released if rid in orders)
        result.refunded += len(refunds)

    async def _release_causes(
        self, ids: Sequence[str], by_id: dict[str, ReservationEvent]
    ) -> list[tuple[str, str]]:
        """(reservation id, the cause its hold was released with) for released holds."""
        raw = await self.holds.holds([(_keys(by_id[rid]), rid) for rid in ids])
        return [(rid, HoldRecord.parse(r).cause if r else "cancelled")
                for rid, r in zip(ids, raw, strict=True)]  # fmt: skip

    async def _close(
        self,
        conn: asyncpg.Connection,
        causes: Sequence[tuple[str, str]],
        from_states: Sequence[str],
        result: BatchResult,
    ) -> None:
        """Move orders whose hold was released to the terminal state of the cause."""
        by_state: dict[str, list[tuple[str, str]]] = {}
        for rid, cause in causes:
            by_state.setdefault(state_for_cause(cause), []).append((rid, cause))
        for state, moves in by_state.items():
            moved = await self.store.advance(
                conn, moves, from_states, state, f"order.{state.lower()}"
            )
            result.moved += [(rid, state) for rid in sorted(moved)]
            if state == "PAYMENT_FAILED":
                result.failed += len(moved)
            else:
                result.closed += len(moved)

    async def _charge_all(
        self, orders: Sequence[Order], by_id: dict[str, ReservationEvent], result: BatchResult
    ) -> list[tuple[Order, Charge]]:
        """Definite outcomes for ``orders``, in chunks of ``concurrency`` charges in flight.
        Items whose outcome is unknown are asked again with the same key, up to
        ``charge_attempts`` times; then they are left unresolved (never guessed)."""
        done: list[tuple[Order, Charge]] = []
        remaining = list(orders)
        for attempt in range(1, self.charge_attempts + 1):
            if not remaining:
                break
            if attempt > 1:
                await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - 2))
            unknown: list[Order] = []
            for start in range(0, len(remaining), self.concurrency):
                chunk = remaining[start : start + self.concurrency]
                try:
                    answers: list[Charge | PaymentError] = await self.provider.charge_many(
                        [ChargeRequest(o.id, o.amount, o.currency, o.payment_token)
                         for o in chunk]
                    )  # fmt: skip
                except ProviderDown:
                    raise
                except PaymentUnknown as exc:
                    answers = [exc] * len(chunk)
                for order, answer in zip(chunk, answers, strict=True):
                    if isinstance(answer, Charge):
                        done.append((order, answer))
                    elif isinstance(answer, PaymentConflict):
                        result.unresolved[event_id(by_id[order.id])] = f"payment conflict: {answer}"
                    else:
                        unknown.append(order)
            if unknown:
                log.info("%d charge outcomes unknown (attempt %d); asking again with the same keys",
                         len(unknown), attempt)  # fmt: skip
            remaining = unknown
        for order in remaining:
            result.unresolved[event_id(by_id[order.id])] = UNKNOWN
        return done

    async def _refund(self, late: Sequence[tuple[Order, Charge]]) -> list[Charge]:
        """Refund captures whose hold was released first; every one gets a recorded refund."""
        refunds = []
        for order, charge in late:
            if charge.status == "refunded":
                refunds.append(charge)
                continue
            log.warning("late capture for %s (hold released): refunding", order.id)
            refunds.append(await self.provider.refund(order.id))
        return refunds

    # -- reservation.expired / .released ------------------------------------------------

    async def _closing(self, events: list[ReservationEvent], result: BatchResult) -> None:
        """Orders whose hold Redis released: to the terminal state of the cause. An order that
        does not exist yet is closed when its ``reservation.created`` is processed (its hold
        is found released then)."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            await self._close(
                conn, [(e.reservation_id, e.cause or "cancelled") for e in events],
                ["PENDING", "PAYING"], result,
            )  # fmt: skip
            await self.store.processed(conn, [event_id(e) for e in events])
