"""One admission, one purchase, whatever the buyer asks in between: random sequences of
reservation requests through the admission gate of the reserve script (a single Redis node)
on two SKUs of one sale, with refusals (sold out, over the limit) and units coming back, on
real Redis. Over HTTP: tests/test_gateway_queue.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator.hold_scripts import Admit, HoldScripts, ReserveRequest
from allocator.sale_scripts import SaleScripts
from flashsale.clients import redis_client
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.records import ClaimMember, text
from flashsale.settings import Settings
from tests.holds import single_node_only

SKUS = ("SKU-1", "SKU-2")
# (position, key, SKU, quantity, payment) of a request, or a cancel of the n-th grant so far
REQUEST = st.tuples(st.integers(1, 3), st.sampled_from(["k1", "k2", "k3"]), st.sampled_from(SKUS),
                    st.integers(1, 2), st.sampled_from(["tok_a", "tok_b"]))  # fmt: skip
STEP = st.one_of(st.lists(REQUEST, min_size=1, max_size=3), st.integers(0, 5))


async def _sale(client: Any) -> SaleKeys:
    """A live sale of two SKUs (1 and 2 units), every place up to 3 admitted."""
    sale = SaleKeys(f"sale-{uuid.uuid4().hex[:10]}")
    now = int(time.time() * 1000)
    skus = [SkuKeys(sale.sale_id, sku) for sku in SKUS]
    for keys, stock in zip(skus, (1, 2), strict=True):
        meta = {"sale_id": sale.sale_id, "sku": keys.sku, "price": "1500", "currency": "EUR",
                "per_buyer_limit": "2", "hold_ttl_ms": "60000", "status": "active",
                "starts_at_ms": str(now - 60_000), "ends_at_ms": str(now + 3_600_000)}  # fmt: skip
        await SaleScripts(client).preload(keys, total=stock, meta=meta, force=False, first=True)
    await client.hset(sale.queue, mapping={"live": 1, "serving": 3})
    return sale


async def _run(stack: Settings, steps: list[Any]) -> None:
    client = redis_client(stack)
    try:
        single_node_only(client)
        sale = await _sale(client)
        scripts = HoldScripts(client)
        deadline = int(time.time() * 1000) + 600_000
        granted: dict[str, tuple[int, str]] = {}  # reservation id -> (position, claim member)
        for step in steps:
            if isinstance(step, int):  # a buyer cancels a hold: its units come back
                if granted:
                    rid = sorted(granted)[step % len(granted)]
                    await scripts.cancel(SkuKeys(sale.sale_id, rid.split("~")[1]), rid)
                continue
            sku = step[0][2]  # one batch per SKU, as the allocator sends them
            batch = [
                ReserveRequest(f"{sale.sale_id}~{sku}~r-{uuid.uuid4().hex}", f"buyer-{p}", q,
                               key, pay, str(p),
                               Admit(ClaimMember.of(p, key, sku, q, pay).encode(), deadline))
                for p, key, _, q, pay in step
            ]  # fmt: skip
            results = await scripts.reserve(SkuKeys(sale.sale_id, sku), batch)
            for request, result in zip(batch, results, strict=True):
                if result.outcome == "reserved" and result.reservation_id:
                    assert request.admit is not None
                    place = int(request.admission_id)
                    granted.setdefault(result.reservation_id, (place, request.admit.member))
        claims = {text(m) for m in await client.zrange(sale.claims, 0, -1)}
        per_position: dict[int, set[str]] = {}
        for rid, (position, member) in granted.items():
            per_position.setdefault(position, set()).add(rid)
            assert member in claims, (rid, member, claims)  # the grant holds its admission
        assert all(len(ids) == 1 for ids in per_position.values()), per_position
        for position in (1, 2, 3):
            at = [m for m in claims if m.startswith(f"{position}\x1f")]
            assert len(at) <= 1, at  # one claim per place
    finally:
        await client.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=10))
def test_an_admission_buys_at_most_once_whatever_is_refused_before(
    stack: Settings, steps: list[Any]
) -> None:
    asyncio.run(_run(stack, steps))
