"""The order saga, a batch of reservation events at a time.

For each ``reservation.created`` (DESIGN §3 step 5)::

    order PENDING  ->  hold ACTIVE->PAYING  ->  order PAYING + payment row
                   ->  charge (idempotency key = reservation id)
                   ->  captured: hold PAYING->SOLD, then order CONFIRMED + sold += qty
                       declined: hold ->RELEASED (stock back), then order PAYMENT_FAILED

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
whole batch; charges run concurrently up to ``concurrency``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from allocator.scripts import HoldScripts
from flashsale.errors import PaymentConflict, PaymentUnknown, ProviderDown
from flashsale.events import HoldRecord, ReservationEvent, event_id
from flashsale.keys import SkuKeys
from workers.orders import TERMINAL, Order, OrderStore, state_for_cause
from workers.payments import Charge, PaymentProvider

log = logging.getLogger("flashsale.saga")


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


def _keys(event: ReservationEvent) -> SkuKeys:
    return SkuKeys(event.sale_id, event.sku)


class Saga:
    def __init__(
        self,
        store: OrderStore,
        holds: HoldScripts,
        provider: PaymentProvider,
        *,
        concurrency: int = 256,
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
        (Postgres, Redis, ProviderDown): nothing is lost, the batch is simply run again."""
        result = BatchResult()
        unique = {event_id(e): e for e in events}
        seen = await self.store.seen(list(unique))
        result.duplicates = len(events) - len(unique) + len(seen)
        todo = {eid: e for eid, e in unique.items() if eid not in seen}
        created = [e for e in todo.values() if e.type == "reservation.created"]
        closing = [e for e in todo.values() if e.type != "reservation.created"]
        done: list[str] = []
        if created:
            done += await self._created(created, result)
        if closing:
            done += await self._closing(closing, result)
        async with self.store.pool.acquire() as conn:
            await self.store.processed(conn, done)
        return result

    # -- reservation.created ------------------------------------------------------------

    async def _created(self, events: list[ReservationEvent], result: BatchResult) -> list[str]:
        by_id = {e.reservation_id: e for e in events}
        orders = await self.store.create(events)
        open_ = [o for o in orders.values() if o.state not in TERMINAL]

        # Hold ACTIVE -> PAYING for the orders not yet paying.
        pending = [o for o in open_ if o.state == "PENDING"]
        begun = await self.holds.many(
            "begin_payment", [(_keys(by_id[o.id]), [o.id]) for o in pending]
        )
        paying_now: list[str] = []
        released: list[Order] = []
        for order, answer in zip(pending, begun, strict=True):
            if answer.ok or answer.state == "SOLD":
                paying_now.append(order.id)
            elif answer.state == "RELEASED":
                released.append(order)
            else:  # the hold is unknown to Redis: the reconciler rebuilds it from Postgres
                result.unresolved[event_id(by_id[order.id])] = f"hold {answer.reason}"
        causes = await self._release_causes(released, by_id)
        async with self.store.pool.acquire() as conn, conn.transaction():
            moved = await self.store.advance(
                conn, [(rid, "payment_started") for rid in paying_now], ["PENDING"], "PAYING",
                "order.paying",
            )  # fmt: skip
            await self.store.open_payments(conn, paying_now)
            await self._close(conn, causes, ["PENDING"], result)
        del moved  # PAYING either way: moved now or by a concurrent run

        # Charge every PAYING order (asking again is looking up: same key, same answer).
        paying = [o for o in open_ if o.state == "PAYING" or o.id in paying_now]
        charges = await self._charge_all(paying, by_id, result)

        captured = [(o, c) for o, c in charges if c.status in ("captured", "refunded")]
        declined = [(o, c) for o, c in charges if c.status == "declined"]
        confirmed = await self.holds.many("confirm", [(_keys(by_id[o.id]), [o.id])
                                                      for o, _ in captured])  # fmt: skip
        await self.holds.many("release", [(_keys(by_id[o.id]), [o.id, "payment_failed"])
                                          for o, _ in declined])  # fmt: skip
        to_confirm = [(o, c) for (o, c), a in zip(captured, confirmed, strict=True) if a.ok]
        late = [(o, c) for (o, c), a in zip(captured, confirmed, strict=True) if not a.ok]
        refunds = await self._refund(late)
        late_causes = await self._release_causes([o for o, _ in late], by_id)

        async with self.store.pool.acquire() as conn, conn.transaction():
            result.confirmed += len(await self.store.advance(
                conn, [(o.id, "payment_captured") for o, _ in to_confirm], ["PAYING"],
                "CONFIRMED", "order.confirmed", count_sold=True,
            ))  # fmt: skip
            result.failed += len(await self.store.advance(
                conn, [(o.id, "payment_declined") for o, _ in declined], ["PAYING"],
                "PAYMENT_FAILED", "order.payment_failed",
            ))  # fmt: skip
            await self._close(conn, late_causes, ["PENDING", "PAYING"], result)
            await self.store.note(conn, [(c.key, "late_capture_refunded") for c in refunds],
                                  "payment.refunded")  # fmt: skip
            await self.store.settle_payments(conn, [
                *((c.key, c.provider_ref, "CAPTURED") for _, c in to_confirm),
                *((c.key, c.provider_ref, "DECLINED") for _, c in declined),
                *((c.key, c.provider_ref, "REFUNDED") for c in refunds),
            ])  # fmt: skip
        result.refunded += len(refunds)
        return [event_id(e) for e in events if event_id(e) not in result.unresolved]

    async def _release_causes(
        self, orders: Sequence[Order], by_id: dict[str, ReservationEvent]
    ) -> list[tuple[str, str]]:
        """(order id, the cause its hold was released with) for released holds."""
        raw = await self.holds.holds([(_keys(by_id[o.id]), o.id) for o in orders])
        return [(o.id, HoldRecord.parse(r).cause if r else "cancelled")
                for o, r in zip(orders, raw, strict=True)]  # fmt: skip

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
            if state == "PAYMENT_FAILED":
                result.failed += len(moved)
            else:
                result.closed += len(moved)

    async def _charge_all(
        self, orders: Sequence[Order], by_id: dict[str, ReservationEvent], result: BatchResult
    ) -> list[tuple[Order, Charge]]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(order: Order) -> tuple[Order, Charge] | None:
            async with gate:
                try:
                    return order, await self._charge(order)
                except PaymentUnknown as exc:
                    if isinstance(exc, ProviderDown):
                        raise
                    result.unresolved[event_id(by_id[order.id])] = f"payment unknown: {exc}"
                except PaymentConflict as exc:
                    result.unresolved[event_id(by_id[order.id])] = f"payment conflict: {exc}"
                return None

        answers = await asyncio.gather(*(one(o) for o in orders))
        return [a for a in answers if a is not None]

    async def _charge(self, order: Order) -> Charge:
        """The charge's definite outcome, asking again with the same key while it is unknown;
        PaymentUnknown after ``charge_attempts``."""
        for attempt in range(1, self.charge_attempts + 1):
            try:
                return await self.provider.charge(
                    order.id, order.amount, order.currency, order.payment_token
                )
            except PaymentUnknown as exc:
                if isinstance(exc, ProviderDown) or attempt == self.charge_attempts:
                    raise
                log.info("charge %s outcome unknown (%s); asking again with the same key",
                         order.id, exc)  # fmt: skip
                await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

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

    async def _closing(self, events: list[ReservationEvent], result: BatchResult) -> list[str]:
        """Orders whose hold Redis released: to the terminal state of the cause. An order that
        does not exist yet is closed when its ``reservation.created`` is processed (its hold
        is found released then)."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            await self._close(
                conn, [(e.reservation_id, e.cause or "cancelled") for e in events],
                ["PENDING", "PAYING"], result,
            )  # fmt: skip
        return [event_id(e) for e in events]
