"""Every domain error of the engine, in one place.

    FlashsaleError                 base; ``code`` is stable and machine-readable
    ├── ConfigError                the environment is incomplete (``config_error``)
    ├── InvalidInput               bad input, names the field (``invalid_input``)
    ├── Unauthorized               missing or invalid credentials (``unauthorized``, 401)
    │   └── InvalidToken           a signed token that does not verify (``invalid_token``);
    │                              ``reason``: malformed, version, unknown_key, signature,
    │                              kind, expired, missing
    ├── Forbidden                  valid credentials, not allowed here (``forbidden``, 403)
    ├── NotFound                   unknown sale / SKU / reservation (``not_found``)
    ├── Conflict                   a legal request refused by current state (``conflict``)
    │   └── NotEnoughLeft          fewer units left than asked (``not_enough_left``, ``left``)
    ├── RateLimited                a client went over its rate (``rate_limited``, 429)
    ├── RequestTimeout             a request body arrived too slowly (``body_timeout``, 408)
    ├── Unavailable                a dependency is down or a SKU is being rebuilt
    │   ├── Overloaded             a bounded wait queue is full (``overloaded``)
    │   ├── QueueLost              Redis lost a sale's waiting room; the reconciler restores it
    │   └── SchemaBehind           the database lacks migrations this version needs
    │                              (``schema_not_migrated``): wait for ``flashsale migrate``
    └── PaymentError               the payment provider did not give a definite answer
        ├── PaymentUnknown         sent, outcome unknown (timeout, 5xx): retry with the same key
        │   └── ProviderDown       the circuit is open: not sent at all, failed fast
        └── PaymentConflict        the key was used with other parameters (a bug, not retried)

The tree holds what the engine decides. The embedded dev stack's own failure,
``StackError``, is a ``FlashsaleError`` defined with the dev stack (``flashsale.cli.devstack``),
and which third-party exceptions mean "a dependency is down" is :mod:`flashsale.outages`.

Third-party errors are translated at the boundary with ``raise ... from exc``; the HTTP layer
maps these classes to status codes in exactly one middleware and the CLI to one line and a
non-zero exit.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Sequence

import orjson

SHOWN_CHARACTERS = 64


def listed(names: Sequence[str], *, most: int = 5, what: str = "", sep: str = ", ") -> str:
    """``names`` for a message, the first ``most`` of them and a count of the rest: "A, B, C,
    D, E and 35 more of the 40 SKUs" (``what`` = "SKUs"). An error about every SKU of a
    100,000-SKU sale was one line of 760 KB."""
    if len(names) <= most:
        return sep.join(names)
    whole = f" of the {len(names):,} {what}" if what else ""
    return f"{sep.join(names[:most])} and {len(names) - most:,} more{whole}"


def shown(value: object) -> str:
    """``value`` as an error message quotes it, cut short when long: an error names what it
    refuses, it does not echo kilobytes of the input back. Text and numbers are quoted as
    Python writes them ('sale-1', 12.5); what only JSON can have sent (true, null, an object
    or a list) as JSON spells it, so an API caller reads back what they sent."""
    text = repr(value)
    if value is None or isinstance(value, bool | dict | list):
        with contextlib.suppress(TypeError):
            text = orjson.dumps(value).decode()
    if len(text) <= SHOWN_CHARACTERS:
        return text
    if isinstance(value, str):
        return f"{text[: SHOWN_CHARACTERS - 1]}…{text[0]} ({len(value)} characters)"
    return f"{text[:SHOWN_CHARACTERS]}… ({len(text)} characters as text)"


def out_of_range(value: object, low: float, high: float) -> bool:
    """Whether ``value`` is a whole number outside ``[low, high]``, a float among them: the
    JSON parser reads an integer past 64 bits as a float (10**23 as 1e+23), and such a
    number is told the range a rule on integers has, not that it is no integer."""
    if isinstance(value, float) and value.is_integer():
        return not low <= value <= high
    return False


def refused_value(value: object, rule: str) -> str:
    """What an input of ``rule`` is told: "required: RULE" when it was not sent (absent, null
    or empty), else "must be RULE, got VALUE"."""
    if value is None or value == "":
        return f"required: {rule}"
    return f"must be {rule}, got {shown(value)}"


def meant(name: str, known: Sequence[str]) -> str | None:
    """The one of ``known`` an unknown ``name`` probably stands for: the same with ``-`` for
    ``_`` (a flag's spelling), the shortest that has it as a word (``limit`` for
    ``per_buyer_limit``, as ``--limit`` says it), else one spelled alike (``titel``)."""
    spelled = name.strip().lower().replace("-", "_")
    if spelled in known:
        return spelled
    worded = [k for k in known if len(spelled) > 2 and spelled in k.split("_")]
    if worded:
        return min(worded, key=len)
    alike = difflib.get_close_matches(spelled, known, n=1, cutoff=0.6)
    return alike[0] if alike else None


def unknown_name(name: str, known: Sequence[str], what: str = "field") -> str:
    """What an unknown field (or column, ...) ``name`` is told: the one it probably stands
    for, then every one there is. "skus[0].limit: unknown field" said nothing of what a sale
    file calls the limit."""
    guess = meant(name, known)
    hint = f" (did you mean {guess}?)" if guess else ""
    return f"unknown {what}{hint}; the {what}s are {', '.join(known)}"


class FlashsaleError(Exception):
    code = "error"
    http_status = 500
    # Seconds after which a retry may succeed; HTTP answers carry it as Retry-After.
    retry_after_s: float | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def details(self) -> dict[str, object]:
        """What an HTTP answer's error carries beside its code and message."""
        return {}


class ConfigError(FlashsaleError):
    code = "config_error"
    http_status = 500


class InvalidInput(FlashsaleError):
    """Input refused before anything was written; ``field`` is a dotted path (``skus[0].stock``)."""

    code = "invalid_input"
    http_status = 422

    def __init__(self, field: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}", code=code)
        self.field = field

    def details(self) -> dict[str, object]:
        return {"field": self.field}


class Unauthorized(FlashsaleError):
    code = "unauthorized"
    http_status = 401


class InvalidToken(Unauthorized):
    """A token that does not verify. ``reason``: malformed, version, unknown_key, signature,
    kind, expired, missing (no token where one is required); for a JWT also algorithm,
    not_yet_valid and claims (see docs/TOKENS.md)."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"invalid token ({reason})", code="invalid_token")
        self.reason = reason


class Forbidden(FlashsaleError):
    code = "forbidden"
    http_status = 403


class NotFound(FlashsaleError):
    code = "not_found"
    http_status = 404


class Conflict(FlashsaleError):
    code = "conflict"
    http_status = 409


SOLD_OUT_FOR_NOW = ("sold out for now: units other buyers hold may come back; try again with "
                    "a new Idempotency-Key while your turn lasts")  # fmt: skip


class SoldOut(Conflict):
    """No unit for a reservation. ``holds_pending``: other buyers hold units, which come back
    when a hold expires, is cancelled or fails its payment, so a request with a new
    Idempotency-Key may yet be granted while the turn lasts; without, sold out for good."""

    code = "sold_out"

    def __init__(self, holds_pending: bool) -> None:
        super().__init__(SOLD_OUT_FOR_NOW if holds_pending else "sold out")
        self.holds_pending = holds_pending

    def details(self) -> dict[str, object]:
        return {"holds_pending": self.holds_pending}


class NotEnoughLeft(Conflict):
    """Fewer units left than a reservation asked for: a smaller request may be granted.
    ``left`` is how many the decision found; ``holds_pending`` as for :class:`SoldOut`."""

    code = "not_enough_left"

    def __init__(self, left: int, holds_pending: bool) -> None:
        back = " (more may come back from other buyers' holds)" if holds_pending else ""
        super().__init__(f"only {left} left: ask for {left} or fewer, with a new "
                         f"Idempotency-Key, while your turn lasts{back}")  # fmt: skip
        self.left = left
        self.holds_pending = holds_pending

    def details(self) -> dict[str, object]:
        return {"field": "quantity", "left": self.left, "holds_pending": self.holds_pending}


class RateLimited(FlashsaleError):
    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(FlashsaleError):
    code = "body_timeout"
    http_status = 408


class Unavailable(FlashsaleError):
    code = "unavailable"
    http_status = 503
    retry_after_s = 1.0


class Overloaded(Unavailable):
    """Backpressure: a bounded queue is full. Retry later; nothing was decided."""

    code = "overloaded"


class QueueFull(Unavailable):
    """A sale's waiting room holds its ``max_queue`` buyers not admitted yet: no place to give
    now. One frees each time the pump admits a buyer, and the line ahead takes minutes to go,
    so a newcomer asking again every second would only add load."""

    code = "queue_full"
    retry_after_s = 5.0


class QueueLost(Unavailable):
    """A sale's waiting room is not live in Redis (lost, not yet restored by the reconciler):
    nothing may be queued or admitted until it is, or positions could be handed out twice."""

    code = "unavailable"


class SchemaBehind(Unavailable):
    """Postgres lacks a table, column or function this version of the engine uses: its
    migrations have not been applied (``flashsale migrate``). The same request succeeds once
    they are."""

    code = "schema_not_migrated"
    retry_after_s = 5.0


class PaymentError(FlashsaleError):
    code = "payment_error"
    http_status = 502


class PaymentUnknown(PaymentError):
    """The charge may or may not have happened. Never guess: ask again with the same
    idempotency key, which the provider answers with the first outcome."""

    code = "payment_unknown"


class ProviderDown(PaymentUnknown):
    """The circuit breaker is open: the request was not sent."""

    code = "provider_down"


class PaymentConflict(PaymentError):
    code = "payment_conflict"
