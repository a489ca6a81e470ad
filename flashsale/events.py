"""The reservation events: the SKU outboxes' entries and the ``reservations`` topic's messages.

A SKU's outbox stream (``fs:{sale:sku}:outbox``) holds two shapes of entry:

* ``reservation.created``: one entry per reserve *batch*. A header (``type``, ``sale_id``,
  ``sku``, ``unit_price``, ``currency``, ``count``) then one field per granted reservation id
  whose value is that hold's record (:class:`flashsale.records.HoldRecord`).
  :func:`outbox_events` expands it into one :class:`ReservationEvent` per reservation,
  carrying every field a worker needs.
* ``reservation.expired`` / ``reservation.released``: one entry per hold, with ``type``,
  ``reservation_id``, ``sale_id``, ``sku``, ``buyer_id``, ``quantity``, ``from_state``,
  ``cause`` and ``at_ms``.

Writing one entry per batch keeps the reserve script's cost per decision low (one ``XADD`` per
batch instead of one per buyer); the expansion happens here, off the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from flashsale.records import HoldRecord, text

EventType = Literal["reservation.created", "reservation.expired", "reservation.released"]
_CREATED_HEADER = frozenset({"type", "sale_id", "sku", "unit_price", "currency", "count"})


@dataclass(frozen=True, slots=True)
class ReservationEvent:
    """One reservation's event, as workers consume it. ``hold`` fields are set for
    ``reservation.created``; ``from_state``/``cause``/``at_ms`` for expired and released."""

    type: EventType
    reservation_id: str
    sale_id: str
    sku: str
    buyer_id: str
    quantity: int
    unit_price: int | None = None
    currency: str | None = None
    payment_ref: str | None = None
    admission_id: str | None = None
    idempotency_key: str | None = None
    hold_deadline_ms: int | None = None
    created_ms: int | None = None
    from_state: str | None = None
    cause: str | None = None
    at_ms: int | None = None

    @property
    def amount(self) -> int | None:
        """Total in minor units (``reservation.created`` only)."""
        return None if self.unit_price is None else self.unit_price * self.quantity


def created_event(reservation_id: str, hold: HoldRecord, *, sale_id: str, sku: str,
                  unit_price: int, currency: str) -> ReservationEvent:  # fmt: skip
    """The ``reservation.created`` event of one granted hold: what the outbox relay publishes
    for it, and what the gateway publishes before it answers the buyer (the same event, so
    workers see a duplicate, never two reservations)."""
    return ReservationEvent(
        type="reservation.created",
        reservation_id=reservation_id,
        sale_id=sale_id,
        sku=sku,
        buyer_id=hold.buyer_id,
        quantity=hold.quantity,
        unit_price=unit_price,
        currency=currency,
        payment_ref=hold.payment_ref,
        admission_id=hold.admission_id,
        idempotency_key=hold.idempotency_key,
        hold_deadline_ms=hold.deadline_ms,
        created_ms=hold.created_ms,
    )


def outbox_events(entry: Mapping[Any, Any]) -> list[ReservationEvent]:
    """The reservation events of one outbox stream entry, in the order they were decided."""
    fields = {text(k): text(v) for k, v in entry.items()}
    kind = fields.get("type")
    if kind == "reservation.created":
        holds = [(k, HoldRecord.parse(v)) for k, v in fields.items() if k not in _CREATED_HEADER]
        if len(holds) != int(fields["count"]):
            raise ValueError(f"outbox entry says {fields['count']} holds, carries {len(holds)}")
        unit_price = int(fields["unit_price"])
        return [created_event(rid, h, sale_id=fields["sale_id"], sku=fields["sku"],
                              unit_price=unit_price, currency=fields["currency"])
                for rid, h in holds]  # fmt: skip
    if kind in ("reservation.expired", "reservation.released"):
        return [
            ReservationEvent(
                type=kind,  # type: ignore[arg-type]
                reservation_id=fields["reservation_id"],
                sale_id=fields["sale_id"],
                sku=fields["sku"],
                buyer_id=fields["buyer_id"],
                quantity=int(fields["quantity"]),
                from_state=fields["from_state"],
                cause=fields["cause"],
                at_ms=int(fields["at_ms"]),
            )
        ]
    raise ValueError(f"unknown outbox entry type {kind!r}")


# -- the Kafka wire format ------------------------------------------------------------------

_FIELD_ORDER = tuple(ReservationEvent.__dataclass_fields__)  # asdict() deep-copies: slow
_EVENT_FIELDS = frozenset(_FIELD_ORDER)
_INT_FIELDS = ("quantity", "unit_price", "hold_deadline_ms", "created_ms", "at_ms")


def message_key(reservation_id: str) -> bytes:
    """The Kafka key of a reservation's events: the reservation id. Each reservation's events
    stay on one partition, in order, and a hot SKU's reservations spread over every partition
    (and every worker). Nothing needs a SKU's events in order: every effect is keyed by
    reservation id, and the counters a SKU's orders move (Redis holds, the Postgres sold
    count) are changed by conditional, commutative steps."""
    return reservation_id.encode()


def event_id(event: ReservationEvent) -> str:
    """The event's identity for the inbox: one per reservation and event type."""
    return f"{event.reservation_id}/{event.type}"


def encode_event(event: ReservationEvent) -> bytes:
    """One ``reservations`` topic message value: compact JSON, unset fields left out."""
    return orjson.dumps({k: v for k in _FIELD_ORDER if (v := getattr(event, k)) is not None})


def decode_event(value: bytes | None) -> ReservationEvent:
    """The event of a ``reservations`` message; ValueError names what is wrong (a poison
    message, for the dead-letter topic)."""
    if not value:
        raise ValueError("empty message")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = set(data) - _EVENT_FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    if data.get("type") not in ("reservation.created", "reservation.expired",
                                "reservation.released"):  # fmt: skip
        raise ValueError(f"unknown event type {data.get('type')!r}")
    for name in ("reservation_id", "sale_id", "sku", "buyer_id"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise ValueError(f"{name} must be a non-empty string")
    for name in _INT_FIELDS:
        value_ = data.get(name)
        if value_ is not None and (type(value_) is not int or value_ < 0):
            raise ValueError(f"{name} must be a non-negative integer")
    if data.get("quantity", 0) < 1:
        raise ValueError("quantity must be at least 1")
    if data["type"] == "reservation.created":
        for name in ("unit_price", "currency", "payment_ref", "admission_id"):
            if data.get(name) is None:
                raise ValueError(f"{name} is required for reservation.created")
    return ReservationEvent(**data)
