"""Sale administration: create, import, preload, status, add stock, pause / resume / end.

One set of operations behind both the ``flashsale sale`` CLI and the admin API. Postgres is
written first (it is the truth); Redis is then brought in line through the sale scripts, with
operations that are idempotent, so re-running a command after a partial failure converges.
The reads are :mod:`allocator.sale_reads`, the preload :mod:`allocator.sale_preload`, the
settings and state :mod:`allocator.sale_settings`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from allocator import sale_settings
from allocator.sale_preload import SalePreloads
from allocator.sale_reads import added_in_postgres
from allocator.sale_scripts import SaleScripts
from flashsale.clients import COPY_TIMEOUT_S, RedisClient
from flashsale.errors import Conflict, InvalidInput, shown
from flashsale.keys import SaleKeys, bucket_keys
from flashsale.outages import is_outage
from flashsale.sales import (
    SKUS_VERSION,
    fetch_skus,
    new_sale_id,
    preloaded,
    sale_json,
    sale_state,
    unknown_sku,
)
from flashsale.salespec import (
    MAX_STOCK,
    SaleSpec,
    SkuImport,
    SkuSpec,
    identifier,
    integer,
    refuse_all,
)
from flashsale.settings import ARCHIVE_AFTER_S
from flashsale.shuffle import seed_commitment
from flashsale.wording import counted


@dataclass
class SaleAdmin(SalePreloads):
    """Merchandiser operations over one Postgres pool and one Redis client."""

    @classmethod
    def build(cls, pool: asyncpg.Pool, client: RedisClient,
              archive_after_s: float | None = ARCHIVE_AFTER_S) -> SaleAdmin:  # fmt: skip
        return cls(pool, client, SaleScripts(client), archive_after_s)

    # -- create / import -----------------------------------------------------------------

    async def create(self, spec: SaleSpec, *, key: str | None = None,
                     fingerprint: str = "") -> dict[str, Any]:  # fmt: skip
        """Insert the sale and its SKUs in one transaction; returns the created sale. With an
        idempotency ``key``, a create that already ran with it returns that sale (marked
        ``"replayed": true``) when ``fingerprint`` (what was asked) matches, and is refused
        (422 ``idempotency_mismatch``) when it does not."""
        sale_id, seed = new_sale_id(), secrets.token_hex(32)
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO sales (id, name, starts_at, ends_at, admission_rate, max_queue,"
                " admission_window_seconds, admission_capacity, shuffle_seed, shuffle_commitment,"
                " join_challenge, join_challenge_max, create_key, create_fingerprint)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                " ON CONFLICT (create_key) WHERE create_key IS NOT NULL DO NOTHING RETURNING id",
                sale_id, spec.name, spec.starts_at, spec.ends_at, spec.admission_rate,
                spec.max_queue, spec.admission_window_seconds, spec.admission_capacity,
                seed, seed_commitment(seed), spec.join_challenge, spec.join_challenge_max,
                key, fingerprint if key else None,
            )  # fmt: skip
            if inserted is None:  # this key created a sale already
                earlier = await conn.fetchrow(
                    "SELECT id, create_fingerprint FROM sales WHERE create_key = $1", key
                )
                if earlier["create_fingerprint"] != fingerprint:
                    raise InvalidInput("Idempotency-Key", "this key created another sale",
                                       code="idempotency_mismatch")  # fmt: skip
                return {**await self.get(earlier["id"]), "replayed": True}
            if spec.ends_at <= datetime.now(UTC):  # after the replay: a retry still gets it
                raise InvalidInput("ends_at", f"must be in the future, got "
                                   f"{spec.ends_at:%Y-%m-%dT%H:%M:%SZ}: a sale over before "
                                   "it is made can never open")  # fmt: skip
            await _insert_skus(conn, sale_id, spec.skus)
        return await self.get(sale_id)

    async def import_skus(self, sale_id: str, batch: SkuImport, *,
                          with_skus: bool = True) -> dict[str, Any]:  # fmt: skip
        """Add SKUs (already validated as a whole) to a sale; all or nothing. An error names
        the SKU's field as the input did (``row 5.sku``, ``skus[2].sku``). Returns the sale,
        with its SKUs unless ``with_skus`` is False."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Held until the commit: a second import of the same SKU meanwhile waits, then
            # finds it (unlocked, both found nothing and the second met the primary key).
            sale = await self.sale_row(conn, sale_id, lock=True)
            if sale_state(sale) == "ended":
                raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
            if sale["preloaded_at"] is not None:
                await self._unless_sold_out(sale_id, "SKUs added")
            rows = await fetch_skus(conn, sale_id)
            existing = {row["sku"] for row in rows}
            refuse_all([InvalidInput(where, f"SKU {shown(spec.sku)} already exists in {sale_id}")
                        for spec, where in zip(batch.skus, batch.fields, strict=True)
                        if spec.sku in existing])  # fmt: skip
            after = max((row["position"] or 0 for row in rows), default=0)
            await _insert_skus(conn, sale_id, batch.skus, after=after)
        return await self.get(sale_id) if with_skus else sale_json(await self.row(sale_id))

    # -- stock ---------------------------------------------------------------------------

    async def add_stock(self, sale_id: str, sku: Any, add: Any, *,
                        key: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Raise a SKU's stock by ``add`` units in Postgres, then in Redis if preloaded. With
        an idempotency ``key``, a change already made with it is answered, not made again."""
        return await self._move_total(sale_id, sku, stock_units(add, "add"), "add", key)

    async def lower_stock(self, sale_id: str, sku: Any, remove: Any, *,
                          key: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Lower a SKU's stock by ``remove`` units, never below what is held and sold; ``key``
        as for :meth:`add_stock`."""
        return await self._move_total(sale_id, sku, -stock_units(remove, "remove"), "remove", key)

    async def _move_total(self, sale_id: str, sku: Any, delta: int, field: str,
                          key: str | None) -> dict[str, Any]:  # fmt: skip
        """Change a SKU's total by ``delta`` so that Redis never holds more than Postgres: a
        rise is copied to Redis after Postgres committed it; a fall is made in Redis (which
        refuses to go below held + sold, ``lua/preload.lua``) inside the Postgres
        transaction, so a refusal rolls Postgres back. Should a commit fail after Redis
        fell, Redis holds less than Postgres and the reconciler brings it back: units unsold
        for a moment, none oversold. Both hold the sale's row while they write Redis, and
        the rise copies the SKU as Postgres has it then: copied from its own row, a rise
        late to Redis undid a fall committed meanwhile, and Redis held more than Postgres.
        With a ``key``, the change is made once: a retry gets the SKU's status, marked
        ``"replayed": true``."""
        sku = identifier(sku, "sku")
        asked = f"{sku} {delta:+d}"  # what a key binds: a retry must ask the same
        async with self.pool.acquire() as conn, conn.transaction():
            await self.sale_row(conn, sale_id, lock=True)  # a retry waits for the first
            replay = key is not None and await _claimed_before(conn, sale_id, key, asked)
            if not replay:
                sale, row = await self._write_total(conn, sale_id, sku, delta, field)
        if replay:
            return {**await self.status(sale_id, sku), "replayed": True}
        if delta > 0 and sale["preloaded_at"] is not None:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    sale = await self.sale_row(conn, sale_id, lock=True)
                    row = await conn.fetchrow(SKU_ROW, sale_id, sku)
                    if row is not None and sale_state(sale) != "ended":  # else nothing to copy
                        await self._sync_total(sale, row)
            except Exception as exc:  # Postgres has them: an outage now is no "retry"
                if not is_outage(exc) or row is None:
                    raise
                return added_in_postgres(row, delta, exc)
        return await self.status(sale_id, sku)  # the SKU's: the sale may have 200,000

    async def _write_total(self, conn: asyncpg.Connection, sale_id: str, sku: str, delta: int,
                           field: str) -> tuple[asyncpg.Record, asyncpg.Record]:  # fmt: skip
        """Postgres's part of :meth:`_move_total`, and Redis's of a fall: the sale and the
        SKU's new row."""
        sale, row = await self._sku_for_update(conn, sale_id, sku)
        total = row["stock_total"] + delta
        if total > MAX_STOCK:
            raise InvalidInput(field, f"stock would exceed {MAX_STOCK}")
        if delta < 0 and row["buckets"] > 1:
            raise Conflict(f"{sku} is split into stock buckets, whose stock only grows",
                           code="bucketed_sku")  # fmt: skip
        if total < max(1, row["sold"]):
            raise InvalidInput(field, _too_few_left(sku, row["stock_total"], row["sold"]))
        if delta > 0 and sale["preloaded_at"] is not None:
            await self._unless_sold_out(sale_id, "units added")
        row = await conn.fetchrow(
            "UPDATE sale_skus SET stock_total = $3 WHERE sale_id = $1 AND sku = $2"
            " RETURNING *", sale_id, sku, total,
        )  # fmt: skip
        if delta < 0 and sale["preloaded_at"] is not None:
            await self._sync_total(sale, row)
        return sale, row

    async def _sync_total(self, sale: asyncpg.Record, row: asyncpg.Record) -> None:
        """Redis's total of the SKU set from ``row`` (absolute, idempotent, held and sold
        units kept); a refusal is a Conflict saying why."""
        sku = row["sku"]
        result = await self._sync_sku(sale, row, force=True)
        if result.outcome == "refused_below_committed":
            held = counted(result.counts.held, "unit")
            raise Conflict(f"{sku} has {held} held and {result.counts.sold} "
                           f"sold: its stock cannot go below "
                           f"{result.counts.held + result.counts.sold}",
                           code="below_committed")  # fmt: skip
        if result.outcome == "refused_lost":
            raise Conflict(f"Redis no longer holds {sku}: run `flashsale reconcile --once` to "
                           "rebuild it from Postgres", code="rebuild_needed")  # fmt: skip
        if result.outcome.startswith("refused"):
            raise Conflict(f"Redis refused the new stock of {sku}: {result.outcome}")

    async def remove_sku(self, sale_id: str, sku: Any, *,
                         with_skus: bool = True) -> dict[str, Any]:  # fmt: skip
        """Take a SKU out of a sale, if nobody ever reserved it: no order in Postgres, no
        hold, sold unit or pending event in Redis (``lua/retire.lua``, per stock bucket).
        Postgres's row is deleted in a transaction that commits only once Redis retired the
        SKU; should that commit fail, the reconciler rebuilds the SKU from Postgres."""
        sku = identifier(sku, "sku")
        async with self.pool.acquire() as conn, conn.transaction():
            sale, row = await self._sku_for_update(conn, sale_id, sku, lock_sale=True)
            others = [s for s in preloaded(await fetch_skus(conn, sale_id)) if s["sku"] != sku]
            if sale["preloaded_at"] is not None and not others:  # buyers would queue for nothing
                raise Conflict(f"{sku} is the last SKU of sale {sale_id} buyers can reserve: add "
                               "and preload another first, or end the sale (`sale end`)",
                               code="last_sku")  # fmt: skip
            if await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM orders WHERE sale_id = $1 AND sku = $2)",
                sale_id, sku,
            ):  # fmt: skip
                raise Conflict(f"{sku} has orders: it stays in the sale", code="sku_has_orders")
            await conn.execute("DELETE FROM sale_skus WHERE sale_id = $1 AND sku = $2",
                               sale_id, sku)  # fmt: skip
            for keys in bucket_keys(sale_id, sku, row["buckets"]):
                outcome = await self.scripts.retire(keys)
                if outcome.startswith("refused"):
                    raise Conflict(f"{sku} was reserved ({outcome}): it stays in the sale",
                                   code="sku_has_holds")  # fmt: skip
            version = await conn.fetchval(SKUS_VERSION, sale_id)  # moved by the DELETE
            # Under the sale's lock: removals at once each wrote a list that kept the
            # other's SKU, written after their commits in any order.
            await self.scripts.set_fields(SaleKeys(sale_id).sale, {
                "skus": ",".join(s["sku"] for s in others), "skus_version": str(version),
            })  # fmt: skip
        return await self.get(sale_id) if with_skus else sale_json(await self.row(sale_id))

    async def _sku_for_update(
        self, conn: asyncpg.Connection, sale_id: str, sku: str, *, lock_sale: bool = False
    ) -> tuple[asyncpg.Record, asyncpg.Record]:
        """The sale (not ended; locked too with ``lock_sale``) and its SKU's row, locked for
        the transaction."""
        sale = await self.sale_row(conn, sale_id, lock=lock_sale)
        if sale_state(sale) == "ended":  # by `sale end` or its end time
            raise Conflict(f"sale {sale_id} has ended", code="sale_ended")
        row = await conn.fetchrow(SKU_ROW + " FOR UPDATE", sale_id, sku)
        if row is None:
            raise await unknown_sku(conn, sale_id, sku)
        return sale, row

    # -- settings and state (allocator.sale_settings) ------------------------------------

    async def set_status(self, sale_id: str, action: str, *,
                         with_skus: bool = True) -> dict[str, Any]:  # fmt: skip
        return await sale_settings.set_status(self, sale_id, action, with_skus=with_skus)

    async def delete(self, sale_id: str) -> dict[str, Any]:
        return await sale_settings.delete(self, sale_id)

    async def set_admission_rate(self, sale_id: str, rate: Any) -> dict[str, Any]:
        return await sale_settings.set_admission_rate(self, sale_id, rate)

    async def update(self, sale_id: str, changes: Mapping[str, Any], *,
                     with_skus: bool = True) -> dict[str, Any]:  # fmt: skip
        return await sale_settings.update(self, sale_id, changes, with_skus=with_skus)

    async def update_sku(self, sale_id: str, sku: str, changes: Mapping[str, Any], *,
                         with_skus: bool = True) -> dict[str, Any]:  # fmt: skip
        return await sale_settings.update_sku(self, sale_id, sku, changes, with_skus=with_skus)


async def _insert_skus(conn: asyncpg.Connection, sale_id: str, skus: Sequence[SkuSpec], *,
                       after: int = 0) -> None:  # fmt: skip
    """The SKUs' rows, by COPY (200,000 took 7.7 s as an INSERT each, 2.6 s so), numbered in
    the order given from ``after`` + 1 on: the sale's order (``fetch_skus``)."""
    if not skus:
        return
    await conn.copy_records_to_table(
        "sale_skus",
        columns=("sale_id", "sku", "title", "stock_total", "price", "currency",
                 "per_buyer_limit", "hold_ttl_seconds", "buckets", "position"),
        records=[
            (sale_id, s.sku, s.title, s.stock, s.price, s.currency, s.per_buyer_limit,
             s.hold_ttl_seconds, s.buckets, after + n)
            for n, s in enumerate(skus, 1)
        ],
        timeout=COPY_TIMEOUT_S,
    )  # fmt: skip


SKU_ROW = "SELECT * FROM sale_skus WHERE sale_id = $1 AND sku = $2"


async def _claimed_before(conn: asyncpg.Connection, sale_id: str, key: str, asked: str
                          ) -> bool:  # fmt: skip
    """Whether stock change ``key`` of the sale was made before, as ``asked`` (InvalidInput
    when it asked another change); if not, the key is claimed in the caller's transaction,
    which a refusal of the change rolls back. Read under the sale's lock: a retry arriving
    while the first is under way waits for its commit, then finds it."""
    earlier = await conn.fetchval("SELECT fingerprint FROM stock_changes"
                                  " WHERE sale_id = $1 AND key = $2", sale_id, key)  # fmt: skip
    if earlier is None:
        await conn.execute("INSERT INTO stock_changes (sale_id, key, fingerprint)"
                           " VALUES ($1, $2, $3)", sale_id, key, asked)  # fmt: skip
        return False
    if earlier != asked:
        raise InvalidInput("Idempotency-Key", f"this key changed the stock otherwise ({earlier})",
                           code="idempotency_mismatch")  # fmt: skip
    return True


def _too_few_left(sku: str, stock: int, sold: int) -> str:
    """Why a SKU's stock cannot come down that far, as the most that can come out: its sold
    units stay, and a SKU keeps at least one unit."""
    most = stock - max(1, sold)
    why = (f"sold units stay ({sold:,} sold)" if sold else
           "a SKU keeps at least one (remove the SKU to take it out of the sale)")  # fmt: skip
    return f"at most {most:,} of {sku}'s {counted(stock, 'unit')} can come out: {why}"


def stock_units(value: Any, field: str) -> int:
    """The units a stock change names (``add`` or ``remove``)."""
    return integer(value, field, minimum=1, maximum=MAX_STOCK, what="a positive integer")
