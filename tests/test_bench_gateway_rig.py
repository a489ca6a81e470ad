"""What ``flashsale bench gateway`` drives its rows with must be what buyers send: a row that
makes the gateway do work a buyer's request would not measures the wrong thing."""

from __future__ import annotations

import dataclasses

import aiohttp

from allocator.discovery import HOLDING_SALES
from flashsale.clients import pg_pool, redis_client
from flashsale.settings import Secret, Settings
from loadtest.bench import discard_sales
from loadtest.bench_gateway_rig import SKU, prepare_sale, waiting_tickets
from reconciler.reconcile import Reconciler

from .harness import ADMIN, gateway


async def test_the_status_row_polls_with_tickets_the_gateway_keeps(stack: Settings) -> None:
    """The row's tickets lasted an hour, the gateway's last until the sale's end and an hour
    more: every poll of the row was answered a ticket signed afresh, as only a sale moved later
    makes a buyer's poll, and the row's CPU per request counted that signing."""
    async with gateway(stack) as gw, aiohttp.ClientSession() as session:
        base = str(gw.http.make_url("")).rstrip("/")
        admin = dataclasses.replace(stack, admin_token=Secret(ADMIN))  # the harness gateway's
        sale = await prepare_sale(session, base, admin)
        try:
            tickets = await waiting_tickets(stack, sale, 3)
            for _ in range(3):
                polled = await gw.http.get(
                    f"/v1/sales/{sale}/queue/status", headers={"X-Queue-Ticket": next(tickets)}
                )
                assert polled.status == 200, await polled.text()
                body = await polled.json()
                assert body["state"] == "waiting", body
                assert "ticket" not in body, body
        finally:
            await discard_sales(stack, [sale], [SKU])


async def test_the_sales_a_run_discarded_are_gone(stack: Settings) -> None:
    """A run ends its sales and deletes their Redis state, so that no engine on the stack takes
    up their tens of thousands of holds. Their rows stayed: listed by `sale list` among the
    shop's sales, tried again and again by the archive, and, to the reconciler of an engine
    started within a quarter of an hour (`make demo` after a benchmark), sales whose state
    Redis had lost: it wrote them back, a repair recorded for each and a
    FlashsaleReconcileRepairs alert for a benchmark. A sale an engine made orders of stays,
    recorded as cleared: out of the reconciler's scope and the allocator's (whose relay made
    its outbox streams again)."""
    async with gateway(stack) as gw, aiohttp.ClientSession() as session:
        base = str(gw.http.make_url("")).rstrip("/")
        admin = dataclasses.replace(stack, admin_token=Secret(ADMIN))
        gone, kept = [await prepare_sale(session, base, admin) for _ in range(2)]
    pool, client = await pg_pool(stack, max_size=2), redis_client(stack)
    try:
        await pool.execute(
            "INSERT INTO orders (id, sale_id, sku, buyer_id, quantity, amount, currency, "
            "admission_id, payment_token, state) VALUES ($1, $2, $3, 'b', 1, 100, 'EUR', 'a', "
            "'tok', 'CONFIRMED')", f"r-{kept}", kept, SKU)  # fmt: skip
        await discard_sales(stack, [gone, kept], [SKU])
        rows = await pool.fetch("SELECT id, redis_cleared_at FROM sales WHERE id = ANY($1)",
                                [gone, kept])  # fmt: skip
        assert [(r["id"], r["redis_cleared_at"] is not None) for r in rows] == [(kept, True)]
        for sale in (gone, kept):
            assert [k async for k in client.scan_iter(match=f"*{sale}*")] == [], sale
        report = await Reconciler(pool, client, None, "unused").run_once(only=[kept])
        assert [(r.kind, r.sku) for r in report.repairs] == [], report.json()
        assert [k async for k in client.scan_iter(match=f"*{kept}*")] == []
        assert kept not in {row["id"] for row in await pool.fetch(HOLDING_SALES)}
    finally:
        await client.aclose()
        await pool.close()
