"""The outbox relay on real Redis and the real broker, and the reservations wire format."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from allocator.redis_calls import send_packed
from allocator.relay import GROUP, OutboxRelay, run_relay
from flashsale.clients import redis_client
from flashsale.events import ReservationEvent, decode_event, encode_event
from flashsale.kafka import producer
from flashsale.keys import SkuKeys
from flashsale.settings import Settings
from tests.pipeline import SKU, Pipeline, pipeline, server_calls


async def _own_sku(p: Pipeline) -> tuple[str, SkuKeys]:
    """A sale whose SKU only the test's own relays look at: the harness's relay neither reads
    nor claims it."""
    p.relay.claim_idle_ms = 10**9
    sale = await p.sale(stock=20)
    keys = SkuKeys(sale, SKU)
    p.skus.clear()
    await p.relay._ensure_groups([keys])
    return sale, keys


def _rescuer(p: Pipeline, out: AIOKafkaProducer, claim_idle_ms: int) -> OutboxRelay:
    """A relay that claims what a dead one left pending for ``claim_idle_ms``, each round."""
    topics = p.settings.topics
    return OutboxRelay(p.redis, out, topics.reservations, topics.dead_letter, "rescuer",
                       claim_idle_ms=claim_idle_ms, claim_every_s=0)  # fmt: skip


async def _drop_outboxes(redis: Any, skus: list[SkuKeys]) -> None:
    for start in range(0, len(skus), 500):
        await redis.delete(*(k.outbox for k in skus[start : start + 500]))


def _beside_a_large_sale(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], list[SkuKeys]]:
    """A clock of the test's for the relay, and a scope: a quiet sale of 2,000 SKUs, then a
    sale of one (the last)."""
    clock = [0.0]
    monkeypatch.setattr("allocator.relay.time", SimpleNamespace(monotonic=lambda: clock[0]))
    tag = uuid.uuid4().hex[:8]
    return clock, [*(SkuKeys(f"big-{tag}", f"S{i}") for i in range(2000)),
                   SkuKeys(f"small-{tag}", "S0")]  # fmt: skip


async def test_a_dead_relays_entries_are_claimed_and_published_once_acked(
    stack: Settings,
) -> None:
    async with pipeline(stack) as p:
        sale, keys = await _own_sku(p)
        ids = await p.reserve(sale, ["tok_visa"] * 5)
        out = producer(p.settings)
        await out.start()
        try:
            rescuer = _rescuer(p, out, claim_idle_ms=1500)
            # A relay read the entry, then died before publishing: it stays pending for "dead".
            taken: Any = await p.redis.xreadgroup(GROUP, "dead", {keys.outbox: ">"}, count=10)
            assert taken and len(taken[0][1]) == 1
            assert await rescuer.relay_once([keys]) == 0  # not idle long enough yet
            await asyncio.sleep(1.6)
            assert await rescuer.relay_once([keys]) == 1
        finally:
            await out.stop()
        assert rescuer.stats.claimed == 1 and rescuer.stats.messages == 5
        messages = await p.topic_messages(p.settings.topics.reservations, at_least=5)
        assert sorted(decode_event(m.value).reservation_id for m in messages) == sorted(ids)
        # Keyed by reservation id: one SKU's events spread over the partitions.
        assert sorted(m.key for m in messages) == sorted(i.encode() for i in ids)
        pending = await p.redis.xpending(keys.outbox, GROUP)
        assert pending["pending"] == 0 and await p.redis.xlen(keys.outbox) == 0


async def test_a_dead_relays_entry_deleted_while_pending_is_cleared_not_a_failed_round(
    stack: Settings,
) -> None:
    """Redis 6.2 answers a claimed entry that no longer exists with a bare nil: no id to
    acknowledge. The claim used to send an acknowledgement for id None, and the round failed
    (the other entries it had published were read and sent again)."""
    async with pipeline(stack) as p:
        sale, keys = await _own_sku(p)
        await p.reserve(sale, ["tok_visa"] * 2)
        await p.reserve(sale, ["tok_visa"] * 3)
        taken: Any = await p.redis.xreadgroup(GROUP, "dead", {keys.outbox: ">"}, count=10)
        [(_, entries)] = taken
        assert len(entries) == 2
        await p.redis.xdel(keys.outbox, entries[0][0])  # gone while still pending for "dead"
        out = producer(p.settings)
        await out.start()
        try:
            rescuer = _rescuer(p, out, claim_idle_ms=0)
            for _ in range(3):
                await rescuer.relay_once([keys])
        finally:
            await out.stop()
        assert rescuer.stats.failures == 0 and rescuer.stats.messages == 3
        pending = await p.redis.xpending(keys.outbox, GROUP)
        assert pending["pending"] == 0 and await p.redis.xlen(keys.outbox) == 0


async def test_a_broker_outage_leaves_entries_pending_until_published(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=20)
        keys = SkuKeys(sale, SKU)
        p.skus.clear()
        ids = await p.reserve(sale, ["tok_visa"] * 3)
        gone = producer(p.settings)
        await gone.start()
        await gone.stop()  # the broker connection is gone: every send of this round fails
        relay = OutboxRelay(p.redis, gone, p.settings.topics.reservations,
                            p.settings.topics.dead_letter, "flaky")  # fmt: skip
        with pytest.raises(KafkaError):
            await relay.relay_once([keys])
        assert (await p.redis.xpending(keys.outbox, GROUP))["pending"] == 1
        assert relay.stats.failures == 1
        out = producer(p.settings)
        await out.start()
        try:
            relay.producer = out
            assert await relay.relay_once([keys]) == 1  # its own pending entry, read again
        finally:
            await out.stop()
        messages = await p.topic_messages(p.settings.topics.reservations, at_least=3)
        assert sorted(decode_event(m.value).reservation_id for m in messages) == sorted(ids)
        assert (await p.redis.xpending(keys.outbox, GROUP))["pending"] == 0


def test_wire_format_round_trip_and_poison() -> None:
    event = ReservationEvent("reservation.created", "s~K~r-1", "s", "K", "b", 2, 1500, "EUR",
                             "tok", "adm", "key", 10, 5)  # fmt: skip
    assert decode_event(encode_event(event)) == event
    assert event.amount == 3000
    expired = ReservationEvent("reservation.expired", "s~K~r-1", "s", "K", "b", 2,
                               from_state="ACTIVE", cause="expired", at_ms=7)  # fmt: skip
    assert decode_event(encode_event(expired)) == expired
    good = orjson.loads(encode_event(event))
    bad_cases = {
        b"": "empty",
        b"[1]": "not a JSON object",
        b"{oops": "not JSON",
        orjson.dumps({**good, "extra": 1}): "unknown fields",
        orjson.dumps({**good, "type": "reservation.exploded"}): "unknown event type",
        orjson.dumps({**good, "sale_id": ""}): "sale_id",
        orjson.dumps({**good, "quantity": 0}): "quantity",
        orjson.dumps({**good, "unit_price": -1}): "unit_price",
        orjson.dumps({k: v for k, v in good.items() if k != "currency"}): "currency",
    }
    for raw, why in bad_cases.items():
        with pytest.raises(ValueError, match=why):
            decode_event(raw)


async def test_thousands_of_quiet_outboxes_cost_a_bounded_number_of_reads(
    stack: Settings,
) -> None:
    """A sale of thousands of SKUs stays in the relay's scope while it is live and for a hold
    TTL after it ended. Polling each outbox at a fixed pace cost the allocator a whole core on
    a 10,000-SKU sale with nothing to relay; the reads and the sweep for a dead relay's
    entries are spread instead, at most a fixed number a second in all."""
    redis = redis_client(stack)
    skus = [SkuKeys(f"quiet-{uuid.uuid4().hex[:8]}", f"S{i}") for i in range(2000)]
    out = producer(stack)
    await out.start()
    relay = OutboxRelay(redis, out, stack.topics.reservations, stack.topics.dead_letter,
                        "quiet")  # fmt: skip
    stop = asyncio.Event()

    async def scope() -> list[SkuKeys]:
        return skus

    task = asyncio.create_task(run_relay(relay, scope, stop=stop))
    window_s = 3.0
    try:
        # The first round reads every outbox; then they are quiet.
        sent = await server_calls(redis, ("xreadgroup", "xautoclaim"), after_s=1.0,
                                  window_s=window_s)  # fmt: skip
    finally:
        stop.set()
        await task
        await _drop_outboxes(redis, skus)
        await redis.aclose()
        await out.stop()
    budget = (relay.idle_reads_per_s + relay.claims_per_s) * window_s + 2 * len(skus)
    assert 0 < sent <= budget, (sent, budget)


async def test_no_round_takes_more_than_its_share_of_a_large_scope(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's first round read every outbox of its scope and claimed every one's idle
    entries in one go: for 100,000 SKUs, 11 s in which the allocator's loop served nothing
    else (the pumps' leases lapsed), and again at every claim sweep. Each round now takes at
    most ``per_round`` SKUs of each, the rest in the next rounds."""
    sent: list[int] = []

    async def counted(client: Any, commands: Any, **options: Any) -> Any:
        sent.append(len(commands))
        return await send_packed(client, commands, **options)

    monkeypatch.setattr("allocator.relay.send_packed", counted)
    redis = redis_client(stack)
    skus = [SkuKeys(f"wide-{uuid.uuid4().hex[:8]}", f"S{i}") for i in range(5000)]
    relay = OutboxRelay(redis, None, "unused", "unused", "wide")
    try:
        for _ in range(12):
            await relay.relay_once(skus)
    finally:
        await _drop_outboxes(redis, skus)
        await redis.aclose()
    assert sent and max(sent) <= 2 * relay.per_round, sent
    assert sum(sent) >= 2 * len(skus)  # each outbox read once and swept once by now


async def test_a_round_that_fails_reading_its_own_entries_reads_them_again(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed round the relay reads its own pending entries of every SKU again, a
    slice a round; a round of that sweep that failed dropped its slice, so those entries
    waited for the claim sweep (10 s idle) instead of the next round."""
    redis = redis_client(stack)
    skus = [SkuKeys(f"own-{uuid.uuid4().hex[:8]}", f"S{i}") for i in range(3)]
    relay = OutboxRelay(redis, None, "unused", "unused", "own", per_round=2)
    calls = 0

    async def fails_once(client: Any, commands: Any, **options: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("Redis went away mid-round")
        return await send_packed(client, commands, **options)

    monkeypatch.setattr("allocator.relay.send_packed", fails_once)
    monkeypatch.setattr(relay._claim_turns, "due_skus", lambda *_: [])  # no claim sweep
    relay._retry_own = True
    try:
        with pytest.raises(ConnectionError):
            await relay.relay_once(skus)
        assert relay._own_left == skus  # the failed slice is read again first
        assert await relay.relay_once(skus) == 0 and relay._own_left == skus[2:]
    finally:
        await redis.delete(*(k.outbox for k in skus))
        await redis.aclose()


async def test_skus_new_to_the_scope_are_read_with_their_groups_made(
    stack: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A round makes the consumer group of every SKU it reads. It made only those it swept
    for a dead relay's entries when it did both, so a sale entering the scope mid-sweep got
    NOGROUP for its SKUs, which cleared every group and rescheduled the whole scope: a
    100,000-SKU sale ending kept the allocator at most of a core for a minute."""
    redis = redis_client(stack)
    tag = uuid.uuid4().hex[:8]
    old = [SkuKeys(f"old-{tag}", f"S{i}") for i in range(30)]
    new = [SkuKeys(f"new-{tag}", f"S{i}") for i in range(30)]
    relay = OutboxRelay(redis, None, "unused", "unused", "scope", per_round=10)
    try:
        for _ in range(3):  # every old SKU read and swept: each waits its idle delay now
            await relay.relay_once(old)
        relay._claim_turns.retry([old[0].sale_id], 0.0)  # a claim sweep, old SKUs first
        await relay.relay_once(old + new)  # while the new SKUs are due at once
        assert "consumer group missing" not in caplog.text
        assert all(k in relay._groups for k in new[:10])
    finally:
        await redis.delete(*(k.outbox for k in old + new))
        await redis.aclose()


async def test_a_large_quiet_sale_in_scope_does_not_slow_the_reads_of_a_small_one(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet outbox was read again after a delay that doubled up to a ceiling set by the
    whole scope: beside a 200,000-SKU catalogue sale, 200 s. A hot sale's expiries and
    cancellations reached the broker minutes late. Each sale now has its own ceiling, within
    the same budget of reads (this relay's clock is the test's)."""
    sent: Counter[str] = Counter()

    async def counted(client: Any, commands: Any, **options: Any) -> Any:
        sent.update(c[-2].split("{")[1].split(":")[0] for c in commands if c[0] == "XREADGROUP")
        return await send_packed(client, commands, **options)

    monkeypatch.setattr("allocator.relay.send_packed", counted)
    clock, scope = _beside_a_large_sale(monkeypatch)
    big, small = scope[:-1], scope[-1]
    redis = redis_client(stack)
    relay = OutboxRelay(redis, None, "unused", "unused", "paced", idle_poll_s=0.05,
                        idle_reads_per_s=1000.0, claims_per_s=10**9)  # fmt: skip
    try:
        while clock[0] < 6.0:  # a round every 10 ms; the big sale's ceiling is 2 s
            if clock[0] >= 3.0 and not sent["measured"]:
                sent.clear()
                sent["measured"] = 1
            await relay.relay_once(scope)
            clock[0] = round(clock[0] + 0.01, 2)
    finally:
        await _drop_outboxes(redis, scope)
        await redis.aclose()
    assert sent[small.sale_id] >= 30, sent  # every 50 ms, its own ceiling
    assert sent[big[0].sale_id] <= 1.2 * 1000 * 3.0, sent  # the budget: about 1,000 a second


async def test_a_large_quiet_sale_in_scope_does_not_slow_the_claims_of_a_small_ones_entries(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep for a dead relay's entries went through the whole scope, then waited as long
    as its budget asked for all of it: beside a 200,000-SKU catalogue sale, 200 s before a
    hot sale's pending entries were taken over. Each sale now has its turn at its own pace
    (this relay's clock is the test's)."""
    clock, scope = _beside_a_large_sale(monkeypatch)
    small = scope[-1]
    redis = redis_client(stack)
    relay = OutboxRelay(redis, None, "unused", "unused", "rescuer", claim_idle_ms=0,
                        claims_per_s=200.0)  # the large sale: a sweep every 10 s  # fmt: skip
    claimed_at: list[float] = []

    async def published(work: list[tuple[SkuKeys, list[Any]]]) -> int:
        claimed_at.extend(clock[0] for keys, _ in work if keys == small)
        return 0

    relay._publish = published  # type: ignore[method-assign]
    try:
        await relay._ensure_groups([small])
        while clock[0] < 0.5:  # the first sweep goes through both sales
            await relay.relay_once(scope)
            clock[0] = round(clock[0] + 0.01, 2)
        # A relay reads an entry, then dies before publishing it: pending for "dead".
        await redis.xadd(small.outbox, {"type": "test"})
        taken: Any = await redis.xreadgroup(GROUP, "dead", {small.outbox: ">"}, count=1)
        assert taken
        while clock[0] < 12.0 and not claimed_at:
            await relay.relay_once(scope)
            clock[0] = round(clock[0] + 0.01, 2)
    finally:
        await _drop_outboxes(redis, scope)
        await redis.aclose()
    assert claimed_at and claimed_at[0] <= 1.5, claimed_at  # the small sale's turn: every 1 s
