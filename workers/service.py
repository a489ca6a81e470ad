"""``flashsale workers``: the Kafka consumer that runs the order saga, with the publisher of
the ``order-events`` outbox (:mod:`workers.order_events`) beside it, and the order webhooks to
the storefront (:mod:`workers.webhooks`) when ``FLASHSALE_WEBHOOK_URL`` is set.

* One consumer group (``FLASHSALE_CONSUMER_GROUP``, default ``flashsale-workers``) on the
  ``reservations`` topic; scale by running more processes (up to the topic's partitions).
* Offsets are committed by hand, only after the batch's effects are durable in Postgres (and
  the events that could not finish are parked on the dead-letter topic).
* A rebalance waits for the batch in hand to finish and commit before partitions move, so the
  next owner starts where this one stopped; a duplicate is harmless anyway (inbox, keys).
* SIGTERM drains: the batch in hand finishes and commits, then the consumer leaves.
* A message that cannot be read, or an event that keeps failing for reasons other than an
  unreachable dependency, goes to the dead-letter topic with the reason, after bounded
  retries. An unreachable dependency (Postgres, Redis, the provider's open circuit) is waited
  out instead: nothing is committed until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter as Tally
from collections import deque
from collections.abc import Sequence
from functools import partial

import asyncpg
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from allocator.hold_scripts import HoldScripts
from flashsale.clients import RedisClient, pg_pool, redis_client
from flashsale.events import ReservationEvent, decode_event, event_id
from flashsale.kafka import client_options, poll_while, producer_when_up
from flashsale.ops_endpoints import build_info, dependency_probes, require_topics, serve_ops
from flashsale.orders import OrderStore
from flashsale.outages import describe, is_outage
from flashsale.payments import CircuitBreaker, HttpProvider, PaymentProvider
from flashsale.settings import Settings
from workers.order_events import publish_outbox
from workers.parking import Parked, decoded, park
from workers.saga import BatchResult, Saga
from workers.webhooks import WebhookNotifier, WebhookSender

log = logging.getLogger("flashsale.workers")

CONSUMER = "order-saga"  # the inbox's consumer name
# Plan each batch statement for its own arrays (see flashsale.orders).
BATCH_PLANNING = {"plan_cache_mode": "force_custom_plan"}


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        build_info(registry, "workers")
        self.events = Counter("flashsale_worker_events", "Reservation events consumed, by type",
                              ["type"], registry=registry)  # fmt: skip
        self.orders = Counter("flashsale_worker_orders", "Orders reaching a terminal state",
                              ["state"], registry=registry)  # fmt: skip
        self.duplicates = Counter(
            "flashsale_worker_duplicates", "Events already processed (inbox)", registry=registry
        )
        self.dead_letters = Counter("flashsale_worker_dead_letters",
                                    "Messages parked on the dead-letter topic", ["reason"],
                                    registry=registry)  # fmt: skip
        self.retries = Counter(
            "flashsale_worker_batch_retries",
            "Batches run again after a dependency failed",
            registry=registry,
        )
        self.batch = Histogram("flashsale_worker_batch_duration_seconds", "Time to run one batch",
                               registry=registry)  # fmt: skip
        self.published = Counter(
            "flashsale_worker_order_events_published",
            "Order events moved from the outbox to Kafka",
            registry=registry,
        )
        self.assigned = Gauge("flashsale_worker_partitions", "Partitions assigned",
                              registry=registry)  # fmt: skip
        self.psp_latency = Histogram(
            "flashsale_psp_request_duration_seconds",
            "Payment-provider calls by route and outcome (2xx, 4xx, 5xx, no_answer, "
            "breaker_open)", ["route", "outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=registry,
        )  # fmt: skip
        self.breaker_open = Gauge(
            "flashsale_psp_breaker_open",
            "1 while the circuit breaker fails payment calls fast (open, or its half-open "
            "trial in flight)", registry=registry,
        )  # fmt: skip

        self.webhooks = Histogram(
            "flashsale_webhook_request_duration_seconds",
            "Order webhooks sent to the storefront, by outcome (2xx, 4xx, 5xx, no_answer)",
            ["outcome"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=registry,
        )  # fmt: skip

    def parked(self, reason: str) -> None:
        self.dead_letters.labels(reason).inc()

    def observe_webhook(self, outcome: str, seconds: float) -> None:
        self.webhooks.labels(outcome).observe(seconds)

    def observe_psp(self, route: str, outcome: str, seconds: float) -> None:
        self.psp_latency.labels(route, outcome).observe(seconds)

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """The breaker's state, read at each scrape."""
        self.breaker_open.set_function(lambda: 0.0 if breaker.state == "closed" else 1.0)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: WorkerService, consumer: AIOKafkaConsumer) -> None:
        self.service = service
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Every batch in hand finishes and commits before its partitions go to another worker.
        await self.service.retire_all(self.consumer)
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.service.metrics.assigned.set(len(assigned))
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))


class WorkerService:
    def __init__(
        self,
        settings: Settings,
        *,
        concurrency: int = 256,
        max_batch: int = 2000,
        depth: int = 8,
        attempts: int = 3,
        provider: PaymentProvider | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.attempts = attempts
        self.provider = provider
        self.metrics = WorkerMetrics(registry or CollectorRegistry())
        self.depth = depth
        # Batches in hand, oldest first, with the offsets to commit once each is settled.
        self.in_hand: deque[tuple[asyncio.Task[None], dict[TopicPartition, int]]] = deque()
        self.commit_lock = asyncio.Lock()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    async def run(self, stop: asyncio.Event, ops_port: int | None = None,
                  host: str = "127.0.0.1") -> None:  # fmt: skip
        settings = self.settings
        redis = redis_client(settings)
        # Started during an outage, it waits: the pool connects when asked (each batch waits
        # out an outage), and the broker is waited for below, the probes saying what is down.
        pool = await pg_pool(settings, min_size=2, max_size=8, server_settings=BATCH_PLANNING,
                             lazy=True)  # fmt: skip
        out: AIOKafkaProducer | None = None
        session_ms = round(settings.worker_session_timeout_s * 1000)
        consumer = AIOKafkaConsumer(
            **client_options(settings), group_id=settings.consumer_group,
            client_id=f"flashsale-worker-{self.name}", enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.max_batch,
            session_timeout_ms=session_ms, heartbeat_interval_ms=min(1_000, session_ms // 3),
        )  # fmt: skip
        runner: web.AppRunner | None = None
        provider_cm: contextlib.AbstractAsyncContextManager[PaymentProvider]
        if self.provider is not None:
            provider_cm = contextlib.nullcontext(self.provider)
        else:
            if not settings.psp_url:
                raise RuntimeError("FLASHSALE_PSP_URL is not set (flashsale up starts a psp)")
            http = HttpProvider(settings.psp_url, connections=self.concurrency,
                                observe=self.metrics.observe_psp)  # fmt: skip
            self.metrics.watch_breaker(http.breaker)
            provider_cm = http
        try:
            if ops_port is not None:
                runner = await self._serve_ops(host, ops_port, redis, pool, consumer)
            out = await producer_when_up(settings, stop, "the workers")
            if out is None:
                return
            async with provider_cm as provider:
                store = OrderStore(pool, settings.topics.order_events, CONSUMER)
                saga = Saga(store, HoldScripts(redis), provider, concurrency=self.concurrency)
                consumer.subscribe(
                    [settings.topics.reservations], listener=_Rebalance(self, consumer)
                )
                await consumer.start()
                publisher = asyncio.create_task(
                    publish_outbox(pool, out, stop, on_published=self.metrics.published.inc)
                )
                webhooks = asyncio.create_task(self._webhooks(pool, out, stop))
                try:
                    await self._consume(consumer, out, saga, stop)
                finally:
                    stop.set()
                    await publisher
                    await webhooks
        finally:
            with contextlib.suppress(KafkaError, OSError):
                await consumer.stop()
            if out is not None:
                await out.stop()
            if runner is not None:
                await runner.cleanup()
            await pool.close()
            await redis.aclose()

    async def _consume(self, consumer: AIOKafkaConsumer, out: AIOKafkaProducer, saga: Saga,
                       stop: asyncio.Event) -> None:  # fmt: skip
        """Up to ``depth`` batches in hand at once, so one batch's Postgres and provider
        waits overlap the next one's work. Offsets are committed strictly in order, each
        only once its batch (and every older one) is settled."""
        try:
            while not stop.is_set():
                await self._retire(consumer, finished_only=True)
                if len(self.in_hand) >= self.depth:  # an outage may last: still polled
                    await poll_while(consumer, self.in_hand[0][0])
                    continue
                batch = await consumer.getmany(timeout_ms=10 if self.in_hand else 100,
                                               max_records=self.max_batch)  # fmt: skip
                if not batch:
                    continue
                records = [r for tp in sorted(batch) for r in batch[tp]]
                task = asyncio.get_running_loop().create_task(
                    self._settle(records, out, saga, stop)
                )
                self.in_hand.append((task, {tp: rs[-1].offset + 1 for tp, rs in batch.items()}))
        finally:
            await self.retire_all(consumer)

    async def retire_all(self, consumer: AIOKafkaConsumer) -> None:
        """Wait for every batch in hand, committing each in order (drain, rebalance)."""
        await self._retire(consumer, finished_only=False)

    async def _retire(self, consumer: AIOKafkaConsumer, *, finished_only: bool) -> None:
        async with self.commit_lock:
            while self.in_hand and (not finished_only or self.in_hand[0][0].done()):
                task, offsets = self.in_hand[0]
                await task  # a batch that raised (an outage while stopping) commits nothing
                self.in_hand.popleft()
                # Committed only now: every effect is durable or parked on the dead letters.
                await consumer.commit(offsets)

    async def _settle(self, records: list[ConsumerRecord], out: AIOKafkaProducer, saga: Saga,
                      stop: asyncio.Event) -> None:  # fmt: skip
        """Run the batch until every event is done or parked. Outages are waited out."""
        events, parked = decoded(records, decode_event, "unreadable")
        failures: dict[str, int] = {}
        backoff = 0.1
        while events:
            try:
                with self.metrics.batch.time():
                    result = await saga.run([e for _, e in events])
            except Exception as exc:  # an outage waits; bad data is isolated below
                if is_outage(exc):
                    if stop.is_set():
                        raise  # stopping: commit nothing of this batch; its next owner runs it
                    self.metrics.retries.inc()
                    log.warning("batch of %d waits for a dependency (%s); retrying in %.1fs",
                                len(events), describe(exc), backoff)  # fmt: skip
                    await asyncio.sleep(backoff)
                    backoff = min(5.0, backoff * 2)
                    continue
                if len(events) > 1:
                    log.warning("batch failed (%s); running its %d events one by one",
                                describe(exc), len(events))  # fmt: skip
                    for record, _ in events:
                        await self._settle([record], out, saga, stop)
                    events = []
                    break
                record, event = events[0]
                key = event_id(event)
                failures[key] = failures.get(key, 0) + 1
                if failures[key] >= self.attempts:
                    parked.append(Parked(record, f"failed {self.attempts} times: {exc!r}"))
                    events = []
                    break
                await asyncio.sleep(backoff)
                continue
            self._count(events, result)
            retry = result.unresolved
            unresolved = [(r, e) for r, e in events if event_id(e) in retry]
            for record, event in unresolved:
                key = event_id(event)
                failures[key] = failures.get(key, 0) + 1
                if failures[key] >= self.attempts:
                    parked.append(Parked(record, retry[key]))
            events = [(r, e) for r, e in unresolved if failures[event_id(e)] < self.attempts]
            if events:
                await asyncio.sleep(backoff)
        await self._dead_letter(parked, out)

    def _count(self, events: list[tuple[ConsumerRecord, ReservationEvent]],
               result: BatchResult) -> None:  # fmt: skip
        m = self.metrics
        for kind, n in Tally(event.type for _, event in events).items():
            m.events.labels(kind).inc(n)
        m.duplicates.inc(result.duplicates)
        m.orders.labels("CONFIRMED").inc(result.confirmed)
        m.orders.labels("PAYMENT_FAILED").inc(result.failed)
        m.orders.labels("CLOSED").inc(result.closed)

    async def _webhooks(self, pool: asyncpg.Pool, out: AIOKafkaProducer,
                        stop: asyncio.Event) -> None:  # fmt: skip
        """The order webhooks, when the storefront asked for them (FLASHSALE_WEBHOOK_URL)."""
        url = self.settings.webhook_url
        if not url:
            return
        secret = self.settings.webhook_secret.reveal()
        async with WebhookSender(url, secret, observe=self.metrics.observe_webhook) as sender:
            park = partial(self._dead_letter, out=out)
            await WebhookNotifier(self.settings, pool, sender, park=park).run(stop)

    async def _dead_letter(self, parked: list[Parked], out: AIOKafkaProducer) -> None:
        await park(out, self.settings.topics.dead_letter, parked, counted=self.metrics.parked)

    async def _serve_ops(self, host: str, port: int, redis: RedisClient, pool: asyncpg.Pool,
                         consumer: AIOKafkaConsumer) -> web.AppRunner:  # fmt: skip
        async def broker() -> None:
            require_topics(await consumer.topics(), self.settings)

        probes = {**dependency_probes(redis, pool), "kafka": broker}
        runner = await serve_ops(host, port, probes, self.metrics.registry)
        log.info("workers ops endpoints on http://%s:%d/healthz and /metrics", host, port)
        return runner
