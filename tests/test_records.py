"""The record codecs of flashsale.records held against the Lua scripts, on a real Redis.

Every record the scripts write is read back through its codec, field by field, and encodes
to the very bytes Redis holds; and records the Python side writes (the reconciler's rebuild)
are read by the scripts as they read their own.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

from allocator.queue_scripts import QueueScripts
from allocator.repair_scripts import HoldWrite, RepairScripts
from allocator.sale_scripts import SaleScripts
from flashsale.clients import RedisClient
from flashsale.events import outbox_events
from flashsale.keys import SaleKeys
from flashsale.records import (
    ClaimMember,
    HoldRecord,
    HoldState,
    IdemAnswer,
    ReserveResult,
    idem_field,
    request_fingerprint,
    text,
)
from tests.holds import make_sku, request


async def test_a_grant_is_read_back_field_by_field(client: RedisClient) -> None:
    sku = await make_sku(client, stock=5, limit=2, ttl_ms=120_000)
    req = request("alice", 2, key="k-alice")
    [answer] = await sku.scripts.reserve(sku.keys, [req])
    assert answer.outcome == "reserved" and answer.hold_expires_at_ms is not None

    raw_hold = await client.hget(sku.keys.holds, req.reservation_id)
    assert raw_hold is not None
    hold = HoldRecord.parse(raw_hold)
    assert hold == HoldRecord(
        "ACTIVE", 2, answer.hold_expires_at_ms, "tok_ok", "adm-alice",
        answer.hold_expires_at_ms - 120_000, "", "alice", "k-alice",
    )  # fmt: skip
    assert hold.encode() == text(raw_hold)

    # The remembered answer sits under the field the hold record ends with.
    assert hold.idem_field == idem_field("alice", "k-alice")
    raw_answer = await client.hget(sku.keys.idem, hold.idem_field)
    assert raw_answer is not None
    remembered = IdemAnswer.parse(raw_answer)
    assert remembered == IdemAnswer(2, "tok_ok", answer)
    assert remembered.encode() == text(raw_answer)
    assert answer.encode() == f"reserved\x1f{req.reservation_id}\x1f{answer.hold_expires_at_ms}"


async def test_remembered_refusals_round_trip(client: RedisClient) -> None:
    sku = await make_sku(client, stock=3, limit=2)
    first, over, late = request("bob", 2), request("bob", 1), request("cid", 2)
    granted, limited = await sku.scripts.reserve(sku.keys, [first, over])
    [sold_out] = await sku.scripts.reserve(sku.keys, [late])
    assert (limited.outcome, limited.counted) == ("limit_exceeded", 2)
    assert (sold_out.outcome, sold_out.holds_pending, sold_out.left) == ("sold_out", True, 1)
    for req, answer in ((over, limited), (late, sold_out)):
        raw = await client.hget(sku.keys.idem, idem_field(req.buyer_id, req.idempotency_key))
        assert raw is not None
        remembered = IdemAnswer.parse(raw)
        assert remembered == IdemAnswer(req.quantity, req.payment_ref, answer)
        assert remembered.encode() == text(raw)
    assert granted.outcome == "reserved"


async def test_transitions_change_the_state_and_cause_only(client: RedisClient) -> None:
    sku = await make_sku(client, stock=5)
    paid, failed = request("dee"), request("eli")
    await sku.scripts.reserve(sku.keys, [paid, failed])
    before = {
        rid: HoldRecord.parse(await client.hget(sku.keys.holds, rid) or b"")
        for rid in (paid.reservation_id, failed.reservation_id)
    }
    await sku.scripts.begin_payment(sku.keys, paid.reservation_id)
    await sku.scripts.confirm(sku.keys, paid.reservation_id)
    await sku.scripts.release(sku.keys, failed.reservation_id, "payment_failed")
    moves: list[tuple[str, HoldState, str | None]] = [
        (paid.reservation_id, "SOLD", None), (failed.reservation_id, "RELEASED", "payment_failed"),
    ]  # fmt: skip
    for rid, state, cause in moves:
        raw = await client.hget(sku.keys.holds, rid)
        assert raw is not None
        assert HoldRecord.parse(raw) == before[rid].moved(state, cause)
        assert before[rid].moved(state, cause).encode() == text(raw)


async def test_a_claim_is_read_back(client: RedisClient) -> None:
    keys = SaleKeys(f"claims-{uuid.uuid4().hex[:10]}")
    await SaleScripts(client).put_sale(keys, {"status": "active"}, open_queue=True)
    await client.hset(keys.queue, "serving", 7)
    fingerprint = request_fingerprint("SKU-1", 2, "tok_visa")
    deadline = int(time.time() * 1000) + 60_000
    assert await QueueScripts(client).claim(keys, 7, "k-7", fingerprint, deadline) == "ok"
    members: Any = await client.zrange(keys.claims, 0, -1)
    [raw] = members
    member = ClaimMember.parse(raw)
    assert member == ClaimMember(7, "k-7", fingerprint)
    assert member == ClaimMember.of(7, "k-7", "SKU-1", 2, "tok_visa")
    assert member.encode() == text(raw)
    assert await QueueScripts(client).refused(keys, 7, "k-7", fingerprint)
    [marked] = await client.zrange(keys.claims, 0, -1)
    assert isinstance(marked, bytes)
    assert ClaimMember.parse(marked) == replace(member, refused=True)
    assert ClaimMember.is_refused(marked) and not ClaimMember.is_refused(raw)
    assert ClaimMember.parse(marked).encode() == text(marked)
    assert await QueueScripts(client).used_by(keys, 7) is None  # a refusal used nothing up
    assert await QueueScripts(client).leave(keys, 7) == "left"  # so its buyer may leave
    assert await QueueScripts(client).used_by(keys, 7) == "left"
    [gone] = await client.zrange(keys.claims, 0, -1)
    assert ClaimMember.parse(text(gone)).left and not member.left


async def test_the_scripts_read_what_python_writes(client: RedisClient) -> None:
    """A hold and a remembered answer as the reconciler writes them: the rebuild scripts index
    and count the hold, re-drive its event, and reserve replays the answer."""
    sku = await make_sku(client, stock=5, limit=3)
    now = int(time.time() * 1000)
    hold = HoldRecord("ACTIVE", 3, now + 60_000, "tok_py", "9", now, "", "fay", "k-fay")
    rid = "r-python-written"
    answer = IdemAnswer(3, "tok_py", ReserveResult("reserved", rid, hold.deadline_ms))
    repair = RepairScripts(client)
    await repair.begin(sku.keys)
    written, skipped = await repair.write_holds(
        sku.keys, (sku.keys.sale_id, sku.keys.sku, 1500, "EUR"),
        [HoldWrite(rid, hold.encode(), None, hold.idem_field, answer.encode(), redrive=True)],
    )  # fmt: skip
    assert (written, skipped) == (1, [])
    meta = {text(k): text(v) for k, v in (await client.hgetall(sku.keys.meta)).items()}
    meta.pop("rebuilding")
    result = await repair.finish(sku.keys, 5, meta)
    assert result.after is not None
    assert (result.after.active, result.after.available) == (3, 2)  # counted from the record
    assert await client.hget(sku.keys.buyers, "fay") == b"3"
    assert await client.zscore(sku.keys.deadlines, rid) == hold.deadline_ms
    entries: Any = await client.xrange(sku.keys.outbox)
    [(_, fields)] = entries
    [event] = outbox_events(fields)
    assert (event.reservation_id, event.buyer_id, event.quantity) == (rid, "fay", 3)
    assert (event.payment_ref, event.admission_id, event.idempotency_key) == (
        "tok_py", "9", "k-fay",
    )  # fmt: skip
    assert (event.hold_deadline_ms, event.created_ms) == (hold.deadline_ms, now)
    replay = replace(request("fay", 3, key="k-fay"), payment_ref="tok_py")
    [again] = await sku.scripts.reserve(sku.keys, [replay])
    assert again == answer.answer
