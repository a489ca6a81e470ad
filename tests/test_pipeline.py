"""The order pipeline end to end on the real stack: Redis outbox -> relay -> Kafka (tansu) ->
workers -> payment simulator -> Postgres."""

from __future__ import annotations

import asyncio
import signal

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from allocator.sale_admin import SaleAdmin
from allocator.sweeper import sweep_once
from flashsale.events import ReservationEvent, decode_event, encode_event
from flashsale.kafka import PARTITIONS, client_options, partition_of
from flashsale.keys import SkuKeys
from flashsale.orders import TERMINAL
from flashsale.settings import Settings
from reconciler.audit import audit_sale
from tests.pipeline import SKU, Pipeline, drained, pipeline, provider
from workers.payment_simulator import Knobs
from workers.saga import Saga
from workers.service import CONSUMER


async def assert_invariants(p: Pipeline, sale_id: str, ids: list[str]) -> dict[str, str]:
    """DESIGN §7 for one drained sale: one terminal state each, conservation, Redis sold =
    Postgres confirmed, one capture per confirmed order, every capture confirmed or refunded."""
    states = await p.wait_terminal(ids)
    counts = await p.counts(sale_id)
    assert counts["total"] == counts["available"] + counts["active"] + counts["paying"] + \
        counts["sold"], counts  # fmt: skip
    assert counts["active"] == counts["paying"] == 0, counts
    confirmed = [i for i, s in states.items() if s == "CONFIRMED"]
    assert counts["sold"] == len(confirmed) == await p.confirmed_units(sale_id)
    events = await p.pool.fetch(
        "SELECT order_id, count(*) FILTER (WHERE to_state IN ('CONFIRMED', 'PAYMENT_FAILED', "
        "'EXPIRED', 'CANCELLED') AND from_state IS DISTINCT FROM to_state) AS terminal "
        "FROM order_events WHERE order_id = ANY($1) GROUP BY order_id", ids,
    )  # fmt: skip
    assert len(events) == len(ids) and all(r["terminal"] == 1 for r in events)
    payments = {r["idempotency_key"]: r["state"] for r in await p.pool.fetch(
        "SELECT idempotency_key, state FROM payments WHERE order_id = ANY($1)", ids)}  # fmt: skip
    assert {k for k, s in payments.items() if s == "CAPTURED"} == set(confirmed)
    stats = await p.psp_stats()
    assert stats["max_captures_per_key"] <= 1
    captured_at_psp = {k for k, c in p.psp.charges.items() if c["status"] == "captured"}
    assert captured_at_psp == set(confirmed)
    refunded_at_psp = {k for k, c in p.psp.charges.items() if c["status"] == "refunded"}
    assert refunded_at_psp == {k for k, s in payments.items() if s == "REFUNDED"}
    return states


async def test_reservations_become_confirmed_or_failed_orders(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=100)
        ids = await p.reserve(sale, ["tok_visa"] * 60 + ["tok_decline"] * 20)
        workers = p.start_workers()
        states = await assert_invariants(p, sale, ids)
        assert sorted(states.values()).count("CONFIRMED") == 60
        assert sorted(states.values()).count("PAYMENT_FAILED") == 20
        # One SKU, keyed by reservation id: its 80 reservations spread over the partitions
        # (one left empty has odds of about 1 in 5,000), each where its key belongs.
        sent = await p.topic_messages(p.settings.topics.reservations, at_least=80)
        partitions = list(range(PARTITIONS["reservations"]))
        assert all(m.partition == partition_of(m.key, partitions) for m in sent)
        assert len({m.partition for m in sent}) >= len(partitions) - 1
        # Declines gave their stock back, in Redis and in the sale status.
        counts = await p.counts(sale)
        assert (counts["available"], counts["sold"]) == (40, 60)
        status = await SaleAdmin.build(p.pool, p.redis).status(sale)
        assert status["skus"][0]["available"] == 40 and status["skus"][0]["confirmed"] == 60
        # Every transition went out on the order-events topic, through the Postgres outbox.
        published = await p.topic_messages(p.settings.topics.order_events, at_least=80 * 2)
        kinds = [orjson.loads(m.value)["type"] for m in published]
        assert kinds.count("order.confirmed") == 60 and kinds.count("order.payment_failed") == 20
        # A published row leaves the outbox: it is a queue, not a second log of every event.
        await _outbox_empties_of(p, ids)
        await workers.drain()


async def _outbox_empties_of(p: Pipeline, ids: list[str]) -> None:
    """Wait until no outbox row holds an event of these orders (a row is taken out in the
    transaction that published it, just after the broker acknowledged it)."""
    left = -1
    for _ in range(50):
        left = await p.pool.fetchval(
            "SELECT count(*) FROM outbox o, json_array_elements(o.payload) e"
            " WHERE e->>'order_id' = ANY($1::text[])",
            ids,
        )
        if left == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{left} events of these orders are still in the outbox")


async def test_duplicates_create_nothing_twice(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=50)
        ids = await p.reserve(sale, ["tok_visa"] * 30)
        workers = p.start_workers()
        await assert_invariants(p, sale, ids)
        calls = (await p.psp_stats())["calls"]
        # A replayed Kafka message and a relay re-publish: the same events, sent again.
        messages = await p.topic_messages(p.settings.topics.reservations, at_least=30)
        for message in messages:
            await p.relay.producer.send_and_wait(
                p.settings.topics.reservations, key=message.key, value=message.value
            )
        m = workers.service.metrics
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while m.duplicates._value.get() < 30:
            assert loop.time() < deadline, "the replayed events were not seen"
            await asyncio.sleep(0.1)
        assert (await p.psp_stats())["calls"] == calls  # nothing charged again
        events = await p.pool.fetchval(
            "SELECT count(*) FROM order_events WHERE order_id = ANY($1)", ids
        )
        assert events == 30 * 2  # created (PAYING), confirmed: once each
        await assert_invariants(p, sale, ids)
        await workers.drain()


async def test_redelivery_to_another_worker_changes_nothing(stack: Settings) -> None:
    """A worker ran the saga and died before committing: the next owner of the partitions
    gets the same messages again."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=20)
        ids = await p.reserve(sale, ["tok_visa"] * 10)
        messages = await p.topic_messages(p.settings.topics.reservations, at_least=10)
        store = p.store(CONSUMER)
        async with provider(p.psp_url) as psp:
            first = Saga(store, p.holds, psp)
            result = await first.run([decode_event(m.value) for m in messages])
        assert result.confirmed == 10
        calls = (await p.psp_stats())["calls"]
        workers = p.start_workers()  # the group has committed nothing: everything comes again
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while workers.service.metrics.duplicates._value.get() < 10:
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
        assert (await p.psp_stats())["calls"] == calls
        await assert_invariants(p, sale, ids)
        await workers.drain()


async def test_timeout_after_success_gives_exactly_one_capture(stack: Settings) -> None:
    async with pipeline(stack, Knobs(hang_s=1.5)) as p:
        sale = await p.sale(stock=10)
        ids = await p.reserve(sale, ["tok_timeout"] * 3 + ["tok_error"] * 2)
        async with provider(p.psp_url, timeout_s=0.5) as psp:
            workers = p.start_workers(provider=psp)
            states = await assert_invariants(p, sale, ids)
            await workers.drain()
        assert set(states.values()) == {"CONFIRMED"}
        for rid in ids:
            assert p.psp.calls[rid] >= 2  # asked again with the same key
            assert p.psp.captures[rid] == 1


async def test_expired_holds_close_their_orders_without_charging(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=10, ttl=1)
        ids = await p.reserve(sale, ["tok_visa"] * 4)
        await asyncio.sleep(1.2)
        assert await sweep_once(p.holds, [SkuKeys(sale, SKU)]) == 4
        workers = p.start_workers()
        states = await assert_invariants(p, sale, ids)
        assert set(states.values()) == {"EXPIRED"}
        assert not any(k in p.psp.calls for k in ids)
        assert (await p.counts(sale))["available"] == 10
        await workers.drain()


async def test_a_late_capture_is_refunded_and_recorded(stack: Settings) -> None:
    """The order went PAYING and the provider captured, but the hold was released meanwhile
    (the reconciler gave a stuck hold back): the capture must be refunded, never confirmed."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5)
        rid, keys, event = await p.one_reservation(sale)
        store = p.store()
        await store.create([event], {rid: ("PENDING", "reservation.created")})
        assert (await p.holds.begin_payment(keys, rid)).ok
        async with p.pool.acquire() as conn:
            await store.advance(conn, [(rid, "payment_started")], ["PENDING"], "PAYING", "x")
        async with provider(p.psp_url) as psp:
            await psp.charge(rid, event.amount or 0, "EUR", "tok_visa")  # captured ...
            assert (await p.holds.release(keys, rid, "expired")).ok  # ... but released first
            result = await Saga(store, p.holds, psp).run([event])
        assert result.refunded == 1 and result.confirmed == 0
        assert (await p.orders([rid]))[rid] == "EXPIRED"
        assert p.psp.charges[rid]["status"] == "refunded"
        payment = await p.pool.fetchval(
            "SELECT state FROM payments WHERE idempotency_key = $1", rid
        )
        assert payment == "REFUNDED"
        assert (await p.counts(sale))["available"] == 5


async def test_poison_messages_go_to_the_dead_letter_topic(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=10)
        topic = p.settings.topics.reservations
        out = p.relay.producer
        await out.send_and_wait(topic, key=b"x", value=b"{not json")
        ghost = ReservationEvent("reservation.created", "ghost~SKU~r-1", "no-such-sale", "SKU",
                                 "b", 1, 100, "EUR", "tok_visa", "adm", "k", 0, 0)  # fmt: skip
        await out.send_and_wait(topic, key=b"x", value=encode_event(ghost))
        ids = await p.reserve(sale, ["tok_visa"] * 3)
        workers = p.start_workers(attempts=2)
        await assert_invariants(p, sale, ids)  # the good ones are not held up
        dead = await p.topic_messages(p.settings.topics.dead_letter, at_least=2)
        reasons = sorted(dict(m.headers)["reason"].decode() for m in dead)
        assert len(dead) == 2
        assert reasons[0] == "no such sale or SKU: no-such-sale/SKU"
        assert reasons[1].startswith("unreadable: not JSON")
        await workers.drain()


async def test_sigkill_mid_saga_then_restart_resolves_everything(stack: Settings) -> None:
    async with pipeline(stack, Knobs(latency_ms=40, jitter_ms=10, decline_rate=0.2)) as p:
        sale = await p.sale(stock=300)
        ids = await p.reserve(sale, ["tok_visa"] * 250)
        # The next worker gets the killed one's partitions once the broker gives up on it: 2 s
        # rather than the suite's 6 (a needless rebalance would only run batches again).
        first = p.spawn_workers(session_timeout_s=2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (await p.pool.fetchval(
            "SELECT count(*) FROM orders WHERE id = ANY($1) AND state = 'PAYING'", ids
        )):  # fmt: skip
            assert loop.time() < deadline, "the worker never started charging"
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = await p.orders(ids)
        # The killed worker's unfinished orders: never written, or written and not ended.
        unfinished = [rid for rid in ids if before.get(rid) not in TERMINAL]
        p.spawn_workers(session_timeout_s=2)
        states = await assert_invariants(p, sale, ids)
        assert set(states.values()) <= {"CONFIRMED", "PAYMENT_FAILED"}
        # The next worker finished each of them as the provider decided it, charging it once.
        outcome = {"captured": "CONFIRMED", "declined": "PAYMENT_FAILED"}
        for rid in unfinished:
            charge = p.psp.charges[rid]
            assert states[rid] == outcome[charge["status"]], (rid, charge)
            assert p.psp.captures.get(rid, 0) == (charge["status"] == "captured")


async def test_sigterm_drains_the_batches_in_hand(stack: Settings) -> None:
    async with pipeline(stack, Knobs(latency_ms=40)) as p:
        sale = await p.sale(stock=300)
        ids = await p.reserve(sale, ["tok_visa"] * 250)
        first = p.spawn_workers()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while "CONFIRMED" not in (await p.orders(ids)).values():
            assert loop.time() < deadline, "the worker never confirmed anything"
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGTERM)
        assert await loop.run_in_executor(None, first.wait, 30) == 0
        # Drained: whatever it had taken is finished; nothing is left mid-saga.
        assert "PAYING" not in (await p.orders(ids)).values()
        p.spawn_workers()
        await assert_invariants(p, sale, ids)


async def test_a_provider_outage_is_waited_out_not_dead_lettered(stack: Settings) -> None:
    async with pipeline(stack) as p:
        sale = await p.sale(stock=50)
        await p.psp_down()
        ids = await p.reserve(sale, ["tok_visa"] * 20)
        workers = p.start_workers(concurrency=5)  # several provider calls per batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while workers.service.metrics.retries._value.get() < 1:
            assert loop.time() < deadline, "the batch did not wait for the provider"
            await asyncio.sleep(0.1)
        assert set((await p.orders(ids)).values()) == {"PAYING"}  # nothing guessed
        await p.psp_up()
        states = await assert_invariants(p, sale, ids)
        assert set(states.values()) == {"CONFIRMED"}
        dead = workers.service.metrics.dead_letters.collect()
        assert sum(s.value for m in dead for s in m.samples if s.name.endswith("_total")) == 0
        await workers.drain()


async def test_a_capture_whose_hold_redis_lost_waits_and_is_not_refunded(stack: Settings) -> None:
    """Redis lost the hold (no persistence, FLUSHALL) while the order was PAYING: that is no
    release, so the capture stays and the order waits for the reconciler's rebuild."""
    async with pipeline(stack) as p:
        sale = await p.sale(stock=5)
        rid, keys, event = await p.one_reservation(sale)
        store = p.store()
        async with provider(p.psp_url) as psp:
            saga = Saga(store, p.holds, psp)
            assert (await p.holds.begin_payment(keys, rid)).ok
            await store.create([event], {rid: ("PAYING", "payment_started")})
            await p.redis.hdel(keys.holds, rid)  # Redis forgets the hold
            result = await saga.run([event])
        assert result.refunded == 0 and result.confirmed == 0
        assert list(result.unresolved.values()) == ["hold unknown_reservation"]
        assert (await p.orders([rid]))[rid] == "PAYING"
        assert p.psp.charges[rid]["status"] == "captured"


async def _group_members(p: Pipeline) -> int:
    admin = AIOKafkaAdminClient(**client_options(p.settings))
    await admin.start()
    try:
        [described] = await admin.describe_consumer_groups([p.settings.consumer_group])
        return len(described.groups[0][5]) if described.groups else 0  # (…, members)
    finally:
        await admin.close()


@pytest.mark.heavy
async def test_three_workers_share_a_hot_sku_and_one_is_killed_mid_spike(
    stack: Settings,
) -> None:
    """Three worker processes in one consumer group; one SIGKILLed while it works, the group
    rebalances, reservations keep arriving; every one ends once, and the audit passes."""
    async with pipeline(stack, Knobs(latency_ms=30, jitter_ms=10, decline_rate=0.1)) as p:
        sale = await p.sale(stock=1000, limit=5)
        first_wave = await p.reserve(sale, ["tok_visa"] * 400)
        workers = [p.spawn_workers() for _ in range(3)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await _group_members(p) < 3:
            assert loop.time() < deadline, "three workers never joined the group"
            await asyncio.sleep(0.2)
        while len([s for s in (await p.orders(first_wave)).values() if s in TERMINAL]) < 40:
            assert loop.time() < deadline, "the workers never got going"
            await asyncio.sleep(0.02)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        second_wave = await p.reserve(sale, ["tok_visa"] * 300)  # while the group rebalances
        ids = first_wave + second_wave
        states = await assert_invariants(p, sale, ids)
        assert set(states.values()) <= {"CONFIRMED", "PAYMENT_FAILED"}
        assert await _group_members(p) == 2  # the killed one left the group
        await drained(p)
        async with provider(p.psp_url) as psp:
            audited = await audit_sale(p.pool, p.redis, psp, p.settings, sale)
        assert audited.passed, audited.text()
