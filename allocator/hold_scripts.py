"""Bindings of the hold-lifecycle scripts: reserve (batched), begin_payment, confirm,
release and expire, and reads of hold records. Every call touches one SKU's slot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

from redis.commands.core import AsyncScript

from allocator.rate_limits import NO_LIMITS, RateKeys, rate_columns
from allocator.redis_calls import Command, call_packed, lua_script, read_packed, send_packed
from flashsale.clients import RedisClient
from flashsale.errors import InvalidInput
from flashsale.events import ReservationEvent, created_event
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.records import RS, SEP, SEPARATORS, HoldRecord, ReserveResult, idem_field, text

# Requests per reserve call: bounded by Lua's unpack() stack and to keep one call short.
MAX_RESERVE_BATCH = 1000
Transition = Literal["begin_payment", "confirm", "release"]
MAX_TRANSITION_BATCH = 1000  # ids per transition script call
_TEXT_FIELDS = ("reservation_id", "buyer_id", "idempotency_key", "payment_ref", "admission_id")


@dataclass(frozen=True, slots=True)
class Admit:
    """The admission gate a request passes in the same script call as its decision (the
    gateway on a single Redis node; see ``lua/reserve.lua``): its rate limits, then the claim
    of its admission. ``member`` is the claim (:class:`~flashsale.records.ClaimMember`), empty
    for no gate. The claim is written once the request is decided: only a grant uses the
    admission up."""

    member: str
    deadline_ms: int  # the admission window's end, judged by Redis TIME; 0: passed before
    limits: RateKeys = NO_LIMITS

    def passed(self) -> Admit:
        """The gate of this request asked again after it passed (a bucket's stock transfer):
        not counted or judged again, but still claimed if granted."""
        return Admit(self.member, 0)


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """One buyer's request. ``reservation_id`` is fresh per attempt; it is used only if granted."""

    reservation_id: str
    buyer_id: str
    quantity: int
    idempotency_key: str
    payment_ref: str
    admission_id: str
    admit: Admit | None = None

    def validate(self) -> None:
        """Raise InvalidInput naming the first bad field. The common (valid) case costs one
        join and two scans: this runs once per buyer decision on the hot path."""
        rid, buyer, key = self.reservation_id, self.buyer_id, self.idempotency_key
        payref, admission = self.payment_ref, self.admission_id
        if not (
            type(rid) is type(buyer) is type(key) is type(payref) is type(admission) is str
            and rid and buyer and key and payref and admission
            and RS not in (joined := rid + buyer + key + payref + admission)
            and SEP not in joined
        ):  # fmt: skip
            for name in _TEXT_FIELDS:
                value = getattr(self, name)
                if not isinstance(value, str) or not value or any(c in value for c in SEPARATORS):
                    raise InvalidInput(
                        name, "must be a non-empty string without control separators"
                    )
        if type(self.quantity) is not int:
            raise InvalidInput("quantity", "must be an integer")


@dataclass(frozen=True, slots=True)
class TransitionResult:
    """``ok`` when the hold is (now or already) in the requested state; else ``reason`` says why."""

    ok: bool
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class ExpireResult:
    """The ids one ``expire`` call released; ``more`` when overdue holds remain to look at."""

    expired: list[str]
    more: bool


class HoldScripts:
    """The hold-lifecycle scripts registered on one client. Every call touches one SKU slot."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._reserve: AsyncScript = lua_script(client, "reserve")
        self._begin_payment: AsyncScript = lua_script(client, "begin_payment")
        self._confirm: AsyncScript = lua_script(client, "confirm")
        self._release: AsyncScript = lua_script(client, "release")
        self._expire: AsyncScript = lua_script(client, "expire")

    async def reserve(self, keys: SkuKeys, requests: list[ReserveRequest], *,
                      with_holds: bool = False) -> list[ReserveResult]:  # fmt: skip
        """Decide ``requests`` in order in one atomic call; one result per request.

        The arguments go as six columns (see ``lua/reserve.lua``). This is the hot path, so
        the command is packed by hiredis in C rather than argument by argument in Python.
        Requests that carry an :class:`Admit` pass the admission gate in the same call. With
        the gate or ``with_holds``, a grant comes back with its hold and the price
        (:meth:`created`), so nothing needs to be read back.
        """
        if not 0 < len(requests) <= MAX_RESERVE_BATCH:
            raise ValueError(f"a reserve batch holds 1..{MAX_RESERVE_BATCH} requests")
        sku_keys = keys.all()
        columns: tuple[str | int, ...] = (
            len(requests),
            *[r.reservation_id for r in requests],
            *[r.buyer_id for r in requests],
            *[r.quantity for r in requests],
            *[r.payment_ref for r in requests],
            *[r.admission_id for r in requests],
            *[idem_field(r.buyer_id, r.idempotency_key) for r in requests],
        )  # fmt: skip
        if any(r.admit is not None for r in requests):
            sku_keys, columns = _gated(keys, sku_keys, columns, requests)
        elif with_holds:
            columns = (*columns, "holds")
        command = ("EVALSHA", self._reserve.sha, len(sku_keys), *sku_keys, *columns)
        raw = await call_packed(self.client, self._reserve, command)
        results = [ReserveResult.parse(item) for item in raw[: len(requests)]]
        if len(raw) > len(requests):  # "price \x1f currency", with the holds of grants
            price = text(raw[-1])
            results = [replace(r, price=price) if r.hold_record is not None else r
                       for r in results]  # fmt: skip
        return results

    async def remember(self, keys: SkuKeys, request: ReserveRequest, result: ReserveResult
                       ) -> bool:  # fmt: skip
        """Remember the refusal ``result`` as the answer to ``request``'s key in ``keys``, as
        the reserve script remembers a refusal in a SKU of one bucket: a replay of the request
        is refused again, never granted. False when the key has an answer already (a replay
        of the request was decided meanwhile, perhaps granted): nothing is written."""
        value = f"{request.quantity}{SEP}{request.payment_ref}{RS}{result.encode()}"
        field = idem_field(request.buyer_id, request.idempotency_key)
        return bool(await self.client.hsetnx(keys.idem, field, value))

    def created(self, keys: SkuKeys, result: ReserveResult
                ) -> tuple[HoldRecord, ReservationEvent] | None:  # fmt: skip
        """A grant's hold as it stands now and its ``reservation.created`` event as the relay
        publishes it, from an answer that came back with them (the admission gate, or
        ``with_holds``); None when it did not, or Redis has lost the hold."""
        if not result.hold_record or not result.price or result.reservation_id is None:
            return None
        price, _, currency = result.price.partition(SEP)
        if not price or not currency:
            return None
        hold = HoldRecord.parse(result.hold_record.encode())
        event = created_event(result.reservation_id, hold, sale_id=keys.sale_id, sku=keys.sku,
                              unit_price=int(price), currency=currency)  # fmt: skip
        return hold, event

    async def begin_payment(self, keys: SkuKeys, reservation_id: str) -> TransitionResult:
        [result] = await self.transition("begin_payment", [(keys, reservation_id)])
        return result

    async def confirm(self, keys: SkuKeys, reservation_id: str) -> TransitionResult:
        [result] = await self.transition("confirm", [(keys, reservation_id)])
        return result

    async def release(
        self, keys: SkuKeys, reservation_id: str, cause: str = "cancelled"
    ) -> TransitionResult:
        [result] = await self.transition("release", [(keys, reservation_id)], cause=cause)
        return result

    async def cancel(self, keys: SkuKeys, reservation_id: str) -> TransitionResult:
        """A buyer's cancel: releases an ACTIVE hold, refuses a PAYING one."""
        [result] = await self.transition(
            "release", [(keys, reservation_id)], cause="cancelled", active_only=True
        )
        return result

    async def transition(
        self,
        name: Transition,
        items: Sequence[tuple[SkuKeys, str]],
        *,
        cause: str = "cancelled",
        active_only: bool = False,
    ) -> list[TransitionResult]:
        """Move many holds with one script (``begin_payment``, ``confirm`` or ``release``
        with ``cause``): one call per SKU and per ``MAX_TRANSITION_BATCH`` ids, packed in one
        round trip (one per node on a cluster). Each call is atomic; results come back in
        the order of ``items``."""
        if not items:
            return []
        script = {"begin_payment": self._begin_payment, "confirm": self._confirm,
                  "release": self._release}[name]  # fmt: skip
        prefix = [cause, "active_only" if active_only else ""] if name == "release" else []
        by_sku: dict[SkuKeys, list[int]] = {}
        for index, (keys, _) in enumerate(items):
            by_sku.setdefault(keys, []).append(index)
        calls: list[list[int]] = []
        commands: list[Command] = []
        for keys, indexes in by_sku.items():
            sku_keys = keys.all()
            for start in range(0, len(indexes), MAX_TRANSITION_BATCH):
                chunk = indexes[start : start + MAX_TRANSITION_BATCH]
                calls.append(chunk)
                commands.append(("EVALSHA", script.sha, len(sku_keys), *sku_keys, *prefix,
                                 *[items[i][1] for i in chunk]))  # fmt: skip
        replies = await send_packed(self.client, commands, script=script)
        results: list[TransitionResult | None] = [None] * len(items)
        for chunk, reply in zip(calls, replies, strict=True):
            for k, index in enumerate(chunk):
                ok, state, reason = reply[3 * k : 3 * k + 3]
                results[index] = TransitionResult(bool(ok), text(state), text(reason))
        return cast(list[TransitionResult], results)

    async def holds(self, items: Sequence[tuple[SkuKeys, str]]) -> list[bytes | None]:
        """Raw hold records of many reservations in one round trip (None where missing)."""
        pipe = self.client.pipeline(transaction=False)
        for keys, reservation_id in items:
            pipe.hget(keys.holds, reservation_id)
        return [r.encode() if isinstance(r, str) else r for r in await pipe.execute()]

    async def hold(self, keys: SkuKeys, reservation_id: str) -> bytes | None:
        """The raw hold record (see flashsale.events.HoldRecord), or None."""
        raw = await self.client.hget(keys.holds, reservation_id)
        return raw.encode() if isinstance(raw, str) else raw

    async def expire(self, keys: SkuKeys, limit: int = 500) -> ExpireResult:
        """Look at up to ``limit`` overdue holds and expire those still ACTIVE."""
        [result] = await self._expire_calls([keys], limit)
        return result

    async def expire_many(self, skus: Sequence[SkuKeys], limit: int = 500) -> list[ExpireResult]:
        """:meth:`expire` for each of ``skus`` that has a deadline index, every call pipelined
        (one script call per SKU, each in its SKU's slot); the first error is raised after
        every answer was read. Redis drops an index once its last member is swept, so a SKU
        without one has no hold to expire: a pipelined EXISTS passes it over (a catalogue's
        SKUs, nearly none of them reserved, each cost a script call that found nothing). A
        hold made after its EXISTS is the next sweep's, as one made after its call would be."""
        indexed = await read_packed(self.client, [("EXISTS", k.deadlines) for k in skus])
        asked = [keys for keys, found in zip(skus, indexed, strict=True) if found]
        answers = iter(await self._expire_calls(asked, limit) if asked else [])
        return [next(answers) if found else ExpireResult([], more=False) for found in indexed]

    async def _expire_calls(self, skus: Sequence[SkuKeys], limit: int) -> list[ExpireResult]:
        commands: list[Command] = []
        for keys in skus:
            sku_keys = keys.all()
            commands.append(("EVALSHA", self._expire.sha, len(sku_keys), *sku_keys, limit))
        replies = await send_packed(self.client, commands, script=self._expire)
        return [ExpireResult([text(i) for i in ids], more=bool(int(more)))
                for more, *ids in replies]  # fmt: skip


def _gated(
    keys: SkuKeys,
    sku_keys: list[str],
    columns: tuple[str | int, ...],
    requests: list[ReserveRequest],
) -> tuple[list[str], tuple[str | int, ...]]:
    """The reserve call's keys and columns with the admission gate (see ``lua/reserve.lua``):
    the sale's queue and claims, each rate-limit key of the batch once, and four more columns."""
    sale = SaleKeys(keys.sale_id)
    gates = [r.admit or _NO_GATE for r in requests]
    limited, ips, buyers, rates = rate_columns([g.limits for g in gates], len(sku_keys) + 3)
    extra: tuple[str | int, ...] = (
        *[g.member for g in gates],
        *[g.deadline_ms for g in gates],
        *ips,
        *buyers,
        *rates,
    )
    return [*sku_keys, sale.queue, sale.claims, *limited], (*columns, *extra)


_NO_GATE = Admit("", 0)
