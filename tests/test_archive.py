"""Archiving an ended sale: its audit recorded in Postgres, its per-buyer Redis state deleted,
and every answer about it (join, status, reservation, audit, reconcile) still true."""

from __future__ import annotations

from flashsale.keys import SkuKeys
from flashsale.settings import Settings
from tests.harness import auth, gateway
from tests.pipeline import SKU, pipeline


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
            theirs = await gw.http.get(f"/v1/reservations/{rid}",
                                       headers=auth(gw.token("eve")))  # fmt: skip
            assert theirs.status == 404
            cancel = await gw.http.delete(f"/v1/reservations/{rid}",
                                          headers=auth(gw.token("ada")))  # fmt: skip
            assert cancel.status == 409, await cancel.text()
            assert (await cancel.json())["error"]["code"] == "already_sold"
