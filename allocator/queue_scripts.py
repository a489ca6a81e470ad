"""Bindings of the waiting-room scripts (join, claim, the pump's lease, steps and shuffle) and
its reads: one :meth:`QueueScripts.snapshot` serves the gateways' counters and the pump.

Every call touches one sale's slot (``fs:{<sale>}:...``), except the SKU counters a snapshot
may add. The scripts judge time by Redis ``TIME``; callers never pass their own clock for a
decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from redis.commands.core import AsyncScript

from allocator.batching import Coalescer, PackedCalls, PerKey
from allocator.queue_view import QUEUE_FIELDS, ROOM_SALE_FIELDS, QueueView, Step
from allocator.rate_limits import NO_LIMITS, RateKeys, rate_columns
from allocator.redis_calls import Command, call_packed, lua_script, read_packed
from allocator.stock_buckets import BucketScripts
from flashsale.clients import RedisClient
from flashsale.errors import QueueLost
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.records import ClaimMember, integer, text

MAX_JOIN_BATCH = 256  # Lua's unpack() of ARGV stays far below its stack limit
# SKUs a snapshot reads and parses in one stretch of the loop (see QueueScripts.snapshot).
SKUS_AT_ONCE = 1000
SHARED_READ = 64  # commands of a snapshot read sent with those of the same turn of the loop


@dataclass(frozen=True, slots=True)
class JoinResult:
    """``outcome`` is queued, sold_out, full, ended, unavailable or rate_limited; ``position``
    0 means the pre-queue (the position is assigned by the shuffle at the start). For
    rate_limited, ``position`` is the microseconds until the join would be allowed."""

    outcome: str
    position: int


@dataclass(frozen=True, slots=True)
class AdvanceResult:
    serving: int
    cutoff: int | None
    tail: int
    now_ms: int


@dataclass
class RoomSnapshot:
    """What :meth:`QueueScripts.snapshot` read; the optional parts stay empty unless asked."""

    view: QueueView
    steps: list[Step] = field(default_factory=list)
    redis_ms: int = 0  # Redis TIME, in milliseconds
    claimed: int = 0  # used admissions
    claimed_through: int = 0  # ... at positions up to claims_through
    stock: list[tuple[int, int] | None] = field(default_factory=list)  # (available, held + lent)


class QueueScripts:
    """The waiting-room scripts registered on one client."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._join: AsyncScript = lua_script(client, "join")
        self._claim: AsyncScript = lua_script(client, "claim")
        self._leave: AsyncScript = lua_script(client, "leave")
        self._lease: AsyncScript = lua_script(client, "lease")
        self._advance: AsyncScript = lua_script(client, "advance")
        self._assign: AsyncScript = lua_script(client, "assign")
        self.buckets = BucketScripts(client)  # the reads of SKUs in stock buckets
        # The pumps' leases, reads and steps: those of the sales ticking at once go together.
        self._leases = PackedCalls(client, self._lease)
        self._steps = PackedCalls(client, self._advance)
        self._reads = PackedCalls(client)

    async def join(
        self, keys: SaleKeys, buyer_ids: list[str], limits: Sequence[RateKeys] | None = None
    ) -> list[JoinResult]:
        """Join each buyer, in order, with one script call (see ``lua/join.lua``). Idempotent
        per buyer, so a batch whose reply was lost can be sent again.

        With ``limits`` (one per buyer; a single Redis node only, the keys are in other
        slots), each join is first counted against its rate limits in the same call. A batch
        sent again after a lost reply is counted again, which errs on the side of limiting."""
        if not 0 < len(buyer_ids) <= MAX_JOIN_BATCH:
            raise ValueError(f"a join batch holds 1..{MAX_JOIN_BATCH} buyers")
        limited: list[str] = []
        gate: tuple[int, ...] = ()
        if limits is not None:
            limited, ips, buyers, rates = rate_columns(list(limits), 5)
            gate = (*ips, *buyers, *rates) if limited else ()  # no key: nothing to count
        command: tuple[str | int, ...] = (
            "EVALSHA", self._join.sha, 4 + len(limited), keys.sale, keys.queue, keys.members,
            keys.claims, *limited, *buyer_ids, *gate,
        )  # fmt: skip
        raw = await call_packed(self.client, self._join, command)
        return [JoinResult(text(raw[i]), int(raw[i + 1])) for i in range(0, len(raw), 2)]

    async def claim(
        self, keys: SaleKeys, position: int, key: str, fingerprint: str, deadline_ms: int,
        *, paused: bool = False,
    ) -> str:  # fmt: skip
        """Bind admission ``position`` to the request (``key``, ``fingerprint``): ok, mismatch,
        used, expired or not_admitted (see ``lua/claim.lua``); with ``paused``, 'paused' unless
        the request holds its claim already. ``refused`` gives it back when the decision
        refuses the request."""
        raw = await self._claim(keys=[keys.queue, keys.claims],
                                args=[position, key, fingerprint, deadline_ms,
                                      "paused" if paused else ""])  # fmt: skip
        return text(raw)

    async def refused(self, keys: SaleKeys, position: int, key: str, fingerprint: str) -> bool:
        """Mark the claim of the request (``key``, ``fingerprint``) that its decision refused
        (sold out, over the limit): another request may then use the admission. Only that
        claim is marked; False if it is not there."""
        raw = await self._claim(keys=[keys.queue, keys.claims],
                                args=[position, key, fingerprint, 0, "refused"])  # fmt: skip
        return text(raw) == "marked"

    async def leave(self, keys: SaleKeys, position: int) -> str:
        """Give up ``position``: left, already_left, reserved or unavailable (see
        ``lua/leave.lua``)."""
        return text(await self._leave(keys=[keys.queue, keys.claims], args=[position]))

    async def acquire(self, keys: SaleKeys, owner: str, ttl_ms: int) -> int:
        """The fencing token of ``owner``'s lease (acquired or renewed); 0 if held by another."""
        command = ("EVALSHA", self._lease.sha, 2, keys.lease, keys.fence, owner, ttl_ms, "acquire")
        [token] = await self._leases.send([command])
        return int(token)

    async def release(self, keys: SaleKeys, owner: str) -> bool:
        return bool(await self._lease(keys=[keys.lease, keys.fence], args=[owner, 0, "release"]))

    async def advance(
        self,
        keys: SaleKeys,
        token: int,
        *,
        serving: int,
        cutoff: int | None,
        sold_out: bool,
        published: dict[str, str],
    ) -> AdvanceResult | None:
        """Publish one pump step; None when ``token`` has been fenced out by a newer leader.
        Raises QueueLost when Redis lost the waiting room (the reconciler restores it)."""
        args: list[str | int] = [token, serving, -1 if cutoff is None else cutoff, int(sold_out)]
        for name, value in published.items():
            args += [name, value]
        [raw] = await self._steps.send([("EVALSHA", self._advance.sha, 4, keys.sale, keys.queue,
                                         keys.steps, keys.fence, *args)])  # fmt: skip
        if int(raw[0]) == -2:
            raise QueueLost(f"the waiting room of {keys.sale_id} is not live in Redis")
        if int(raw[0]) < 0:
            return None
        serving_now, cutoff_now, tail, now = (int(v) for v in raw)
        return AdvanceResult(serving_now, None if cutoff_now < 0 else cutoff_now, tail, now)

    async def assign(
        self, keys: SaleKeys, token: int, positions: list[tuple[str, int]], *, last: bool
    ) -> bool:
        """Write pre-queue positions; False when fenced out."""
        args: list[str | int] = [token, int(last)]
        for buyer, position in positions:
            args += [buyer, position]
        raw = await self._assign(keys=[keys.queue, keys.members, keys.fence], args=args)
        return int(raw) == 1

    async def snapshot(
        self,
        keys: SaleKeys,
        *,
        steps_after: int | None = None,
        redis_time: bool = False,
        claims_through: int | None = None,
        skus: Sequence[SkuKeys] = (),
    ) -> RoomSnapshot:
        """One packed read of the sale's configuration and waiting-room counters, plus
        what the caller asks for: the admission steps beyond ``steps_after``, Redis ``TIME``,
        the used admissions (all, and those at positions up to ``claims_through``) and the
        counters of ``skus``: ``SKUS_AT_ONCE`` of them with the rest, then the next ones a
        packed read each, the loop's other tasks let run between (60,000 SKUs read and parsed
        in one stretch kept the allocator's other pumps from renewing their leases)."""
        commands: list[Command] = [("HMGET", keys.sale, *ROOM_SALE_FIELDS),
                                   ("HMGET", keys.queue, *QUEUE_FIELDS)]  # fmt: skip
        if steps_after is not None:
            commands.append(("ZRANGEBYSCORE", keys.steps, f"({steps_after}", "+inf"))
        if redis_time:
            # The clock of the node that serves the sale, whose scripts judge its time.
            commands.append(("EVAL", "return redis.call('TIME')", 1, keys.queue))
        if claims_through is not None:
            # Used admissions up to the serving position: a buyer who left the queue (see
            # lua/leave.lua) marks a place further back too.
            commands.append(("EVAL", _CLAIMED_SO_FAR, 2, keys.claims, keys.queue))
            commands.append(("ZCOUNT", keys.claims, 1, claims_through) if claims_through > 0
                            else ("ECHO", "0"))  # fmt: skip
        plain = [sku for sku in skus if sku.buckets == 1]
        commands += _counters(plain[:SKUS_AT_ONCE])
        # A small read goes with the other sales' of the same moment (the pumps' ticks).
        small = len(commands) <= SHARED_READ
        replies = iter(await (self._reads.send(commands) if small else
                              read_packed(self.client, commands)))  # fmt: skip
        snap = RoomSnapshot(QueueView.parse(next(replies), next(replies)))
        if steps_after is not None:
            snap.steps = [Step.parse(member) for member in next(replies)]
        if redis_time:
            seconds, micros = next(replies)
            snap.redis_ms = int(seconds) * 1000 + int(micros) // 1000
        if claims_through is not None:
            snap.claimed, snap.claimed_through = int(next(replies)), integer(text(next(replies)))
        for start in range(0, len(plain), SKUS_AT_ONCE):
            if start:
                part = plain[start : start + SKUS_AT_ONCE]
                replies = iter(await read_packed(self.client, _counters(part)))
            for row in replies:
                snap.stock.append(
                    None if row[0] is None else (int(row[0]), int(row[1]) + int(row[2]))
                )
        if len(plain) < len(skus):
            snap.stock = await self._with_buckets(skus, snap.stock)
        return snap

    async def _with_buckets(self, skus: Sequence[SkuKeys], plain: list[tuple[int, int] | None]
                            ) -> list[tuple[int, int] | None]:  # fmt: skip
        """The counts of ``skus``: ``plain``'s (those in one bucket, in order), and those of
        the SKUs in stock buckets as of one moment. Their buckets live in other slots, on a
        cluster on other nodes, each read at its own moment: a transfer made whole between
        the read of its receiver and that of its lender would be in neither, and a SKU whose
        last free units moved then would count none (the pump would mark its sale sold out
        for good)."""
        groups: list[list[SkuKeys]] = []
        for keys in skus:
            if keys.buckets > 1:
                if keys.bucket == 0 or not groups or groups[-1][0].sku != keys.sku:
                    groups.append([])
                groups[-1].append(keys)
        cut = iter([units for snap in await self.buckets.snapshots(groups)
                    for units in snap.stock()])  # fmt: skip
        rest = iter(plain)
        return [next(cut) if k.buckets > 1 else next(rest) for k in skus]

    async def view(self, keys: SaleKeys) -> QueueView:
        return (await self.snapshot(keys)).view

    async def steps_after(self, keys: SaleKeys, position: int) -> list[Step]:
        """Admission steps that reached beyond ``position``, in order."""
        raw = await self.client.zrangebyscore(keys.steps, f"({position}", "+inf")
        return [Step.parse(member) for member in raw]

    async def positions_of(self, keys: SaleKeys, buyer_ids: list[str]) -> list[int | None]:
        """Each buyer's place (0: in the pre-queue, not drawn yet; None: not queued)."""
        raw = await self.client.hmget(keys.members, buyer_ids)
        return [None if r is None else int(r) for r in raw]

    async def used_by(self, keys: SaleKeys, position: int) -> Literal["reserved", "left"] | None:
        """How admission ``position`` was used: a request was granted with it (``reserved``),
        its buyer left (``left``), or not at all (None; a claim marked refused used nothing:
        see ``lua/lib.lua``)."""
        found = await self.client.zrangebyscore(keys.claims, position, position, 0, 1)
        for raw in found:
            claim = ClaimMember.parse(text(raw))
            if not claim.refused:
                return "left" if claim.left else "reserved"
        return None


_CLAIMED_SO_FAR = (
    "return redis.call('ZCOUNT', KEYS[1], 1, tonumber(redis.call('HGET', KEYS[2], 'serving') "
    "or '0'))"
)


class Joins(PerKey[SaleKeys, "Coalescer[tuple[str, RateKeys | None], JoinResult]"]):
    """Concurrent joins to one sale, coalesced per process into one ``join`` script call
    (within ``window`` seconds, at most ``MAX_JOIN_BATCH``), as reservations are per SKU. Joins
    that carry their rate limits are counted in that call (see :meth:`QueueScripts.join`)."""

    def __init__(self, scripts: QueueScripts, *, window: float = 0.001) -> None:
        def coalescer(keys: SaleKeys) -> Coalescer[tuple[str, RateKeys | None], JoinResult]:
            async def call(items: list[tuple[str, RateKeys | None]]) -> list[JoinResult]:
                buyers = [buyer for buyer, _ in items]
                return await scripts.join(keys, buyers, [x or NO_LIMITS for _, x in items])

            return Coalescer(call, f"sale {keys.sale_id}", window=window,
                             max_batch=MAX_JOIN_BATCH)  # fmt: skip

        super().__init__(coalescer)

    async def join(
        self, keys: SaleKeys, buyer_id: str, limits: RateKeys | None = None
    ) -> JoinResult:
        """Join one buyer (counted against ``limits`` first, when given); Overloaded or
        Unavailable as :class:`Coalescer` raises them."""
        return await self.get(keys).submit((buyer_id, limits))


class Places(PerKey[SaleKeys, "Coalescer[str, int | None]"]):
    """Lookups of buyers' places, coalesced per sale into one ``HMGET``: every pre-queue buyer
    asks once after the draw, all of them within the first seconds of the sale."""

    def __init__(self, scripts: QueueScripts, *, window: float = 0.001) -> None:
        def coalescer(keys: SaleKeys) -> Coalescer[str, int | None]:
            async def call(buyers: list[str]) -> list[int | None]:
                return await scripts.positions_of(keys, buyers)

            return Coalescer(call, f"places in sale {keys.sale_id}", window=window,
                             max_batch=MAX_JOIN_BATCH)  # fmt: skip

        super().__init__(coalescer)

    async def position_of(self, keys: SaleKeys, buyer_id: str) -> int | None:
        return await self.get(keys).submit(buyer_id)


def _counters(skus: Sequence[SkuKeys]) -> list[Command]:
    """The reads of the stock counters of ``skus``, SKUs in one bucket each."""
    return [("HMGET", sku.stock, "available", "active", "paying") for sku in skus]
