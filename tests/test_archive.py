"""Archiving an ended sale: its audit recorded in Postgres, its per-buyer Redis state deleted,
and every answer about it (join, status, reservation, audit, reconcile) still true."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from allocator.sale_admin import SaleAdmin
from flashsale.clients import RedisClient, open_clients
from flashsale.errors import Conflict
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.settings import Settings
from flashsale.timefmt import iso
from gateway.state import CLIENTS
from reconciler.archive import Archived, Archiver, archive_sale, due_sales
from reconciler.audit import audit_sale
from reconciler.reconcile import Reconciler
from reconciler.report import ReconcileMetrics
from tests.harness import ADMIN, auth, gateway, is_utc_z, run_bounded
from tests.pipeline import SKU, drained, pipeline, provider


async def test_a_reservation_redis_no_longer_holds_is_answered_from_its_order(
    stack: Settings,
) -> None:
    """The order in Postgres is the source of truth: a hold Redis lost (or an archived sale
    deleted) is still the buyer's, in the state its order reached."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5)
        [rid] = await p.reserve(sale, ["tok_visa"], buyers=["ada"])
        workers = p.start_workers()
        assert (await p.wait_terminal([rid]))[rid] == "CONFIRMED"
        await workers.drain()
        await p.redis.hdel(SkuKeys(sale, SKU).holds, rid)
        async with gateway(stack) as gw:
            mine = await gw.http.get(f"/v1/reservations/{rid}", headers=auth(gw.token("ada")))
            body = await mine.json()
            assert mine.status == 200, body
            assert (body["state"], body["quantity"], body["sku"]) == ("SOLD", 1, SKU)
            assert body["order"]["state"] == "CONFIRMED"
            assert is_utc_z(body["order"]["updated_at"]), body  # the engine's one time format
            theirs = await gw.http.get(f"/v1/reservations/{rid}",
                                       headers=auth(gw.token("eve")))  # fmt: skip
            assert theirs.status == 404
            cancel = await gw.http.delete(f"/v1/reservations/{rid}",
                                          headers=auth(gw.token("ada")))  # fmt: skip
            assert cancel.status == 409, await cancel.text()
            assert (await cancel.json())["error"]["code"] == "already_sold"


async def _keys_of(client: RedisClient, sale: str, skus: int = 2) -> set[str]:
    """Which of the sale's keys exist: its waiting room's and those of SKU-1.. SKU-``skus``
    (asked one by one: on a cluster they live on several nodes)."""
    room = SaleKeys(sale)
    names = [room.sale, room.queue, room.members, room.steps, room.claims, room.lease, room.fence]
    for i in range(1, skus + 1):
        k = SkuKeys(sale, f"SKU-{i}")
        names += [*k.all(), k.transfers, k.received]
    return {name for name in names if await client.exists(name)}


async def test_an_ended_sale_is_archived_and_still_answers_for_itself(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5, skus=2)
        ids = await p.reserve(sale, ["tok_visa", "tok_visa", "tok_decline"],
                              buyers=["ada", "bob", "cy"])  # fmt: skip
        workers = p.start_workers()
        await p.wait_terminal(ids)
        await drained(p)
        await workers.drain()
        admin = SaleAdmin.build(p.pool, p.redis)
        before = await _keys_of(p.redis, sale)
        async with provider(p.psp_url) as psp:
            with pytest.raises(Conflict) as live:
                await archive_sale(p.pool, p.redis, psp, p.settings, sale)
            assert live.value.code == "sale_not_ended"
            assert await _keys_of(p.redis, sale) == before
            await admin.set_status(sale, "end")
            archived = await archive_sale(p.pool, p.redis, psp, p.settings, sale)
            assert (archived.already, archived.buckets) == (False, 2)
            assert archived.freed_bytes > 0
            left = await _keys_of(p.redis, sale)
            room = SaleKeys(sale)  # the fencing token never goes back; the lease expires
            kept = {room.sale, room.queue, room.fence, room.lease}
            for sku in ("SKU-1", "SKU-2"):
                keys = SkuKeys(sale, sku)
                kept |= {keys.meta, keys.stock, keys.outbox}
            assert left <= kept, left - kept
            assert {SaleKeys(sale).members, SkuKeys(sale, SKU).holds} <= before - left
            again = await archive_sale(p.pool, p.redis, psp, p.settings, sale)
            assert again.already and again.archived_at == archived.archived_at
            assert again.freed_bytes == 0
            # Said as what it is: "archived at T; 0.0 KB of per-buyer Redis state deleted".
            when = iso(archived.archived_at, "seconds")
            assert again.text() == f"{sale}: already archived at {when}; nothing left to delete"
        # Without a payment provider: an archived sale needs no audit, an unknown one is named.
        env = {k: v for k, v in {**os.environ, **p.env()}.items() if k != "FLASHSALE_PSP_URL"}
        command = [sys.executable, "-m", "flashsale", "sale", "archive"]
        rc, out, err = await asyncio.to_thread(run_bounded, [*command, sale], env, 60)
        assert (rc, out.strip()) == (0, again.text()), err
        rc, out, err = await asyncio.to_thread(run_bounded, [*command, "sale-nope"], env, 60)
        assert (rc, out, err.strip()) == (1, "", "flashsale: error: unknown sale 'sale-nope'")
        # `sale status` said nothing of it: the per-buyer state it no longer shows was deleted.
        status = [sys.executable, "-m", "flashsale", "sale", "status", sale]
        rc, out, err = await asyncio.to_thread(run_bounded, status, env, 60)
        said = re.search(r"  archived (\S+) \(its per-buyer Redis state deleted\)\n", out)
        assert rc == 0 and said, out
        assert datetime.fromisoformat(said[1]) == archived.archived_at.replace(microsecond=0)
        async with provider(p.psp_url) as psp:
            audited = await audit_sale(p.pool, p.redis, psp, p.settings, sale)
        assert audited.passed, audited.text()
        assert audited.facts["archived_at"].endswith("Z")  # a report's: to the second
        assert datetime.fromisoformat(audited.facts["archived_at"]) == archived.archived_at.replace(
            microsecond=0
        )
        assert audited.facts["orders"] == 3
        reconciled = await Reconciler(p.pool, p.redis, None, "unused").run_once([sale])
        assert (reconciled.skus, reconciled.changed) == (0, 0)
        assert (await admin.get(sale))["archived_at"] is not None
        counts = await p.counts(sale)
        assert (counts["sold"], counts["available"]) == (2, 3)  # the page's counts are kept
        async with gateway(stack) as gw:
            url = f"/admin/v1/sales/{sale}/archive"
            assert (await gw.http.post(url, headers=auth(gw.token("ada")))).status == 401
            by_api = await gw.http.post(url, headers=auth(ADMIN))
            assert by_api.status == 200 and (await by_api.json())["already"] is True
            assert is_utc_z((await by_api.json())["archived_at"])
            for buyer in ("ada", "newcomer"):  # a member of the room once, and a stranger
                code, body = await gw.join(sale, buyer)
                assert (code, body["error"]["code"]) == (409, "sale_ended"), body
            for rid, buyer, state in zip(ids, ("ada", "bob", "cy"),
                                         ("SOLD", "SOLD", "RELEASED"), strict=True):  # fmt: skip
                got = await gw.http.get(f"/v1/reservations/{rid}", headers=auth(gw.token(buyer)))
                body = await got.json()
                assert (got.status, body["state"], body["hold_expires_at"]) == (200, state, None)
            cancel = await gw.http.delete(f"/v1/reservations/{ids[2]}",
                                          headers=auth(gw.token("cy")))  # fmt: skip
            assert cancel.status == 200 and (await cancel.json())["cause"] == "payment_failed"


async def test_a_sale_whose_audit_fails_is_not_archived(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5)
        [rid] = await p.reserve(sale, ["tok_visa"])
        admin = SaleAdmin.build(p.pool, p.redis)
        await admin.set_status(sale, "end")
        with pytest.raises(Conflict) as unaudited:  # its audit asks the provider for charges
            await archive_sale(p.pool, p.redis, None, p.settings, sale)
        assert unaudited.value.code == "no_payment_provider"
        assert "FLASHSALE_PSP_URL" in str(unaudited.value)
        async with provider(p.psp_url) as psp:
            with pytest.raises(Conflict) as held:  # its hold is ACTIVE, its order not written
                await archive_sale(p.pool, p.redis, psp, p.settings, sale)
            assert held.value.code == "archive_refused"
            assert "SKU-1: held" in str(held.value)
            workers = p.start_workers()
            await p.wait_terminal([rid])
            await drained(p)
            await workers.drain()
            await p.redis.delete(SaleKeys(sale).claims)  # the reservation's admission is lost
            before = await _keys_of(p.redis, sale)
            with pytest.raises(Conflict) as failed:
                await archive_sale(p.pool, p.redis, psp, p.settings, sale)
        assert failed.value.code == "audit_failed" and "invariants 7" in str(failed.value)
        assert await _keys_of(p.redis, sale) == before
        assert (await admin.get(sale))["archived_at"] is None


async def test_the_reconciler_archives_a_sale_once_it_is_due(stack: Settings) -> None:
    """An ended sale is archived once due; one whose audit fails is put off, not audited again
    at every pass."""
    async with pipeline(stack) as p:
        sale, broken = await p.sale(stock=5), await p.sale(stock=5)
        ids = await p.reserve(sale, ["tok_visa"]) + await p.reserve(broken, ["tok_visa"])
        workers = p.start_workers()
        await p.wait_terminal(ids)
        await drained(p)
        await workers.drain()
        admin = SaleAdmin.build(p.pool, p.redis)
        for each in (sale, broken):
            await admin.set_status(each, "end")
        await p.redis.delete(SaleKeys(broken).claims)  # its audit fails: invariant 7
        settings = dataclasses.replace(p.settings, psp_url=p.psp_url)
        registry = CollectorRegistry()

        def archives(outcome: str) -> float:
            return registry.get_sample_value("flashsale_sales_archived_total",
                                             {"outcome": outcome}) or 0.0  # fmt: skip

        async with open_clients(settings) as c:
            archiver = Archiver(c, settings, 3600.0, ReconcileMetrics(registry))
            await archiver.run([sale, broken])  # ended just now: not due an hour after the end
            assert await p.redis.exists(SaleKeys(sale).members) == 1
            assert archives("archived") == archives("refused") == 0
            archiver.after_s = 0.0
            await archiver.run([sale, broken])
            assert await p.redis.exists(SaleKeys(sale).members) == 0
            assert (archives("archived"), archives("refused")) == (1, 1)
            await archiver.run([sale, broken])  # the refused one waits its turn
            assert (archives("archived"), archives("refused")) == (1, 1)
        assert await due_sales(p.pool, 0.0, [sale, broken]) == [broken]
        assert await p.redis.exists(SkuKeys(broken, SKU).holds) == 1


async def test_a_join_to_an_ended_sale_redis_lost_is_told_it_ended(stack: Settings) -> None:
    """Postgres knows the sale ended: a restore would not change that answer (and the
    reconciler restores no sale it is done with, archived or ended long ago)."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=3)
        _, early = await gw.join(sale, "early")
        await SaleAdmin.build(gw.app[CLIENTS].pool, gw.app[CLIENTS].redis).set_status(sale, "end")
        await gw.app[CLIENTS].redis.delete(SaleKeys(sale).sale, SaleKeys(sale).queue)
        await asyncio.sleep(0.2)  # past the process's cache of the sale's counters
        code, body = await gw.join(sale, "late")
        assert (code, body["error"]["code"]) == (409, "sale_ended"), body
        code, body = await gw.status(sale, early["ticket"])
        assert (code, body["state"]) == (200, "expired"), body


@pytest.mark.parametrize("lost", ["sku", "room", "everything"])
async def test_a_reserve_at_an_ended_sale_redis_lost_is_told_it_ended(
    stack: Settings, lost: str
) -> None:
    """An admitted buyer reserving after the end (within their admission window) was 503
    "retry" for good once Redis had lost the SKU or the room: the reconciler restores no sale
    it is done with, and no restore would change the answer Postgres already gives."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=3)
        gw.pump(sale)
        _, joined = await gw.join(sale, "buyer")
        admission = (await gw.admitted(sale, joined["ticket"]))["admission_token"]
        await SaleAdmin.build(gw.app[CLIENTS].pool, gw.app[CLIENTS].redis).set_status(sale, "end")
        gone = {
            "sku": SkuKeys(sale, "SKU-1").all(),
            "room": SaleKeys(sale).all(),
            "everything": [*SkuKeys(sale, "SKU-1").all(), *SaleKeys(sale).all()],
        }[lost]
        await gw.app[CLIENTS].redis.delete(*gone)
        await asyncio.sleep(0.2)  # past the process's cache of the sale's counters
        code, body = await gw.reserve(sale, "buyer", admission)
        assert (code, body["error"]["code"]) == (409, "sale_ended"), body
        if lost != "sku":  # the room is gone: leaving it was 503 "retry" for good too
            left = await gw.http.delete(f"/v1/sales/{sale}/queue", headers={
                **auth(gw.token("buyer")), "X-Queue-Ticket": joined["ticket"]})  # fmt: skip
            assert left.status == 409, await left.text()
            assert (await left.json())["error"]["code"] == "sale_ended"


def test_an_archive_of_one_stock_bucket_says_it_in_the_singular() -> None:
    """A one-SKU sale was archived "(1 stock buckets, the waiting room)"."""
    at = datetime(2031, 12, 1, 12, 0, tzinfo=UTC)
    one = Archived("sale-x", at, buckets=1, already=False, freed_bytes=2048)
    assert one.text() == ("sale-x: archived at 2031-12-01T12:00:00Z: audit passed and recorded; "
                          "2.0 KB of per-buyer Redis state deleted (1 stock bucket, the waiting "
                          "room)")  # fmt: skip
    assert "(3 stock buckets," in dataclasses.replace(one, buckets=3).text()
