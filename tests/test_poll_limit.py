"""A consumer whose batch waits longer than aiokafka's ``max_poll_interval_ms`` (5 minutes by
default; a second here) stays in its group: the shop, the payment provider or Postgres
may be away that long, and a member that does not poll meanwhile leaves the group. When the
wait ended, its commit was refused: the webhooks sent the whole batch again, and the saga's
workers had their commits refused while their batches went to the next owner. Both keep
polling, their partitions paused, while a batch waits."""

from __future__ import annotations

import asyncio
import logging
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

import flashsale.kafka
import workers.service
import workers.webhooks
from flashsale.kafka import poll_while
from flashsale.settings import Settings
from tests.pipeline import pipeline, provider
from tests.test_webhooks import (
    SECRET,
    Shop,
    lag_reaches_zero,
    nowhere,
    served,
    settled_orders,
    wait_for,
    with_webhooks,
)
from workers.payment_simulator import Knobs
from workers.webhooks import WebhookNotifier, WebhookSender

POLL_LIMIT_MS = 1_000
AWAY_S = 2.5  # the member would leave after 1 to 1.7 s


def poll_limit(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> None:
    """The consumers ``module`` makes leave their group after POLL_LIMIT_MS without a poll, and
    a waiting one polls five times within that (in production: 300 times in 5 minutes)."""
    monkeypatch.setattr(flashsale.kafka, "POLL_WHILE_WAITING_S", POLL_LIMIT_MS / 5000)

    class Limited(AIOKafkaConsumer):  # type: ignore[misc]
        def __init__(self, *topics: str, **options: Any) -> None:
            super().__init__(*topics, **options, max_poll_interval_ms=POLL_LIMIT_MS)

    monkeypatch.setattr(module, "AIOKafkaConsumer", Limited)


def left_a_group(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What said the member left its group or had a commit refused (read before it stops: on
    Kafka, where a group's first generation is 1, a consumer stopping leaves it too)."""
    return [r.getMessage() for r in caplog.records
            if "LeaveGroup" in r.getMessage() or "starting again" in r.getMessage()
            or (r.name.startswith("aiokafka") and r.levelno >= logging.ERROR)]  # fmt: skip


async def test_webhooks_waiting_for_a_shop_longer_than_the_poll_limit_send_each_event_once(
    stack: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "aiokafka")
    poll_limit(monkeypatch, workers.webhooks)
    shop = Shop(status=lambda _id: 503)
    app = web.Application()
    app.router.add_post("/hooks", shop.handle)
    async with served(app) as base, pipeline(stack) as p:
        shop.url = f"{base}/hooks"
        settings = with_webhooks(p, shop)
        async with settled_orders(p, settings) as (_, expected):
            stop = asyncio.Event()
            async with WebhookSender(shop.url, SECRET, first_wait_s=0.05) as sender:
                notifier = WebhookNotifier(settings, p.pool, sender, park=nowhere)
                task = asyncio.create_task(notifier.run(stop))
                await wait_for(lambda: bool(shop.requests), "no webhook sent")
                await asyncio.sleep(AWAY_S)  # the shop away, the batch waiting for it
                back = len(shop.requests)
                shop.status = lambda _id: 200
                await wait_for(lambda: set(expected) <= set(shop.accepted),
                               "not every event sent")  # fmt: skip
                await lag_reaches_zero(settings)  # committed: nothing left for the shop
                left = left_a_group(caplog)
                stop.set()
                await asyncio.wait_for(task, 30)
    answered = shop.requests[back:]
    assert sorted(answered) == sorted(set(answered)), "events sent again after the shop took them"
    assert left == []


async def test_workers_waiting_for_the_provider_longer_than_the_poll_limit_commit_and_go_on(
    stack: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "aiokafka")
    poll_limit(monkeypatch, workers.service)
    async with pipeline(stack, Knobs(latency_ms=AWAY_S * 1000)) as p:
        sale = await p.sale(stock=10)
        ids = await p.reserve(sale, ["tok_visa"] * 3)
        async with provider(p.psp_url, timeout_s=AWAY_S * 3) as psp:
            # One batch in hand: the workers wait for it rather than fetch the next.
            running = p.start_workers(provider=psp, depth=1)
            states = await p.wait_terminal(ids)
            p.psp.knobs = Knobs()  # the provider quick again
            more = await p.reserve(sale, ["tok_visa"])  # after the slow batch: still consumed
            states |= await p.wait_terminal(more)
            left = left_a_group(caplog)
            await running.drain()  # raises what ended the workers
    assert set(states.values()) == {"CONFIRMED"}, states
    assert all(p.psp.captures[rid] == 1 for rid in ids + more)
    assert left == []


@dataclass
class Consumer:
    """The part of a consumer :func:`poll_while` uses. Its second poll meets a rebalance,
    which assigns ``after`` and returns what it fetched from the partitions new to it
    (unpaused, as a rebalance assigns them)."""

    assigned: set[TopicPartition]
    after: set[TopicPartition]
    brought: list[ConsumerRecord]
    held: set[TopicPartition] = field(default_factory=set)
    sought: dict[TopicPartition, int] = field(default_factory=dict)
    polls: int = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self.held)

    def pause(self, *tps: TopicPartition) -> None:
        self.held |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        assert set(tps) <= self.assigned, "resumed a partition no longer assigned"
        self.held -= set(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought[tp] = offset

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        assert timeout_ms == 0
        self.polls += 1
        if self.polls != 2:
            return {}
        new = self.after - self.assigned
        self.assigned, self.held = set(self.after), self.held & self.after
        return {tp: [r for r in self.brought if r.partition == tp.partition] for tp in new}


async def test_a_waiting_consumer_fetches_nothing_and_gives_back_what_a_rebalance_brought(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flashsale.kafka, "POLL_WHILE_WAITING_S", 0.01)
    kept, lost, new = (TopicPartition("t", n) for n in range(3))
    brought = [ConsumerRecord("t", 2, n, 0, 0, None, b"", None, 0, 0, []) for n in (40, 41)]
    consumer = Consumer(assigned={kept, lost}, after={kept, new}, brought=brought)
    pending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(
        0.2, pending.set_exception, RuntimeError("the batch's own failure")
    )
    await asyncio.wait_for(poll_while(consumer, pending), 5)
    assert consumer.polls >= 3  # polled while waiting, so the member stays
    assert consumer.sought == {new: 40}  # what the rebalance brought comes again later
    assert consumer.held == set()  # all it paused and still has, resumed
    with pytest.raises(RuntimeError, match="own failure"):
        pending.result()  # the batch's outcome is left to the caller
