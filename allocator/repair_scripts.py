"""Bindings of the reconciler's repair scripts: close a SKU, write the holds Postgres implies
(compare-and-set), recount and reopen it (``lua/rebuild_*.lua``), and reopen a lost waiting
room (``lua/restore_queue.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.commands.core import AsyncScript

from allocator.redis_calls import Command, lua_script, send_packed
from allocator.sale_scripts import StockCounts
from flashsale.clients import RedisClient
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.records import text


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

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._begin: AsyncScript = lua_script(client, "rebuild_begin")
        self._holds: AsyncScript = lua_script(client, "rebuild_holds")
        self._finish: AsyncScript = lua_script(client, "rebuild_finish")
        self._queue: AsyncScript = lua_script(client, "restore_queue")

    async def begin(self, keys: SkuKeys) -> None:
        """Close the SKU for reservations (``unavailable``) until :meth:`finish`."""
        await self._begin(keys=keys.all(), args=[])

    async def begin_many(self, skus: Sequence[SkuKeys]) -> None:
        """:meth:`begin` for each of ``skus``, pipelined."""
        await send_packed(self.client, [_call(self._begin, k.all(), ()) for k in skus],
                          script=self._begin)  # fmt: skip

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
            skipped += [text(i) for i in left]
        return written, skipped

    async def finish(self, keys: SkuKeys, total: int | str, meta: dict[str, str]) -> RebuildResult:
        """Recount the SKU from its holds, write ``meta`` and reopen it (atomic). ``total``
        is the SKU's, or for a stock bucket '' (keep its total) or '+N' (what its holds
        commit plus N); see ``lua/rebuild_finish.lua``."""
        return _finished(await self._finish(keys=keys.all(), args=_finish_args(total, meta)))

    async def finish_many(
        self, skus: Sequence[tuple[SkuKeys, int | str, dict[str, str]]]
    ) -> list[RebuildResult]:
        """:meth:`finish` for each (keys, total, meta) of ``skus``, pipelined."""
        commands = [_call(self._finish, keys.all(), _finish_args(total, meta))
                    for keys, total, meta in skus]  # fmt: skip
        return [_finished(raw) for raw in await send_packed(self.client, commands,
                                                            script=self._finish)]  # fmt: skip

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
        raw = await self._queue(
            keys=[keys.sale, keys.queue, keys.steps, keys.claims, keys.lease, keys.fence],
            args=args,
        )
        restored_cutoff = int(raw[2])
        return int(raw[0]), int(raw[1]), None if restored_cutoff < 0 else restored_cutoff


def _call(script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]) -> Command:
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _finish_args(total: int | str, meta: dict[str, str]) -> list[str | int]:
    args: list[str | int] = [total]
    for name, value in meta.items():
        args += [name, value]
    return args


def _finished(raw: list[bytes]) -> RebuildResult:
    """``lua/rebuild_finish.lua``'s answer."""
    if text(raw[0]) != "ok":
        return RebuildResult(False, None, None, overcommitted=int(raw[1]))
    values = [int(v) for v in raw[1:]]
    before = None if values[0] < 0 else StockCounts(*(max(0, v) for v in values[:5]))
    return RebuildResult(True, before, StockCounts(*values[5:]))
