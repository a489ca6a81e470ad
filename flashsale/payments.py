"""The payment provider's client, as the saga and the reconciler use it: authorize+capture,
refund, look up by key, list a sale's charges.

Every call carries the reservation id as the idempotency key, so asking twice is asking once:
the provider answers a repeated key with the first outcome. A call that may have reached the
provider but gave no definite answer raises :class:`~flashsale.errors.PaymentUnknown`; the
caller asks again with the same key and never guesses. While the provider keeps failing, the
:class:`CircuitBreaker` fails calls fast with :class:`~flashsale.errors.ProviderDown`
instead of piling requests onto it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import orjson

from flashsale.errors import PaymentConflict, PaymentError, PaymentUnknown, ProviderDown
from flashsale.outages import describe
from flashsale.settings import redirect_target

ChargeStatus = Literal["captured", "declined", "refunded"]


@dataclass(frozen=True, slots=True)
class Charge:
    """A definite answer about the charge made under ``key``."""

    key: str
    status: ChargeStatus
    provider_ref: str
    amount: int
    currency: str
    decline_code: str | None = None

    @classmethod
    def parse(cls, data: Any) -> Charge:
        if not isinstance(data, dict) or data.get("status") not in (
            "captured", "declined", "refunded",
        ):  # fmt: skip
            raise PaymentUnknown(f"unreadable provider answer: {data!r}"[:200])
        return cls(
            str(data["idempotency_key"]), data["status"], str(data["id"]), int(data["amount"]),
            str(data["currency"]), data.get("decline_code"),
        )  # fmt: skip


NOT_CHARGED = "NOT_CHARGED"  # the provider has no charge under the key: nothing was taken


def payment_row(key: str, charge: Charge | None) -> tuple[str, str, str]:
    """(key, provider ref, state) recording what the provider answered when asked about
    ``key``: the charge's status, or NOT_CHARGED when it has none under the key."""
    if charge is None:
        return key, "", NOT_CHARGED
    return key, charge.provider_ref, charge.status.upper()


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    key: str  # the idempotency key: the reservation id
    amount: int
    currency: str
    token: str


class PaymentProvider(Protocol):
    async def charge(self, key: str, amount: int, currency: str, token: str) -> Charge:
        """Authorize and capture; raises PaymentUnknown (retry with the same key),
        ProviderDown or PaymentConflict."""

    async def charge_many(self, requests: Sequence[ChargeRequest]) -> list[Charge | PaymentError]:
        """Each request's definite charge, or the error saying why there is none (per item);
        raises ProviderDown or PaymentUnknown when the whole call got no answer."""

    async def refund(self, key: str) -> Charge:
        """Refund the capture made under ``key`` (idempotent)."""

    async def lookup(self, key: str) -> Charge | None:
        """The charge made under ``key``, or None when the provider has none."""

    async def list_charges(
        self, prefix: str, after: str | None = None, limit: int = 100
    ) -> tuple[list[Charge], bool]:
        """Charges whose key starts with ``prefix``, oldest first, after the charge made
        under ``after``; (charges, whether more follow)."""


class CircuitBreaker:
    """Closed: calls go through. After ``threshold`` failures in a row it opens for
    ``cooldown_s``: calls fail fast. Then one trial call is let through (half-open): a success
    closes it, a failure opens it again."""

    def __init__(self, threshold: int = 5, cooldown_s: float = 2.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if time.monotonic() - self.opened_at >= self.cooldown_s else "open"

    def before(self) -> None:
        """Raise ProviderDown when a call may not go through now."""
        state = self.state
        if state == "open" or (state == "half_open" and self._trial):
            raise ProviderDown("the payment provider is failing; not calling it for now")
        if state == "half_open":
            self._trial = True

    def succeeded(self) -> None:
        self.failures, self.opened_at, self._trial = 0, None, False

    def failed(self) -> None:
        self.failures += 1
        self._trial = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = time.monotonic()


class HttpProvider:
    """A client of a Stripe-like HTTP provider (the ``flashsale psp`` simulator's API)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 2.0,
        breaker: CircuitBreaker | None = None,
        connections: int = 256,
        batch: bool = True,
        batch_size: int = 500,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """``observe(route, outcome, seconds)`` is told of every call (outcome: the HTTP
        status class, ``no_answer`` or ``breaker_open``), for the caller's metrics."""
        self.observe = observe
        self.base_url = base_url.rstrip("/")
        self.batch = batch
        self.batch_size = batch_size
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.breaker = breaker or CircuitBreaker()
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpProvider:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections),
            timeout=self.timeout,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        if self._session is None:
            raise RuntimeError("HttpProvider is not open (use `async with`)")
        route = path.split("/")[2] if path.count("/") >= 2 else path  # charges, refunds...
        try:
            self.breaker.before()
        except ProviderDown:
            self._observed(route, "breaker_open", 0.0)
            raise
        began = time.perf_counter()
        try:
            # A redirect is not followed: a 301 would turn a charge's POST into a GET, whose
            # answer would be read as the charge's.
            async with self._session.request(
                method, self.base_url + path, allow_redirects=False, **kwargs
            ) as response:
                raw = await response.read()
                status, where = response.status, response.headers.get("Location")
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._observed(route, "no_answer", time.perf_counter() - began)
            self.breaker.failed()
            raise PaymentUnknown(f"{method} {path}: no definite answer ({describe(exc)})") from exc
        self._observed(route, f"{status // 100}xx", time.perf_counter() - began)
        if status >= 500:
            self.breaker.failed()
            raise PaymentUnknown(f"{method} {path}: provider answered {status}")
        self.breaker.succeeded()  # it answered (a redirect too: the breaker is for outages)
        if 300 <= status < 400:
            target = redirect_target(self.base_url + path, where)
            raise PaymentUnknown(f"{method} {path}: the provider answered {status}, a redirect "
                                 f"to {target} (not followed: FLASHSALE_PSP_URL should name the "
                                 "address it points to)")  # fmt: skip
        try:
            body = orjson.loads(raw or b"null")
        except orjson.JSONDecodeError:
            if status == 200:
                raise PaymentUnknown(f"{method} {path}: unreadable answer {raw[:100]!r}") from None
            body = None  # a plain error page (a 404 from a provider without this route)
        return status, body

    def _observed(self, route: str, outcome: str, seconds: float) -> None:
        if self.observe is not None:
            self.observe(route, outcome, seconds)

    async def charge_many(self, requests: Sequence[ChargeRequest]) -> list[Charge | PaymentError]:
        """One ``POST /v1/charges/batch`` per ``batch_size`` requests when the provider has
        that route (each item still keyed and idempotent on its own); one ``charge`` per
        request otherwise (a 404 on the batch route switches to that for good)."""
        if not self.batch:
            return list(await asyncio.gather(*(self._one(r) for r in requests)))
        chunks = [requests[i : i + self.batch_size]
                  for i in range(0, len(requests), self.batch_size)]  # fmt: skip
        answers = await asyncio.gather(*(self._batch(chunk) for chunk in chunks))
        return [answer for chunk in answers for answer in chunk]

    async def _one(self, request: ChargeRequest) -> Charge | PaymentError:
        try:
            return await self.charge(request.key, request.amount, request.currency, request.token)
        except ProviderDown:
            raise
        except PaymentError as exc:
            return exc

    async def _batch(self, requests: Sequence[ChargeRequest]) -> list[Charge | PaymentError]:
        status, body = await self._call("POST", "/v1/charges/batch", json={"charges": [
            {"idempotency_key": r.key, "amount": r.amount, "currency": r.currency,
             "token": r.token} for r in requests
        ]})  # fmt: skip
        if status == 404:
            self.batch = False
            return list(await asyncio.gather(*(self._one(r) for r in requests)))
        results = body.get("results") if isinstance(body, dict) else None
        if status != 200 or not isinstance(results, list) or len(results) != len(requests):
            raise PaymentUnknown(f"charge batch: unexpected answer {status} {body!r}"[:300])
        out: list[Charge | PaymentError] = []
        for request, item in zip(requests, results, strict=True):
            error = item.get("error") if isinstance(item, dict) else None
            if error is None:
                out.append(Charge.parse(item))
            elif error.get("code") == "idempotency_mismatch":
                out.append(PaymentConflict(f"key {request.key} was used with other parameters"))
            else:
                out.append(PaymentUnknown(f"charge {request.key}: {error!r}"[:300]))
        return out

    async def charge(self, key: str, amount: int, currency: str, token: str) -> Charge:
        status, body = await self._call(
            "POST", "/v1/charges", headers={"Idempotency-Key": key},
            json={"amount": amount, "currency": currency, "token": token},
        )  # fmt: skip
        if status == 409:
            raise PaymentConflict(f"idempotency key {key} was used with other parameters")
        if status != 200:
            raise PaymentUnknown(f"charge {key}: unexpected answer {status} {body!r}"[:300])
        return Charge.parse(body)

    async def refund(self, key: str) -> Charge:
        status, body = await self._call("POST", f"/v1/charges/{key}/refund")
        if status != 200:
            raise PaymentUnknown(f"refund {key}: unexpected answer {status} {body!r}"[:300])
        return Charge.parse(body)

    async def lookup(self, key: str) -> Charge | None:
        status, body = await self._call("GET", f"/v1/charges/{key}")
        if status == 404:
            return None
        if status != 200:
            raise PaymentUnknown(f"lookup {key}: unexpected answer {status} {body!r}"[:300])
        return Charge.parse(body)

    async def list_charges(
        self, prefix: str, after: str | None = None, limit: int = 100
    ) -> tuple[list[Charge], bool]:
        params = {"prefix": prefix, "limit": str(limit)}
        if after is not None:
            params["starting_after"] = after
        status, body = await self._call("GET", "/v1/charges", params=params)
        data = body.get("data") if isinstance(body, dict) else None
        if status != 200 or not isinstance(data, list):
            raise PaymentUnknown(f"list charges: unexpected answer {status} {body!r}"[:300])
        return [Charge.parse(item) for item in data], bool(body.get("has_more"))
