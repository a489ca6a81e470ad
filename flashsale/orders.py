"""The order model: states, what a hold's release means for its order, and the order store in
Postgres, written a batch at a time (the saga's writes, which the reconciler shares).

Every write is one set-based statement over arrays (``unnest``), so a batch of a thousand
reservations costs a handful of round trips, not thousands. Each statement finds its orders
by ``id = ANY($1)`` (the primary key) and the workers' connections plan every execution for
its own arrays (``plan_cache_mode = force_custom_plan``): a generic plan, or one driven from
the state index, joined a batch against every open order. Every state change is
conditional on the state it leaves (``WHERE state = ANY(from)``): two workers running the
same saga step move an order once, and an order reaches exactly one terminal state. Each
change bumps ``orders.version`` and appends to ``order_events`` (``seq`` = the new version),
and the statement queues its events for the ``order-events`` topic as one ``outbox`` row (a
JSON array, key ``*``): one outbox row per statement, not one per order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from flashsale.events import ReservationEvent
from flashsale.timefmt import iso

TERMINAL = frozenset({"CONFIRMED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"})
# What a hold's release cause means for its order, and the cause a released hold records for
# each failed terminal state.
CAUSE_STATE = {"expired": "EXPIRED", "payment_failed": "PAYMENT_FAILED", "cancelled": "CANCELLED"}
STATE_CAUSE = {state: cause for cause, state in CAUSE_STATE.items()}
# The hold state each order state implies once the saga has followed it.
HOLD_FOR = {"CONFIRMED": "SOLD", "EXPIRED": "RELEASED", "CANCELLED": "RELEASED",
            "PAYMENT_FAILED": "RELEASED", "PAYING": "PAYING"}  # fmt: skip


def state_for_cause(cause: str) -> str:
    return CAUSE_STATE.get(cause, "CANCELLED")


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    state: str
    quantity: int
    amount: int
    currency: str
    payment_token: str


# One statement for a batch of new orders, each inserted straight into the state its hold
# is already in (PAYING, or terminal when Redis released it first; PENDING when Redis does
# not know it). The order was never in any other state, so its log starts with one
# ``order.created`` row naming the state it was created in and why. $1..$9 the order
# columns, $10 states, $11 causes, $12 the order-events topic, $13 the buyers' idempotency
# keys (what a rebuild of Redis restores the buyer's remembered answer from). Returns every
# order of the input as it now stands.
_CREATE = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
                         $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::text[], $13::text[])
        AS t(id, sale_id, sku, buyer_id, quantity, amount, currency, admission_id,
             payment_token, state, cause, idempotency_key)
), inserted AS (
    INSERT INTO orders (id, sale_id, sku, buyer_id, quantity, amount, currency, admission_id,
                        payment_token, state, version, idempotency_key)
    SELECT i.id, i.sale_id, i.sku, i.buyer_id, i.quantity, i.amount, i.currency,
           i.admission_id, i.payment_token, i.state, 1, i.idempotency_key
    FROM input i JOIN sale_skus k ON k.sale_id = i.sale_id AND k.sku = i.sku  -- else no order
    ON CONFLICT (id) DO NOTHING
    RETURNING id, state, quantity, amount, currency, payment_token
), events AS (
    SELECT i.id, 1 AS seq, 'order.created' AS type, NULL::text AS from_state,
           i.state AS to_state, t.cause
    FROM inserted i JOIN input t USING (id)
), logged AS (
    INSERT INTO order_events (order_id, seq, type, from_state, to_state, cause)
    SELECT id, seq, type, from_state, to_state, cause FROM events
), queued AS (
    INSERT INTO outbox (topic, key, payload)
    SELECT $12, '*', json_agg(json_build_object(
        'order_id', id, 'type', type, 'state', to_state, 'from_state', from_state,
        'cause', cause, 'version', seq))
    FROM events HAVING count(*) > 0
)
SELECT id, state, quantity, amount, currency, payment_token FROM inserted
UNION ALL
SELECT o.id, o.state, o.quantity, o.amount, o.currency, o.payment_token
FROM unnest($1::text[]) AS t(id)
CROSS JOIN LATERAL (SELECT * FROM orders WHERE id = t.id OFFSET 0) o
"""

# $1 ids, $2 causes, $3 from-states, $4 to-state, $5 event type, $6 topic, $7 count as sold
_ADVANCE = """
WITH wanted AS MATERIALIZED (
    -- Driven from the batch, one primary-key lookup per id (OFFSET 0 keeps the planner from
    -- flattening it into a join led by the state index, whose statistics lag behind).
    SELECT o.id, o.state AS before, t.cause
    FROM unnest($1::text[], $2::text[]) AS t(id, cause)
    CROSS JOIN LATERAL (SELECT id, state FROM orders WHERE id = t.id OFFSET 0) o
    WHERE o.state = ANY($3::text[])
), moved AS (
    UPDATE orders o
    SET state = $4, version = o.version + 1, updated_at = now()
    FROM wanted w
    WHERE o.id = ANY($1::text[]) AND o.id = w.id AND o.state = w.before
    RETURNING o.id, o.version, o.sale_id, o.sku, o.quantity, w.before, w.cause
), logged AS (
    INSERT INTO order_events (order_id, seq, type, from_state, to_state, cause)
    SELECT id, version, $5, before, $4, cause FROM moved
), queued AS (
    INSERT INTO outbox (topic, key, payload)
    SELECT $6, '*', json_agg(json_build_object(
        'order_id', id, 'type', $5::text, 'state', $4::text, 'from_state', before,
        'cause', cause, 'version', version))
    FROM moved HAVING count(*) > 0
), sold AS (
    UPDATE sale_skus k SET sold = k.sold + m.units
    FROM (SELECT sale_id, sku, sum(quantity) AS units FROM moved WHERE $7
          GROUP BY sale_id, sku) m
    WHERE k.sale_id = m.sale_id AND k.sku = m.sku
)
SELECT id FROM moved
"""

# An event on the log that changes no state (a refund): $1 ids, $2 causes, $3 type, $4 topic
_NOTE = """
WITH noted AS (
    UPDATE orders o SET version = o.version + 1, updated_at = now()
    FROM unnest($1::text[], $2::text[]) AS t(id, cause)
    WHERE o.id = ANY($1::text[]) AND o.id = t.id
    RETURNING o.id, o.version, o.state, t.cause
), logged AS (
    INSERT INTO order_events (order_id, seq, type, from_state, to_state, cause)
    SELECT id, version, $3, state, state, cause FROM noted
), queued AS (
    INSERT INTO outbox (topic, key, payload)
    SELECT $4, '*', json_agg(json_build_object(
        'order_id', id, 'type', $3::text, 'state', state, 'cause', cause,
        'version', version))
    FROM noted HAVING count(*) > 0
)
SELECT id FROM noted
"""

# $1 keys, $2 provider refs, $3 states: the provider's definite answer for each key.
_PAYMENTS_SETTLE = """
INSERT INTO payments (idempotency_key, order_id, provider_ref, amount, currency, state)
SELECT t.id, t.id, t.ref, o.amount, o.currency, t.state
FROM unnest($1::text[], $2::text[], $3::text[]) AS t(id, ref, state)
JOIN orders o ON o.id = t.id AND o.id = ANY($1::text[])
ON CONFLICT (idempotency_key) DO UPDATE
SET provider_ref = EXCLUDED.provider_ref, state = EXCLUDED.state, updated_at = now()
WHERE payments.state IS DISTINCT FROM EXCLUDED.state
"""

# The orders of $1 that are finished (in one of the states $2): their reservation.created
# needs nothing more. One primary-key probe per id.
_FINISHED = """
SELECT o.id FROM unnest($1::text[]) AS t(id)
CROSS JOIN LATERAL (SELECT id, state FROM orders WHERE id = t.id OFFSET 0) o
WHERE o.state = ANY($2::text[])
"""

# One primary-key probe per id: with a batch of 2,000 ids in ``= ANY``, the planner priced
# that many probes above a (parallel) sequential scan of the whole inbox, which then grew
# with every event ever processed.
_INBOX_SEEN = """
SELECT t.id AS event_id FROM unnest($2::text[]) AS t(id)
CROSS JOIN LATERAL (SELECT 1 FROM inbox WHERE consumer = $1 AND event_id = t.id OFFSET 0) i
"""
_INBOX_ADD = """
INSERT INTO inbox (consumer, event_id) SELECT $1, unnest($2::text[])
ON CONFLICT DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class OrderView:
    """What a buyer sees of an order."""

    state: str
    amount: int
    currency: str
    updated_at: datetime
    buyer_id: str
    quantity: int

    def json(self) -> dict[str, Any]:
        return {"state": self.state, "amount": self.amount, "currency": self.currency,
                "updated_at": iso(self.updated_at)}  # fmt: skip


async def order_view(pool: asyncpg.Pool, order_id: str) -> OrderView | None:
    """The order of reservation ``order_id`` (the order id is the reservation id), or None
    while the saga has not written it."""
    row = await pool.fetchrow(
        "SELECT state, amount, currency, updated_at, buyer_id, quantity FROM orders WHERE id = $1",
        order_id,
    )
    if row is None:
        return None
    return OrderView(row["state"], row["amount"], row["currency"].strip(), row["updated_at"],
                     row["buyer_id"], row["quantity"])  # fmt: skip


class OrderStore:
    """The saga's Postgres writes. Methods take a connection so a caller can group them in
    one transaction."""

    def __init__(self, pool: asyncpg.Pool, order_events_topic: str, consumer: str) -> None:
        self.pool = pool
        self.topic = order_events_topic
        self.consumer = consumer

    async def finished(self, order_ids: Sequence[str]) -> set[str]:
        """The ids of ``order_ids`` whose order is in a terminal state."""
        if not order_ids:
            return set()
        rows = await self.pool.fetch(_FINISHED, list(order_ids), sorted(TERMINAL))
        return {row["id"] for row in rows}

    async def seen(self, event_ids: Sequence[str]) -> set[str]:
        """The event ids this consumer has already processed (the inbox)."""
        if not event_ids:
            return set()
        rows = await self.pool.fetch(_INBOX_SEEN, self.consumer, list(event_ids))
        return {row["event_id"] for row in rows}

    async def processed(self, conn: asyncpg.Connection, event_ids: Sequence[str]) -> None:
        if event_ids:
            await conn.execute(_INBOX_ADD, self.consumer, list(event_ids))

    async def create(
        self, events: Sequence[ReservationEvent], targets: dict[str, tuple[str, str]]
    ) -> dict[str, Order]:
        """Insert the order of each ``reservation.created`` that has none, in the state
        ``targets`` gives it (reservation id -> (state, cause)); every order of ``events`` as
        it now stands."""
        rows = await self.pool.fetch(
            _CREATE,
            [e.reservation_id for e in events],
            [e.sale_id for e in events],
            [e.sku for e in events],
            [e.buyer_id for e in events],
            [e.quantity for e in events],
            [e.amount or 0 for e in events],
            [e.currency or "" for e in events],
            [e.admission_id or "" for e in events],
            [e.payment_ref or "" for e in events],
            [targets[e.reservation_id][0] for e in events],
            [targets[e.reservation_id][1] for e in events],
            self.topic,
            [e.idempotency_key or "" for e in events],
        )
        return {r["id"]: Order(r["id"], r["state"], r["quantity"], r["amount"],
                               r["currency"], r["payment_token"]) for r in rows}  # fmt: skip

    async def advance(
        self,
        conn: asyncpg.Connection,
        moves: Sequence[tuple[str, str]],
        from_states: Sequence[str],
        to_state: str,
        event_type: str,
        *,
        count_sold: bool = False,
    ) -> set[str]:
        """Move each (order id, cause) that is in one of ``from_states`` to ``to_state``;
        returns the ids moved. With ``count_sold``, the moved units are added to the SKU's
        sold counter in the same statement (``CHECK (sold <= stock_total)`` guards it)."""
        if not moves:
            return set()
        rows = await conn.fetch(
            _ADVANCE, [m[0] for m in moves], [m[1] for m in moves], list(from_states),
            to_state, event_type, self.topic, count_sold,
        )  # fmt: skip
        return {row["id"] for row in rows}

    async def note(
        self, conn: asyncpg.Connection, notes: Sequence[tuple[str, str]], event_type: str
    ) -> None:
        if notes:
            await conn.execute(
                _NOTE, [n[0] for n in notes], [n[1] for n in notes], event_type, self.topic
            )

    async def settle_payments(
        self, conn: asyncpg.Connection, settled: Sequence[tuple[str, str, str]]
    ) -> None:
        """Record (key, provider ref, CAPTURED | DECLINED | REFUNDED | UNKNOWN | NOT_CHARGED)
        for each payment, as the provider last answered for its key."""
        if settled:
            await conn.execute(
                _PAYMENTS_SETTLE, [s[0] for s in settled], [s[1] for s in settled],
                [s[2] for s in settled],
            )  # fmt: skip
