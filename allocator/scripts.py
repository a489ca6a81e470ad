"""Typed bindings of the Lua scripts in ``lua/``: loaded once per client, called by EVALSHA.

redis-py's ``register_script`` sends EVALSHA and falls back to loading the script on NOSCRIPT,
so a Redis restart or ``SCRIPT FLUSH`` is survived transparently.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, cast

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

from flashsale.errors import InvalidInput
from flashsale.keys import SaleKeys, SkuKeys

PreloadOutcome = Literal[
    "loaded", "unchanged", "refused_committed", "refused_below_committed", "refused_lost"
]


# Requests per reserve call: bounded by Lua's unpack() stack and to keep one call short.
MAX_RESERVE_BATCH = 1000
HOLD_SCRIPTS = ("reserve", "begin_payment", "confirm", "release", "expire")
Transition = Literal["begin_payment", "confirm", "release"]
MAX_TRANSITION_BATCH = 1000  # ids per transition script call
QUEUE_SCRIPTS = ("join", "claim", "lease", "advance", "assign")
REPAIR_SCRIPTS = ("rebuild_begin", "rebuild_holds", "rebuild_finish", "restore_queue")
# Hold records and idempotency entries are delimited by these bytes inside Redis.
_FORBIDDEN = ("\x1e", "\x1f")
_TEXT_FIELDS = ("reservation_id", "buyer_id", "idempotency_key", "payment_ref", "admission_id")


_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)


def pack_command(args: tuple[str | int | bytes, ...]) -> bytes:
    """One command in the Redis protocol, packed in C (hiredis)."""
    return _pack(args)


async def call_packed(
    client: aioredis.Redis, script: AsyncScript, command: tuple[str | int, ...]
) -> Any:
    """EVALSHA ``command`` (packed by hiredis in C) on one pooled connection; load the script
    once on NOSCRIPT. The hot paths (reserve, join) use this instead of redis-py's packer."""
    packed = pack_command(command)
    pool = client.connection_pool
    for attempt in (1, 2):
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(packed, check_health=False)
            return await conn.read_response()
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
        except BaseException:
            # Timeout or cancellation mid-reply: the connection may still hold the reply.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        await client.script_load(script.script)
    raise AssertionError("unreachable")


async def read_packed(
    client: aioredis.Redis, commands: Sequence[tuple[str | int, ...]], *, chunk: int = 5000
) -> list[Any]:
    """Send read-only ``commands`` pipelined (packed by hiredis in C, ``chunk`` per write) on
    one pooled connection; their replies in order. For wide reads such as one command per
    SKU of a sale: redis-py's pipeline packs argument by argument in Python."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    replies: list[Any] = []
    try:
        for start in range(0, len(commands), chunk):
            part = commands[start : start + chunk]
            await conn.send_packed_command(b"".join(pack_command(c) for c in part),
                                           check_health=False)  # fmt: skip
            replies += [await conn.read_response() for _ in part]
    except BaseException:
        await conn.disconnect()  # replies may be left unread on it
        raise
    finally:
        await pool.release(conn)
    return replies


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``; hold-lifecycle and queue scripts get ``lua/lib.lua``
    prepended."""
    files = importlib.resources.files("lua")
    text = files.joinpath(f"{name}.lua").read_text()
    if name in HOLD_SCRIPTS or name in QUEUE_SCRIPTS or name in REPAIR_SCRIPTS:
        text = files.joinpath("lib.lua").read_text() + "\n" + text
    return text


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class StockCounts:
    total: int
    available: int
    active: int
    paying: int
    sold: int

    @property
    def held(self) -> int:
        return self.active + self.paying


@dataclass(frozen=True, slots=True)
class PreloadResult:
    sku: str
    outcome: PreloadOutcome
    counts: StockCounts


class Scripts:
    """The engine's scripts registered on one client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._preload: AsyncScript = client.register_script(source("preload"))
        self._set_status: AsyncScript = client.register_script(source("set_status"))
        self._put_sale: AsyncScript = client.register_script(source("put_sale"))

    async def preload(
        self, keys: SkuKeys, *, total: int, meta: dict[str, str], force: bool, first: bool
    ) -> PreloadResult:
        """Load the SKU's configuration and stock (see ``lua/preload.lua``). ``first``: the
        SKU was never preloaded; otherwise a SKU missing from Redis is refused
        (``refused_lost``): the reconciler rebuilds it from Postgres."""
        args: list[str | int] = ["1" if force else "0", total, "1" if first else "0"]
        for name, value in meta.items():
            args += [name, value]
        raw = await self._preload(keys=[keys.meta, keys.stock], args=args)
        outcome = _text(raw[0])
        counts = StockCounts(*(int(v) for v in raw[1:6]))
        return PreloadResult(keys.sku, outcome, counts)  # type: ignore[arg-type]

    async def set_status(self, key: str, status: str) -> bool:
        return bool(await self._set_status(keys=[key], args=[status]))

    async def put_sale(
        self, keys: SaleKeys, fields: dict[str, str], *, open_queue: bool = False
    ) -> int:
        """Replace the sale hash; ``open_queue`` (the first preload) marks the waiting room
        live (see ``lua/put_sale.lua``)."""
        args: list[str] = ["1" if open_queue else "0"]
        for name, value in fields.items():
            args += [name, value]
        return int(await self._put_sale(keys=[keys.sale, keys.queue], args=args))


# -- the hold lifecycle ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """One buyer's request. ``reservation_id`` is fresh per attempt; it is used only if granted."""

    reservation_id: str
    buyer_id: str
    quantity: int
    idempotency_key: str
    payment_ref: str
    admission_id: str

    def validate(self) -> None:
        """Raise InvalidInput naming the first bad field. The common (valid) case costs one
        join and two scans: this runs once per buyer decision on the hot path."""
        rid, buyer, key = self.reservation_id, self.buyer_id, self.idempotency_key
        payref, admission = self.payment_ref, self.admission_id
        if not (
            type(rid) is type(buyer) is type(key) is type(payref) is type(admission) is str
            and rid and buyer and key and payref and admission
            and "\x1e" not in (joined := rid + buyer + key + payref + admission)
            and "\x1f" not in joined
        ):  # fmt: skip
            for name in _TEXT_FIELDS:
                value = getattr(self, name)
                if not isinstance(value, str) or not value or any(c in value for c in _FORBIDDEN):
                    raise InvalidInput(
                        name, "must be a non-empty string without control separators"
                    )
        if type(self.quantity) is not int:
            raise InvalidInput("quantity", "must be an integer")


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The script's answer for one request.

    ``outcome`` is reserved, sold_out, limit_exceeded, idempotency_mismatch, not_started, paused,
    ended, unavailable or invalid_quantity.
    """

    outcome: str
    reservation_id: str | None = None
    hold_expires_at_ms: int | None = None
    holds_pending: bool = False  # sold_out: active or paying holds may still return stock
    counted: int | None = None  # limit_exceeded: units already counted for this buyer

    @classmethod
    def parse(cls, raw: bytes | str) -> ReserveResult:
        """Parse one answer. Refusals repeat (thousands of identical ``sold_out`` answers after
        a sell-out), so their parsed form is shared; a grant is parsed every time."""
        cached = _REFUSALS.get(raw)
        if cached is not None:
            return cached
        parts = _text(raw).split("\x1f")
        outcome = parts[0]
        if outcome == "reserved":
            return cls(outcome, reservation_id=parts[1], hold_expires_at_ms=int(parts[2]))
        if outcome == "sold_out":
            result = cls(outcome, holds_pending=parts[1] == "1")
        elif outcome == "limit_exceeded":
            result = cls(outcome, counted=int(parts[1]))
        else:
            result = cls(outcome)
        if len(_REFUSALS) < _REFUSALS_MAX:
            _REFUSALS[raw] = result
        return result


_REFUSALS: dict[bytes | str, ReserveResult] = {}
_REFUSALS_MAX = 4096


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

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._reserve: AsyncScript = client.register_script(source("reserve"))
        self._begin_payment: AsyncScript = client.register_script(source("begin_payment"))
        self._confirm: AsyncScript = client.register_script(source("confirm"))
        self._release: AsyncScript = client.register_script(source("release"))
        self._expire: AsyncScript = client.register_script(source("expire"))

    async def reserve(self, keys: SkuKeys, requests: list[ReserveRequest]) -> list[ReserveResult]:
        """Decide ``requests`` in order in one atomic call; one result per request.

        The arguments go as six columns (see ``lua/reserve.lua``). This is the hot path, so
        the command is packed by hiredis in C rather than argument by argument in Python.
        """
        if not 0 < len(requests) <= MAX_RESERVE_BATCH:
            raise ValueError(f"a reserve batch holds 1..{MAX_RESERVE_BATCH} requests")
        sku_keys = keys.all()
        command: tuple[str | int, ...] = (
            "EVALSHA", self._reserve.sha, len(sku_keys), *sku_keys, len(requests),
            *[r.reservation_id for r in requests],
            *[r.buyer_id for r in requests],
            *[r.quantity for r in requests],
            *[r.payment_ref for r in requests],
            *[r.admission_id for r in requests],
            *[f"{r.buyer_id}\x1f{r.idempotency_key}" for r in requests],
        )  # fmt: skip
        raw = await call_packed(self.client, self._reserve, command)
        return [ReserveResult.parse(item) for item in raw]

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
        with ``cause``): one call per SKU and per ``MAX_TRANSITION_BATCH`` ids, all pipelined
        in one round trip. Each call is atomic; results come back in the order of ``items``."""
        if not items:
            return []
        script = {"begin_payment": self._begin_payment, "confirm": self._confirm,
                  "release": self._release}[name]  # fmt: skip
        prefix = [cause, "active_only" if active_only else ""] if name == "release" else []
        by_sku: dict[SkuKeys, list[int]] = {}
        for index, (keys, _) in enumerate(items):
            by_sku.setdefault(keys, []).append(index)
        calls: list[list[int]] = []
        pipe = self.client.pipeline(transaction=False)
        for keys, indexes in by_sku.items():
            for start in range(0, len(indexes), MAX_TRANSITION_BATCH):
                chunk = indexes[start : start + MAX_TRANSITION_BATCH]
                calls.append(chunk)
                ids = [items[i][1] for i in chunk]
                await script(keys=keys.all(), args=[*prefix, *ids], client=pipe)
        replies = await pipe.execute()
        results: list[TransitionResult | None] = [None] * len(items)
        for chunk, reply in zip(calls, replies, strict=True):
            for k, index in enumerate(chunk):
                ok, state, reason = reply[3 * k : 3 * k + 3]
                results[index] = TransitionResult(bool(ok), _text(state), _text(reason))
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
        more, *ids = await self._expire(keys=keys.all(), args=[limit])
        return ExpireResult([_text(i) for i in ids], more=bool(int(more)))


# -- repairs (the reconciler) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HoldWrite:
    """One hold record the reconciler derived from Postgres (see ``lua/rebuild_holds.lua``).
    ``expected`` None: write only if Redis has no hold under the id; otherwise only if Redis
    still holds exactly ``expected``."""

    reservation_id: str
    record: str
    expected: str | None = None
    idem_field: str = ""
    idem_value: str = ""
    redrive: bool = False


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """``ok``: the SKU is recounted and open again; else ``overcommitted`` holds need that
    many units more than the total and nothing was written."""

    ok: bool
    before: StockCounts | None
    after: StockCounts | None
    overcommitted: int = 0


class RepairScripts:
    """The reconciler's scripts: rebuild a SKU from Postgres, restore a waiting room."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._begin: AsyncScript = client.register_script(source("rebuild_begin"))
        self._holds: AsyncScript = client.register_script(source("rebuild_holds"))
        self._finish: AsyncScript = client.register_script(source("rebuild_finish"))
        self._queue: AsyncScript = client.register_script(source("restore_queue"))

    async def begin(self, keys: SkuKeys) -> None:
        """Close the SKU for reservations (``unavailable``) until :meth:`finish`."""
        await self._begin(keys=keys.all(), args=[])

    async def write_holds(
        self,
        keys: SkuKeys,
        header: tuple[str, str, int, str],
        writes: Sequence[HoldWrite],
        *,
        chunk: int = 500,
    ) -> tuple[int, list[str]]:
        """Write ``writes`` compare-and-set, ``chunk`` per call; (written, skipped ids).
        ``header`` is (sale id, sku, unit price, currency) for re-driven events."""
        written, skipped = 0, []
        for start in range(0, len(writes), chunk):
            args: list[str | int] = list(header)
            for w in writes[start : start + chunk]:
                args += [w.reservation_id, w.expected or "", w.record, w.idem_field,
                         w.idem_value, "1" if w.redrive else "0"]  # fmt: skip
            count, *left = await self._holds(keys=keys.all(), args=args)
            written += int(count)
            skipped += [_text(i) for i in left]
        return written, skipped

    async def finish(self, keys: SkuKeys, total: int, meta: dict[str, str]) -> RebuildResult:
        """Recount the SKU from its holds, write ``meta`` and reopen it (atomic)."""
        args: list[str | int] = [total]
        for name, value in meta.items():
            args += [name, value]
        raw = await self._finish(keys=keys.all(), args=args)
        if _text(raw[0]) != "ok":
            return RebuildResult(False, None, None, overcommitted=int(raw[1]))
        values = [int(v) for v in raw[1:]]
        before = None if values[0] < 0 else StockCounts(*(max(0, v) for v in values[:5]))
        return RebuildResult(True, before, StockCounts(*values[5:]))

    async def restore_queue(
        self,
        keys: SaleKeys,
        *,
        tail: int,
        serving: int,
        pre: int,
        cutoff: int | None,
        sealed: bool,
        shuffled: bool,
        sold_out: bool,
        claims: Sequence[str],
    ) -> tuple[int, int, int | None]:
        """Reopen a lost waiting room at no less than the given counters (see
        ``lua/restore_queue.lua``); (tail, serving, cutoff) as restored."""
        args: list[str | int] = [tail, serving, pre, -1 if cutoff is None else cutoff,
                                 int(sealed), int(shuffled), int(sold_out), *claims]  # fmt: skip
        raw = await self._queue(keys=[keys.sale, keys.queue, keys.steps, keys.claims], args=args)
        restored_cutoff = int(raw[2])
        return int(raw[0]), int(raw[1]), None if restored_cutoff < 0 else restored_cutoff
