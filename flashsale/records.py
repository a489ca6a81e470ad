"""The records Redis stores, one codec each. The Lua side writes them (``lua/lib.lua``,
``lua/reserve.lua``, ``lua/claim.lua``); ``tests/test_records.py`` holds every codec here
against those scripts on a real Redis. Fields are joined by ``SEP`` (0x1F, unit separator);
the idempotency answer's two parts by ``RS`` (0x1E). Neither may occur in any field.

    hold record          holds hash, field = reservation id
        state SEP quantity SEP deadline_ms SEP payment_ref SEP admission_id SEP created_ms
        SEP cause SEP buyer_id SEP idempotency_key
    idempotency answer   idem hash, field = buyer_id SEP idempotency_key (the record's tail)
        quantity SEP payment_ref RS answer
    reserve answer       what the reserve script returns per request (and remembers, above)
        reserved SEP reservation_id SEP deadline_ms | sold_out SEP 0|1
        | limit_exceeded SEP units | idempotency_mismatch | invalid_quantity | not_started
        | paused | ended | unavailable
    claim member         claims zset, scored by the position
        position SEP idempotency_key SEP fingerprint (of the request: SKU, quantity, payment)
        [SEP refused] (the request was refused: it used the admission up only if granted)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson

from flashsale.errors import InvalidInput, shown

SEP = "\x1f"
RS = "\x1e"
SEPARATORS = (SEP, RS)

HoldState = Literal["ACTIVE", "PAYING", "SOLD", "RELEASED"]
_HOLD_FIELDS = 9


def text(value: Any) -> str:
    """A Redis reply (bytes, or str on a decoding client) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def integer(value: Any, default: int = 0) -> int:
    """A Redis reply as an int; ``default`` for a missing or empty value."""
    return int(value) if value not in (None, b"", "") else default


def number(value: Any, default: float = 0.0) -> float:
    """A Redis reply as a float; ``default`` for a missing or empty value."""
    return float(value) if value not in (None, b"", "") else default


@dataclass(frozen=True, slots=True)
class HoldRecord:
    """One field of a SKU's ``holds`` hash."""

    state: HoldState
    quantity: int
    deadline_ms: int
    payment_ref: str
    admission_id: str
    created_ms: int
    cause: str
    buyer_id: str
    idempotency_key: str

    @classmethod
    def parse(cls, raw: bytes | str) -> HoldRecord:
        """Raises ValueError for anything but the nine fields."""
        f = text(raw).split(SEP)
        if len(f) != _HOLD_FIELDS:
            raise ValueError(f"malformed hold record: {text(raw)!r}")
        return cls(f[0], int(f[1]), int(f[2]), f[3], f[4], int(f[5]), f[6], f[7], f[8])  # type: ignore[arg-type]

    def encode(self) -> str:
        return SEP.join((self.state, str(self.quantity), str(self.deadline_ms), self.payment_ref,
                         self.admission_id, str(self.created_ms), self.cause, self.buyer_id,
                         self.idempotency_key))  # fmt: skip

    def moved(self, state: HoldState, cause: str | None = None) -> HoldRecord:
        """The record in ``state`` (and with ``cause``, when given)."""
        return replace(self, state=state, cause=self.cause if cause is None else cause)

    @property
    def idem_field(self) -> str:
        """The field of the buyer's remembered answer (the record ends with it)."""
        return idem_field(self.buyer_id, self.idempotency_key)


def idem_field(buyer_id: str, idempotency_key: str) -> str:
    """An idempotency answer's field: a key is scoped to its buyer."""
    return f"{buyer_id}{SEP}{idempotency_key}"


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The reserve script's answer for one request: ``outcome`` is reserved, sold_out,
    limit_exceeded, idempotency_mismatch, invalid_quantity, not_started, paused, ended or
    unavailable; through the admission gate also rate_limited, admission_used,
    admission_left, admission_mismatch, admission_expired, not_admitted or
    admission_unavailable."""

    outcome: str
    reservation_id: str | None = None
    hold_expires_at_ms: int | None = None
    holds_pending: bool = False  # sold_out: active or paying holds may still return stock
    left: int | None = None  # sold_out: the units free, fewer than asked (None: none)
    counted: int | None = None  # limit_exceeded: units already counted for this buyer
    wait_us: int | None = None  # rate_limited: microseconds until a request would be allowed
    # reserved, through the admission gate: the hold record as it stands now (empty if Redis
    # has lost it), and the SKU's "price \x1f currency" read in the same call
    hold_record: str | None = None
    price: str | None = None

    @classmethod
    def parse(cls, raw: bytes | str) -> ReserveResult:
        """Parse one answer. Refusals repeat (thousands of identical ``sold_out`` answers after
        a sell-out), so their parsed form is shared; a grant is parsed every time."""
        cached = _REFUSALS.get(raw)
        if cached is not None:
            return cached
        answer, gated, record = text(raw).partition(RS)
        parts = answer.split(SEP)
        outcome = parts[0]
        if outcome == "reserved":
            return cls(outcome, reservation_id=parts[1], hold_expires_at_ms=int(parts[2]),
                       hold_record=record if gated else None)  # fmt: skip
        if outcome == "rate_limited":
            return cls(outcome, wait_us=int(parts[1]))
        if outcome == "sold_out":
            left = int(parts[2]) if len(parts) > 2 else None
            result = cls(outcome, holds_pending=parts[1] == "1", left=left)
        elif outcome == "limit_exceeded":
            result = cls(outcome, counted=int(parts[1]))
        else:
            result = cls(outcome)
        if len(_REFUSALS) < _REFUSALS_MAX:
            _REFUSALS[raw] = result
        return result

    def encode(self) -> str:
        if self.outcome == "reserved":
            return f"reserved{SEP}{self.reservation_id}{SEP}{self.hold_expires_at_ms}"
        if self.outcome == "sold_out":
            left = "" if self.left is None else f"{SEP}{self.left}"
            return f"sold_out{SEP}{1 if self.holds_pending else 0}{left}"
        if self.outcome == "limit_exceeded":
            return f"limit_exceeded{SEP}{self.counted}"
        return self.outcome


_REFUSALS: dict[bytes | str, ReserveResult] = {}
_REFUSALS_MAX = 4096


@dataclass(frozen=True, slots=True)
class IdemAnswer:
    """A remembered answer: the first request's quantity and payment (a replay with others is
    ``idempotency_mismatch``) and what it was answered."""

    quantity: int
    payment_ref: str
    answer: ReserveResult

    @classmethod
    def parse(cls, raw: bytes | str) -> IdemAnswer:
        head, found, answer = text(raw).partition(RS)
        quantity, _, payment_ref = head.partition(SEP)
        if not found:
            raise ValueError(f"malformed idempotency answer: {text(raw)!r}")
        return cls(int(quantity), payment_ref, ReserveResult.parse(answer))

    def encode(self) -> str:
        return f"{self.quantity}{SEP}{self.payment_ref}{RS}{self.answer.encode()}"


IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{1,100}\Z")


def idempotency_key(value: str | None, *, required: bool) -> str | None:
    """A caller's Idempotency-Key: 1..100 of ``A-Z a-z 0-9 . _ : -`` (InvalidInput naming the
    header otherwise); None when absent and not ``required``. An empty one is refused: taken
    as none, each retry would be a new request."""
    if value is None and not required:
        return None
    if not value or not IDEMPOTENCY_KEY.match(value):
        rule = "1..100 of A-Z a-z 0-9 . _ : -"
        if value:
            raise InvalidInput("Idempotency-Key", f"must be {rule}, got {shown(value)}")
        raise InvalidInput("Idempotency-Key", f"is empty: give {rule}" if value == ""
                           else f"required header: {rule}")  # fmt: skip
    return value


def body_fingerprint(body: Any) -> str:
    """What an idempotent create binds besides its key: the request as sent, canonically."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def request_fingerprint(sku: str, quantity: int, payment_ref: str) -> str:
    """What an admission claim binds besides the key: a replay with another body differs."""
    return hashlib.sha256(f"{sku}\0{quantity}\0{payment_ref}".encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ClaimMember:
    """One claimed admission in a sale's ``claims`` zset: used up by a granted request (or by
    its buyer leaving), or ``refused``, which another request may claim (``lua/lib.lua``)."""

    position: int
    idempotency_key: str
    fingerprint: str
    refused: bool = False

    @classmethod
    def parse(cls, raw: bytes | str) -> ClaimMember:
        fields = text(raw).split(SEP)
        if len(fields) == 4 and fields[3] == "refused":
            return cls(int(fields[0]), fields[1], fields[2], refused=True)
        if len(fields) != 3:
            raise ValueError(f"malformed claim member: {text(raw)!r}")
        return cls(int(fields[0]), fields[1], fields[2])

    @classmethod
    def of(cls, position: int, key: str, sku: str, quantity: int, payment_ref: str) -> ClaimMember:
        """The claim a reservation request makes (what ``lua/claim.lua`` stores for it)."""
        return cls(position, key, request_fingerprint(sku, quantity, payment_ref))

    @staticmethod
    def is_refused(raw: bytes | str) -> bool:
        return text(raw).endswith(_REFUSED_CLAIM)

    @property
    def left(self) -> bool:
        """The place's buyer gave it up (``lua/leave.lua``): no request used it."""
        return not self.idempotency_key and self.fingerprint == "left"

    def encode(self) -> str:
        plain = f"{self.position}{SEP}{self.idempotency_key}{SEP}{self.fingerprint}"
        return plain + _REFUSED_CLAIM if self.refused else plain


_REFUSED_CLAIM = f"{SEP}refused"
