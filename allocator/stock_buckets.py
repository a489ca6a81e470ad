"""Stock buckets: one hot SKU split over B groups of keys (see :mod:`flashsale.keys`), each a
whole allocator on its own slot, so one SKU's decisions spread over B Redis cores.

A buyer reserves from the bucket :func:`~flashsale.keys.bucket_for` picks, so the per-buyer
limit, idempotency and the outbox stay exact inside one bucket. A bucket that runs dry while
others have stock borrows from them. Two buckets live on different slots (often different
nodes), so a move cannot be one atomic script; it is a journaled two-step transfer:

1. ``lend`` on the lender: available and total go down by the units, and the journal
   (``transfers`` hash) records them under a fresh transfer id;
2. ``credit`` on the receiver, applied once per transfer id (``received`` hash);
3. the journal entry is removed.

A lender that lost its data (its node's) is rebuilt by the reconciler, which counts what its
lost journal held back as the lender's own. A credit of a transfer lent before the loss may
still be on its way (its retries, a paused process), so the rebuild gives the lender a new
``incarnation`` and tells every other bucket so before it counts: each transfer carries the
incarnation it was lent by, and a receiver refuses (``void``) a credit lent by another
incarnation than the lender's newest it knows.

Every step is idempotent by the transfer id, so a step whose outcome is unknown is repeated
as it was. A transfer left half-done (the process died after step 1) is finished by the
reconciler (:meth:`BucketScripts.finish`). At any moment, the SKU's units are the
buckets' totals plus the units journaled and not yet credited: :meth:`BucketScripts.snapshot`
reads that sum consistently while transfers go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from redis.commands.core import AsyncScript
from redis.typing import EncodableT

from allocator.batching import RETRYABLE
from allocator.ids import new_transfer_id
from allocator.redis_calls import Command, hash_pairs, lua_script, read_packed
from allocator.sale_scripts import STOCK_FIELDS, StockCounts
from flashsale.clients import RedisClient
from flashsale.errors import Unavailable
from flashsale.keys import SkuKeys
from flashsale.records import SEP, integer, text

T = TypeVar("T")
STEP_ATTEMPTS = 3
SNAPSHOT_ATTEMPTS = 8
CUT_KEYS = 1000  # buckets a consistent read takes at once (see BucketScripts.snapshots)


@dataclass(frozen=True, slots=True)
class Lent:
    """What a lender gave: ``units`` (0 when it had none), and its ``held`` units (active +
    paying), which may still come back; ``outcome`` is lent, empty or unavailable (or, from an
    allocator's borrow, moved: units free or on their way somewhere, to ask again for);
    ``incarnation``: the lender's (see the module's docstring), which its credit carries."""

    outcome: str
    units: int
    held: int
    incarnation: str = ""


class Loan(NamedTuple):
    """A journal entry: ``units`` lent to bucket ``to`` at ``at_ms``, not finished yet (by
    the lender's current incarnation: a rebuild after a loss starts a new one, and empties
    the journal)."""

    to: int
    units: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket as read: counters (None when Redis does not hold it), the ``moves`` counter
    that every transfer step and stock grant bumps, its journal of units lent and not yet
    finished (transfer id -> (receiving bucket, units)), and the transfer ids it received."""

    keys: SkuKeys
    counts: StockCounts | None
    moves: int
    lent: dict[str, Loan] = field(default_factory=dict)
    received: frozenset[str] = frozenset()
    granted: int | None = None  # bucket 0: the SKU's total as Redis was given it (meta)
    incarnation: str = ""  # see the module's docstring


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every bucket of one SKU, read as of one moment (see :meth:`BucketScripts.snapshot`)."""

    buckets: list[BucketState]

    @property
    def in_transfer(self) -> int:
        """Units lent and not yet credited to their receiver: in no bucket's total."""
        return sum(self._moving())

    def _moving(self) -> list[int]:
        """Per bucket, the units it lent that their receiver has not credited yet."""
        received = {b.keys.bucket: b.received for b in self.buckets}
        return [sum(loan.units for tid, loan in b.lent.items()
                    if tid not in received.get(loan.to, frozenset()))
                for b in self.buckets]  # fmt: skip

    def stock(self) -> list[tuple[int, int] | None]:
        """Per bucket, (available, held) as the admission pump plans with them (None: not in
        Redis): the units it lent and nobody credited yet count as held, coming back."""
        return [None if b.counts is None
                else (b.counts.available, b.counts.held + moving)
                for b, moving in zip(self.buckets, self._moving(), strict=True)]  # fmt: skip

    @property
    def units(self) -> int:
        """The units the buckets that Redis holds account for, transfers included."""
        totals = sum(b.counts.total for b in self.buckets if b.counts is not None)
        return totals + self.in_transfer


class BucketScripts:
    """The transfer scripts registered on one client."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._lend: AsyncScript = lua_script(client, "lend")
        self._credit: AsyncScript = lua_script(client, "credit")
        self._grow: AsyncScript = lua_script(client, "grow")

    async def transfer(
        self, lender: SkuKeys, receiver: SkuKeys, wanted: int, *, exact: bool = False
    ) -> Lent:
        """Move up to half of ``lender``'s available stock (at least ``wanted``, if it has
        them), or with ``exact`` up to ``wanted`` units, to ``receiver``. Raises Unavailable
        when Redis stays unreachable: what was lent stays journaled, and the reconciler
        credits it."""
        tid, lent = await self.lend(lender, receiver, wanted, exact=exact)
        if lent.units:
            await self.complete(lender, receiver, tid, lent.units, lent.incarnation)
        return lent

    async def lend(
        self, lender: SkuKeys, receiver: SkuKeys, wanted: int, *, exact: bool = False
    ) -> tuple[str, Lent]:
        """Step 1 alone (``lua/lend.lua``): the fresh transfer id and what was lent."""
        tid = new_transfer_id()
        raw = await _retried(lambda: self._lend(
            keys=[lender.meta, lender.stock, lender.transfers],
            args=[tid, receiver.bucket, wanted, "exact" if exact else ""]))  # fmt: skip
        return tid, Lent(text(raw[0]), int(raw[1]), int(raw[2]), text(raw[3]))

    async def credit(self, receiver: SkuKeys, tid: str, units: int, lender: int,
                     incarnation: str) -> str:  # fmt: skip
        """Step 2 alone (``lua/credit.lua``) of a transfer from bucket ``lender`` in its
        ``incarnation``: credited, already, unavailable or void."""
        keys = [receiver.meta, receiver.stock, receiver.received]
        args: list[EncodableT] = [tid, units, lender, incarnation]
        return text(await _retried(lambda: self._credit(keys=keys, args=args)))

    async def complete(self, lender: SkuKeys, receiver: SkuKeys, tid: str, units: int,
                       incarnation: str) -> str:  # fmt: skip
        """Steps 2 and 3 of transfer ``tid``: credit the receiver, then close the journal
        entry. Returns the credit's outcome; on ``unavailable`` (the receiver is being
        rebuilt) the entry stays for a later pass; ``gone`` when the lender's journal no
        longer has the entry (finished meanwhile, or lost with the lender); ``void`` when
        the lender was lost and rebuilt since, between that check and the credit: its
        rebuild counted the units back, and crediting them too would make units."""
        if not await _retried(lambda: self.client.hexists(lender.transfers, tid)):
            return "gone"
        outcome = await self.credit(receiver, tid, units, lender.bucket, incarnation)
        if outcome != "unavailable":
            await _retried(lambda: self.client.hdel(lender.transfers, tid))
        return outcome

    async def grow(self, buckets: Sequence[SkuKeys], total: int) -> tuple[str, int]:
        """Raise the SKU's stock to ``total`` on bucket 0 (``lua/grow.lua``), then spread what
        was added evenly over the buckets by transfers. (outcome, the SKU's total in Redis)."""
        first = buckets[0]
        before = integer(await self.client.hget(first.meta, "stock_total"), -1)
        raw_outcome, granted = await self._grow(keys=[first.meta, first.stock], args=[total])
        outcome = text(raw_outcome)
        if outcome == "grown" and before >= 0:
            added, count = int(granted) - before, len(buckets)
            for keys in buckets[1:]:
                share = added // count + (1 if keys.bucket < added % count else 0)
                if share:
                    await self.transfer(first, keys, share, exact=True)
        return outcome, int(granted)

    async def states(self, buckets: Sequence[SkuKeys]) -> list[BucketState]:
        """Every bucket's counters, journal and received ids, in one packed read."""
        commands: list[Command] = []
        for keys in buckets:
            commands += [("HMGET", keys.stock, *STOCK_FIELDS, "moves"),
                         ("HGETALL", keys.transfers), ("HKEYS", keys.received),
                         ("HMGET", keys.meta, "stock_total", "incarnation")]  # fmt: skip
        replies = await read_packed(self.client, commands)
        out = []
        for i, keys in enumerate(buckets):
            row, journal, received, (granted, incarnation) = replies[4 * i : 4 * i + 4]
            counts = None if row[0] is None else StockCounts(*(integer(v) for v in row[:5]))
            out.append(BucketState(keys, counts, integer(row[5]), parse_journal(journal),
                                   frozenset(text(r) for r in received),
                                   None if granted is None else int(granted),
                                   "" if incarnation is None else text(incarnation)))  # fmt: skip
        return out

    async def snapshot(self, buckets: Sequence[SkuKeys]) -> Snapshot:
        """All ``buckets`` as of one moment, while transfers go on (:meth:`snapshots`, the
        buckets taken as one group). Raises Unavailable when transfers never paused long
        enough."""
        [cut] = await self.snapshots([buckets])
        return cut

    async def snapshots(self, groups: Sequence[Sequence[SkuKeys]]) -> list[Snapshot]:
        """Each group of buckets (a SKU's) as of one moment, while transfers go on: its states
        read, then its buckets' ``moves``; when none changed between the two reads (every
        step of a transfer bumps it) no step fell between them, and the states are a
        consistent cut. The groups still moving are read again, up to ``SNAPSHOT_ATTEMPTS``
        times; the groups go ``CUT_KEYS`` buckets a read, the loop's other tasks let run
        between. Raises Unavailable when a group never paused long enough."""
        cuts: list[Snapshot] = []
        start = 0
        while start < len(groups):
            part: list[Sequence[SkuKeys]] = []
            keys = 0
            while start < len(groups) and (not part or keys + len(groups[start]) <= CUT_KEYS):
                part.append(groups[start])
                keys += len(groups[start])
                start += 1
            cuts += await self._cuts(part)
        return cuts

    async def _cuts(self, groups: Sequence[Sequence[SkuKeys]]) -> list[Snapshot]:
        found: dict[int, Snapshot] = {}
        pending = list(range(len(groups)))
        for attempt in range(SNAPSHOT_ATTEMPTS):
            keys = [k for i in pending for k in groups[i]]
            states = iter(await self.states(keys))
            read = [[next(states) for _ in groups[i]] for i in pending]
            moves = iter(await read_packed(self.client, [("HGET", k.stock, "moves") for k in keys]))
            still = []
            for i, group in zip(pending, read, strict=True):
                if [b.moves for b in group] == [integer(next(moves)) for _ in group]:
                    found[i] = Snapshot(group)
                else:
                    still.append(i)
            pending = still
            if not pending:
                return [found[i] for i in range(len(groups))]
            await asyncio.sleep(0.01 * (attempt + 1))
        raise Unavailable(f"stock of {groups[pending[0]][0].sku} kept moving between buckets; "
                          "retry")  # fmt: skip

    async def finish(self, states: Sequence[BucketState], *, before_ms: int
                     ) -> list[tuple[str, int, int, str]]:  # fmt: skip
        """Finish every transfer of ``states`` (one SKU's buckets) lent before ``before_ms``
        and left half-done: credit by the same id, then close the entry. Returns
        [(transfer id, receiving bucket, units, credit outcome)]."""
        keys = {s.keys.bucket: s.keys for s in states}
        done = []
        for state in states:
            for tid, loan in state.lent.items():
                if loan.at_ms < before_ms and loan.to in keys:
                    outcome = await self.complete(state.keys, keys[loan.to], tid, loan.units,
                                                  state.incarnation)  # fmt: skip
                    done.append((tid, loan.to, loan.units, outcome))
        return done


def parse_journal(raw: Any) -> dict[str, Loan]:
    """A bucket's ``transfers`` hash as HGETALL answers it (a dict, or a flat list when packed):
    transfer id -> its loan. The one reader of what ``lua/lend.lua`` writes."""
    journal = {}
    for tid, value in hash_pairs(raw):
        to, units, at_ms = text(value).split(SEP)
        journal[text(tid)] = Loan(int(to), int(units), int(at_ms))
    return journal


async def _retried(step: Callable[[], Awaitable[T]]) -> T:
    """Run one idempotent transfer step; repeat it unchanged when its outcome is unknown."""
    for attempt in range(1, STEP_ATTEMPTS + 1):
        try:
            return await step()
        except RETRYABLE as exc:
            if attempt == STEP_ATTEMPTS:
                raise Unavailable("Redis did not answer a stock transfer step") from exc
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")
