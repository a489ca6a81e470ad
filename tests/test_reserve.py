"""The reserve script against real Redis: grants, refusals, idempotency, batches, and the
validation of a request before it is sent."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from allocator.hold_scripts import HoldScripts
from flashsale.errors import InvalidInput
from flashsale.events import outbox_events
from flashsale.keys import SkuKeys
from flashsale.records import HoldRecord, text
from tests.holds import make_sku, request, reserve


async def test_reserve_grants_and_records_everything(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=10, ttl_ms=120_000)
    before_ms = int(time.time() * 1000)
    req = request("alice", 2)
    result = await reserve(sku, req)
    assert result.outcome == "reserved"
    assert result.reservation_id == req.reservation_id
    assert result.hold_expires_at_ms is not None
    assert abs(result.hold_expires_at_ms - (before_ms + 120_000)) < 5_000
    counts = await sku.assert_conserved()
    assert (counts["available"], counts["active"]) == (8, 2)
    assert await sku.hold_state(req.reservation_id) == "ACTIVE"
    assert (await sku.deadline_index())[req.reservation_id] == result.hold_expires_at_ms
    assert await client.hget(sku.keys.buyers, "alice") == b"2"
    [event] = await sku.events()
    assert event.type == "reservation.created"
    assert event.reservation_id == req.reservation_id
    assert (event.buyer_id, event.quantity, event.amount) == ("alice", 2, 3000)
    assert (event.sale_id, event.sku, event.currency) == (sku.keys.sale_id, "SKU-1", "EUR")
    assert (event.payment_ref, event.admission_id) == ("tok_ok", "adm-alice")
    assert event.idempotency_key == req.idempotency_key
    assert event.hold_deadline_ms == result.hold_expires_at_ms
    assert event.created_ms is not None and abs(event.created_ms - before_ms) < 5_000


async def test_repeated_key_returns_the_original_answer(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=10)
    first = await reserve(sku, request("bob", 1, key="k1"))
    # A retry carries a fresh reservation id; the original answer comes back unchanged.
    again = await reserve(sku, request("bob", 1, key="k1"))
    assert again == first
    assert (await sku.counts())["active"] == 1
    assert len(await sku.events()) == 1
    mismatch = await reserve(sku, request("bob", 2, key="k1"))
    assert mismatch.outcome == "idempotency_mismatch"
    # The same key from another buyer is another request.
    other = await reserve(sku, request("carol", 1, key="k1"))
    assert other.outcome == "reserved"
    assert other.reservation_id != first.reservation_id


@pytest.mark.parametrize(
    ("options", "outcome"),
    [
        ({"starts_in_ms": 60_000}, "not_started"),
        ({"status": "paused"}, "paused"),
        ({"status": "ended"}, "ended"),
        ({"starts_in_ms": -7_200_000, "ends_in_ms": -1}, "ended"),
    ],
)
async def test_sale_not_live_is_refused(
    client: aioredis.Redis, options: dict[str, Any], outcome: str
) -> None:
    sku = await make_sku(client, **options)
    assert (await reserve(sku, request())).outcome == outcome
    assert (await sku.counts())["available"] == 10
    assert await sku.events() == []
    # Not remembered: the same key is decided afresh once the sale is live.
    assert await client.hlen(sku.keys.idem) == 0


async def test_unpreloaded_sku_is_unavailable(client: aioredis.Redis) -> None:
    keys = SkuKeys(f"sale-{uuid.uuid4().hex[:10]}", "GHOST")
    [result] = await HoldScripts(client).reserve(keys, [request()])
    assert result.outcome == "unavailable"
    assert await client.exists(keys.stock, keys.holds) == 0


async def test_limit_counts_active_paying_and_sold(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=10, limit=3)
    a = await reserve(sku, request("dan", 1))
    b = await reserve(sku, request("dan", 1))
    c = await reserve(sku, request("dan", 1))
    assert a.reservation_id and b.reservation_id and c.reservation_id
    await sku.scripts.begin_payment(sku.keys, a.reservation_id)
    await sku.scripts.begin_payment(sku.keys, b.reservation_id)
    await sku.scripts.confirm(sku.keys, b.reservation_id)
    over = await reserve(sku, request("dan", 1))
    assert (over.outcome, over.counted) == ("limit_exceeded", 3)
    # Releasing the ACTIVE one frees exactly its unit for this buyer.
    await sku.scripts.release(sku.keys, c.reservation_id, "cancelled")
    assert (await reserve(sku, request("dan", 1))).outcome == "reserved"
    assert (await reserve(sku, request("dan", 1))).outcome == "limit_exceeded"
    await sku.assert_conserved()


async def test_sold_out_says_whether_holds_may_return(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=2, limit=5)
    held = await reserve(sku, request("erin", 2))
    assert held.reservation_id
    pending = await reserve(sku, request("fay", 1))
    assert (pending.outcome, pending.holds_pending) == ("sold_out", True)
    await sku.scripts.begin_payment(sku.keys, held.reservation_id)
    await sku.scripts.confirm(sku.keys, held.reservation_id)
    final = await reserve(sku, request("gus", 1))
    assert (final.outcome, final.holds_pending) == ("sold_out", False)
    too_many = await reserve(sku, request("hal", 0))
    assert too_many.outcome == "invalid_quantity"


async def test_batch_requests_are_decided_independently_in_order(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=3, limit=2)
    reqs = [request("a", 2), request("a", 1), request("b", 2), request("c", 1), request("d", 1)]
    results = await sku.scripts.reserve(sku.keys, reqs)
    assert [r.outcome for r in results] == [
        "reserved", "limit_exceeded", "sold_out", "reserved", "sold_out",
    ]  # fmt: skip
    await sku.assert_conserved()


async def test_repeats_inside_one_batch_see_earlier_answers(client: aioredis.Redis) -> None:
    """A double click can land both requests in one batch: the second must replay the first."""
    sku = await make_sku(client, stock=10, limit=2)
    first = request("eve", 2, key="dbl")
    reqs = [
        first,
        request("eve", 2, key="dbl"),  # same key, same body: replayed, not granted again
        replace(first, reservation_id="r-other", payment_ref="tok_other"),  # same key, new body
        request("eve", 1),  # new key: eve already has 2 of 2
        request("sam", 1),
        request("sam", 1),
    ]
    results = await sku.scripts.reserve(sku.keys, reqs)
    assert results[1] == results[0] and results[0].reservation_id == first.reservation_id
    assert [r.outcome for r in results[2:]] == [
        "idempotency_mismatch", "limit_exceeded", "reserved", "reserved",
    ]  # fmt: skip
    assert results[3].counted == 2
    counts = await sku.assert_conserved()
    assert counts["active"] == 4
    assert {text(k): int(v) for k, v in (await client.hgetall(sku.keys.buyers)).items()} == {
        "eve": 2, "sam": 2,
    }  # fmt: skip
    assert len(await sku.events()) == 3
    assert len(await sku.deadline_index()) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reservation_id", ""),
        ("buyer_id", "a\x1fb"),
        ("idempotency_key", "k\x1e"),
        ("payment_ref", None),
        ("admission_id", 7),
        ("quantity", "1"),
        ("quantity", True),
    ],
)
def test_request_validation_names_the_field(field: str, value: object) -> None:
    changes: dict[str, Any] = {field: value}
    bad = replace(request("val"), **changes)
    with pytest.raises(InvalidInput) as caught:
        bad.validate()
    assert caught.value.field == field


def test_outbox_entry_must_carry_what_it_says() -> None:
    record = "ACTIVE\x1f1\x1f2000\x1ftok\x1fadm\x1f1000\x1f\x1fbuyer\x1fkey"
    entry = {"type": "reservation.created", "sale_id": "s", "sku": "k", "unit_price": "5",
             "currency": "EUR", "count": "2", "r-1": record}  # fmt: skip
    with pytest.raises(ValueError, match="says 2 holds"):
        outbox_events(entry)
    [event] = outbox_events({**entry, "count": "1"})
    assert (event.reservation_id, event.buyer_id, event.amount) == ("r-1", "buyer", 5)
    with pytest.raises(ValueError, match="malformed hold record"):
        HoldRecord.parse("ACTIVE\x1f1")
