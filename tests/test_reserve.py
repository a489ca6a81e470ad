"""The reserve script against real Redis: grants, refusals, idempotency, batches, and the
validation of a request before it is sent."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from allocator.hold_scripts import Admit, HoldScripts, ReserveRequest
from allocator.rate_limits import RateKeys
from flashsale.errors import InvalidInput
from flashsale.events import outbox_events
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.records import ClaimMember, HoldRecord, text
from tests.holds import make_sku, request, reserve, single_node_only


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


async def test_sold_out_for_a_quantity_says_how_many_are_left(client: aioredis.Redis) -> None:
    sku = await make_sku(client, stock=3, limit=5)
    ask = request("ivy", 5)
    fewer = await reserve(sku, ask)
    assert (fewer.outcome, fewer.left, fewer.holds_pending) == ("sold_out", 3, False)
    assert await reserve(sku, ask) == fewer  # remembered, as every refusal of the kind
    assert (await reserve(sku, request("ivy", 3))).outcome == "reserved"
    none = await reserve(sku, request("jo", 1))
    assert (none.outcome, none.left, none.holds_pending) == ("sold_out", None, True)


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


# -- the admission gate: rate limits, claim and decision in one call ---------------------------


def _gated(buyer: str, position: int, key: str, *, payment: str = "tok_ok",
           deadline_ms: int | None = None, rates: tuple[int, int, int, int] = (0, 0, 0, 0),
           buyer_key: str | None = None) -> ReserveRequest:  # fmt: skip
    member = ClaimMember.of(position, key, "SKU-1", 1, payment).encode()
    deadline = int(time.time() * 1000) + 60_000 if deadline_ms is None else deadline_ms
    return ReserveRequest(f"r-{uuid.uuid4().hex}", buyer, 1, key, payment, str(position),
                          Admit(member, deadline, RateKeys(None, buyer_key, rates)))  # fmt: skip


async def test_the_gate_claims_the_admission_and_returns_the_hold_with_the_decision(
    client: aioredis.Redis,
) -> None:
    single_node_only(client)
    sku = await make_sku(client, stock=5)
    sale = SaleKeys(sku.keys.sale_id)
    await client.hset(sale.queue, mapping={"live": 1, "serving": 3})
    first = _gated("alice", 1, "k1")
    [granted] = await sku.scripts.reserve(sku.keys, [first])
    assert granted.outcome == "reserved" and granted.reservation_id == first.reservation_id
    hold, event = sku.scripts.created(sku.keys, granted) or pytest.fail("no hold returned")
    assert hold.state == "ACTIVE" and hold.buyer_id == "alice" and hold.admission_id == "1"
    assert (event.amount, event.currency, event.reservation_id) == (
        1500,
        "EUR",
        first.reservation_id,
    )
    [stored] = await sku.events()
    assert stored == event  # what the relay will publish, to the field
    assert first.admit is not None
    claims = await client.zrange(sale.claims, 0, -1, withscores=True)
    assert claims == [(first.admit.member.encode(), 1.0)]

    # The same request again: the same answer, and the hold as it stands now.
    await sku.scripts.begin_payment(sku.keys, first.reservation_id)
    [again] = await sku.scripts.reserve(sku.keys, [replace(first, reservation_id="r-new")])
    assert again.reservation_id == first.reservation_id
    assert HoldRecord.parse((again.hold_record or "").encode()).state == "PAYING"

    refusals = await sku.scripts.reserve(sku.keys, [
        _gated("alice", 1, "k1", payment="tok_other"),  # same key, another body
        _gated("alice", 1, "k2"),  # another key on a used admission
        _gated("bob", 4, "k3"),  # beyond the serving position
        _gated("carol", 2, "k4", deadline_ms=int(time.time() * 1000) - 1),
    ])  # fmt: skip
    assert [r.outcome for r in refusals] == [
        "admission_mismatch", "admission_used", "not_admitted", "admission_expired",
    ]  # fmt: skip
    assert (await sku.counts())["available"] == 4  # none of them touched the stock
    assert await client.zcard(sale.claims) == 1
    assert await client.hlen(sku.keys.idem) == 1  # gate refusals are not remembered

    await client.hdel(sale.queue, "live")  # Redis lost the waiting room
    [lost] = await sku.scripts.reserve(sku.keys, [_gated("dave", 3, "k5")])
    assert lost.outcome == "admission_unavailable"


async def test_the_gate_lets_only_a_grant_use_an_admission_up(client: aioredis.Redis) -> None:
    """A request its decision refused keeps its claim marked refused: asked again it is the
    same request, another key may use the admission while the turn lasts, and a grant uses
    it up. A request asked again after a stock transfer (``passed``) is claimed when granted,
    though its first call was refused."""
    single_node_only(client)
    sku = await make_sku(client, stock=1, limit=1)
    sale = SaleKeys(sku.keys.sale_id)
    await client.hset(sale.queue, mapping={"live": 1, "serving": 3})

    async def claim_at(position: int) -> list[str]:
        return [text(m) for m in await client.zrangebyscore(sale.claims, position, position)]

    [ada] = await sku.scripts.reserve(sku.keys, [_gated("ada", 1, "k1")])
    assert ada.outcome == "reserved" and ada.reservation_id
    bob = _gated("bob", 2, "k2")
    assert bob.admit is not None
    [refused] = await sku.scripts.reserve(sku.keys, [bob])
    assert refused.outcome == "sold_out"
    assert await claim_at(2) == [bob.admit.member + "\x1frefused"]
    await sku.scripts.cancel(sku.keys, ada.reservation_id)  # a unit comes back
    [again] = await sku.scripts.reserve(sku.keys, [replace(bob, reservation_id="r-again")])
    assert again.outcome == "sold_out"  # the same request: its remembered answer
    other_body = _gated("bob", 2, "k2", payment="tok_other")
    [mismatch] = await sku.scripts.reserve(sku.keys, [other_body])
    assert mismatch.outcome == "admission_mismatch"
    after = _gated("bob", 2, "k3")
    assert after.admit is not None
    [granted, used] = await sku.scripts.reserve(sku.keys, [after, _gated("bob", 2, "k4")])
    assert (granted.outcome, used.outcome) == ("reserved", "admission_used")
    assert await claim_at(2) == [after.admit.member]
    # Refused in its bucket, then asked again once stock was lent: claimed by the grant.
    await client.hset(sku.keys.meta, "buckets", 2)  # a bucket's sold_out is not remembered
    cy = _gated("cy", 3, "k5")
    assert cy.admit is not None
    [empty] = await sku.scripts.reserve(sku.keys, [cy])
    assert empty.outcome == "sold_out"
    await client.hincrby(sku.keys.stock, "available", 1)
    [lent] = await sku.scripts.reserve(sku.keys, [replace(cy, admit=cy.admit.passed())])
    assert lent.outcome == "reserved"
    assert await claim_at(3) == [cy.admit.member]


async def test_the_gate_counts_rate_limits_once_per_request_in_a_batch(
    client: aioredis.Redis,
) -> None:
    single_node_only(client)
    sku = await make_sku(client, stock=5, limit=5)
    sale = SaleKeys(sku.keys.sale_id)
    await client.hset(sale.queue, mapping={"live": 1, "serving": 10})
    rates = (0, 0, 1_000_000, 1_000_000)  # per buyer: 1/s, a burst of 2
    key = f"fs:rl:{{buyer:{uuid.uuid4().hex}}}"
    batch = [_gated("erin", p, f"k{p}", rates=rates, buyer_key=key) for p in (1, 2, 3)]
    results = await sku.scripts.reserve(sku.keys, batch)
    assert [r.outcome for r in results] == ["reserved", "reserved", "rate_limited"]
    assert results[2].wait_us is not None and 0 < results[2].wait_us <= 1_000_000
    assert await client.zcard(sale.claims) == 2  # the limited request claimed nothing
    assert 0 < await client.pttl(key) <= 2_001
    # A request that passed the gate before (asked again after a stock transfer) is not
    # counted again, however limited its buyer now is.
    passed = replace(batch[0], admit=batch[0].admit.passed() if batch[0].admit else None)
    [again] = await sku.scripts.reserve(sku.keys, [passed])
    assert again.outcome == "reserved" and again.reservation_id == batch[0].reservation_id


async def test_with_holds_a_grant_comes_back_with_its_hold_and_price(
    client: aioredis.Redis,
) -> None:
    """What a gateway on a Redis Cluster asks for (its claim went first): the grant and the
    hold as it stands, without the admission gate, on any deployment."""
    sku = await make_sku(client, stock=5)
    plain, held = request("gina"), request("hugo")
    [without] = await sku.scripts.reserve(sku.keys, [plain])
    assert without.outcome == "reserved" and without.hold_record is None
    assert sku.scripts.created(sku.keys, without) is None  # the gateway would read it back
    [granted] = await sku.scripts.reserve(sku.keys, [held], with_holds=True)
    hold, event = sku.scripts.created(sku.keys, granted) or pytest.fail("no hold returned")
    assert (hold.state, hold.buyer_id, event.amount, event.currency) == (
        "ACTIVE", "hugo", 1500, "EUR")  # fmt: skip
    assert event in await sku.events()  # what the relay will publish, to the field
    [replayed] = await sku.scripts.reserve(sku.keys, [replace(plain, reservation_id="r-x")],
                                           with_holds=True)  # fmt: skip
    assert replayed.reservation_id == plain.reservation_id and replayed.hold_record
