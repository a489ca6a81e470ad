"""A 201 to a reservation means its event is in Kafka: Redis may lose what it was told in its
last moments (FLUSHALL, a restart without persistence) before the outbox relay moved it, and
the buyer must not be left holding a 201 for a reservation that exists nowhere. Found by
``flashsale chaos --scenario redis-flushall``: 4 of 748 acknowledged reservations lost."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from flashsale.cli.devstack.processes import free_port
from flashsale.events import ReservationEvent, decode_event, encode_event, outbox_events
from flashsale.kafka import client_options, ensure_topics
from flashsale.keys import SkuKeys
from flashsale.records import HoldRecord
from flashsale.settings import Settings
from gateway.announcer import Announcer
from gateway.state import CLIENTS
from tests.harness import Gateway, calls_to, gateway
from tests.pipeline import end_offsets


@pytest.fixture
async def gw(stack: Settings) -> AsyncIterator[Gateway]:
    async with gateway(stack) as harness:
        yield harness


async def _messages_since(settings: Settings, since: dict[TopicPartition, int]) -> list[Any]:
    consumer = AIOKafkaConsumer(**client_options(settings),
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        consumer.assign(list(since))
        for tp, offset in since.items():
            consumer.seek(tp, offset)
        ends = await consumer.end_offsets(list(since))
        out: list[Any] = []
        while True:
            positions = [await consumer.position(tp) for tp in since]
            if all(p >= ends[tp] for p, tp in zip(positions, since, strict=True)):
                return out
            batch = await consumer.getmany(timeout_ms=1000)
            out += [record for records in batch.values() for record in records]
    finally:
        await consumer.stop()


async def _reserve(gw: Gateway, buyer: str, key: str) -> tuple[str, tuple[int, dict[str, Any]]]:
    sale = await gw.create_sale(stock=3)
    gw.pump(sale)
    _, joined = await gw.join(sale, buyer)
    admission = (await gw.admitted(sale, joined["ticket"]))["admission_token"]
    return sale, await gw.reserve(sale, buyer, admission, key=key)


async def test_a_201_means_the_reservation_is_already_in_kafka(gw: Gateway) -> None:
    topic = gw.settings.topics.reservations
    await ensure_topics(gw.settings)
    since = await end_offsets(gw.settings, topic)
    sale, (code, reserved) = await _reserve(gw, "durable", "k-durable")
    assert code == 201, reserved
    rid = reserved["reservation_id"]
    # Redis now loses the outbox (FLUSHALL an instant after the answer): no relay ever sees it.
    keys = SkuKeys(sale, "SKU-1")
    redis = gw.app[CLIENTS].redis
    [(_, entry)] = await redis.xrange(keys.outbox)
    await redis.delete(keys.outbox)
    published = [decode_event(r.value) for r in await _messages_since(gw.settings, since)]
    mine = [e for e in published if e.reservation_id == rid]
    assert [e.type for e in mine] == ["reservation.created"]
    # ... the very event the relay would have published: the workers see a duplicate at most.
    [relayed] = [e for e in outbox_events(entry) if e.reservation_id == rid]
    assert encode_event(mine[0]) == encode_event(relayed)


async def test_with_the_broker_out_a_reservation_is_503_then_201_on_retry(
    stack: Settings, gw: Gateway
) -> None:
    """The hold is taken but the broker cannot acknowledge it: the buyer is told to retry
    (503, Retry-After); the retry with the same Idempotency-Key, once the broker is back,
    answers 201 with the same reservation."""
    nowhere = f"127.0.0.1:{free_port()}"
    cut_off = dataclasses.replace(stack, kafka_bootstrap=nowhere)
    async with gateway(cut_off) as lonely:
        sale = await lonely.create_sale(stock=3)
        lonely.pump(sale)
        _, joined = await lonely.join(sale, "patient")
        admission = (await lonely.admitted(sale, joined["ticket"]))["admission_token"]
        key = f"k-{uuid.uuid4().hex[:8]}"
        response = await lonely.http.post(
            f"/v1/sales/{sale}/reservations",
            headers={"Authorization": f"Bearer {lonely.token('patient')}",
                     "X-Admission-Token": admission, "Idempotency-Key": key},
            json={"sku": "SKU-1", "quantity": 1, "payment_token": "tok_ok"},
        )  # fmt: skip
        body = await response.json()
        assert response.status == 503 and response.headers["Retry-After"], body
        holds = await lonely.app[CLIENTS].redis.hgetall(SkuKeys(sale, "SKU-1").holds)
        [(rid, raw)] = holds.items()
        assert HoldRecord.parse(raw).state == "ACTIVE"  # taken, not yet acknowledged
    code, reserved = await gw.reserve(sale, "patient", admission, key=key)
    assert code == 201 and reserved["reservation_id"] == rid.decode(), reserved


async def test_a_gateway_starts_its_producer_before_the_first_reservation(stack: Settings) -> None:
    """``warm`` (called by a gateway's startup) starts the producer ahead of the spike; with the
    broker down it gives up quietly, and the first reservation tries again."""
    warm = Announcer(stack)
    try:
        before = warm.started
        await warm.warm()
        assert (before, warm.started) == (False, True)
    finally:
        await warm.aclose()
    down = Announcer(dataclasses.replace(stack, kafka_bootstrap=f"127.0.0.1:{free_port()}"),
                     timeout_s=0.5)  # fmt: skip
    try:
        await down.warm()  # no exception
        assert not down.started
    finally:
        await down.aclose()


@pytest.mark.parametrize("own_loop", [True, False], ids=["gateway", "listener"])
async def test_reservations_decided_together_reach_kafka_in_one_hop(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, own_loop: bool
) -> None:
    """A reserve batch grants many reservations at once. Each is still acknowledged by the
    broker before its buyer hears of it, but they cross to the producer's thread together:
    one hop each cost a reservation about 80 us of gateway CPU. The reservations listener's
    producer shares its loop: no hop at all, the same acknowledgement."""
    hops = calls_to(monkeypatch, "flashsale.event_loop.LoopThread.call")
    topic = stack.topics.reservations
    await ensure_topics(stack)
    since = await end_offsets(stack, topic)
    announcer = Announcer(stack, own_loop=own_loop)
    try:
        await announcer.warm()
        assert announcer.started
        hops.clear()
        sale = f"together-{uuid.uuid4().hex[:8]}"
        events = [ReservationEvent("reservation.created", f"{sale}~SKU-1~r-{i}", sale, "SKU-1",
                                   f"b{i}", 1, 1500, "EUR", "tok_visa", str(i), f"k{i}",
                                   2_000_000_000_000, 1_900_000_000_000)
                  for i in range(40)]  # fmt: skip
        await asyncio.gather(*(announcer.announce(e) for e in events))
        assert (0 < len(hops) < 5) if own_loop else not hops, len(hops)
    finally:
        await announcer.aclose()
    # Keyed by reservation id, which starts with the sale's id.
    mine = [r for r in await _messages_since(stack, since) if r.key.startswith(sale.encode())]
    assert sorted(decode_event(r.value).reservation_id for r in mine) == sorted(
        e.reservation_id for e in events
    )
