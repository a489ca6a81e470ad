"""Kafka plumbing shared by the relay, the workers and the CLI: topics and producers.

The broker may be Apache Kafka or a Kafka-protocol broker such as tansu, which supports plain
produce, consumer groups and offset commits but neither idempotent producers nor transactions.
Nothing here needs them: producers wait for every acknowledgement (``acks="all"``) and every
consumer effect is keyed by reservation id, so a duplicate is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from flashsale.errors import Unavailable
from flashsale.outages import describe, is_outage, log_failure
from flashsale.settings import Settings
from flashsale.topics import Topics
from flashsale.wording import counted

log = logging.getLogger("flashsale.kafka")

# Partitions bound how many worker processes can share the reservations topic.
PARTITIONS = {"reservations": 8, "order_events": 4, "dead_letter": 1}
# A consumer whose batch waits for a dependency polls this often (aiokafka's limit: 5 minutes).
POLL_WHILE_WAITING_S = 1.0


def client_options(settings: Settings) -> dict[str, Any]:
    """The brokers and how to reach them (TLS, SASL login: ``settings.kafka``), for every
    aiokafka client the engine makes: producers, consumers, the admin and the probes."""
    access = settings.kafka
    options: dict[str, Any] = {"bootstrap_servers": settings.require_kafka(),
                               "security_protocol": access.protocol}  # fmt: skip
    if access.tls:  # the system's CAs, or only the given one; host names checked
        options["ssl_context"] = ssl.create_default_context(cafile=access.ca_file)
    if access.mechanism is not None:
        options.update(sasl_mechanism=access.mechanism, sasl_plain_username=access.username,
                       sasl_plain_password=access.password.reveal())  # fmt: skip
    return options


def partition_count(n: int | None) -> str:
    """'3 partitions', '1 partition', or '? partitions' when the broker did not say."""
    return "? partitions" if n is None else counted(n, "partition")


async def ensure_topics(
    settings: Settings,
    progress: Callable[[str], None] | None = None,
    *,
    partitions: int | None = None,
    replication_factor: int = 1,
) -> dict[str, str]:
    """Create the engine's topics that are missing, the reservations and order-events topics
    with ``partitions`` each (default: :data:`PARTITIONS`), every topic with
    ``replication_factor`` copies; returns topic -> what was done. A topic that exists is
    left as it is (Kafka can only add partitions, and doing so is the operator's call).
    Raises Unavailable when the broker cannot be reached."""
    topics: Topics = settings.topics
    wanted = {
        topics.reservations: partitions or PARTITIONS["reservations"],
        topics.order_events: partitions or PARTITIONS["order_events"],
        topics.dead_letter: PARTITIONS["dead_letter"],
    }
    async with _admin(settings, f"reach the Kafka broker at {settings.kafka_bootstrap}") as (
        admin,
        existing,
    ):
        present = [name for name in wanted if name in existing]
        described = await admin.describe_topics(present) if present else []
        have = {d["topic"]: len(d["partitions"]) for d in described}
        asked = (
            {} if partitions is None else {n: wanted[n] for n in wanted if n != topics.dead_letter}
        )
        outcome = {name: _existing(have.get(name), asked.get(name)) for name in present}
        missing = [
            NewTopic(name, num_partitions=n, replication_factor=replication_factor)
            for name, n in wanted.items()
            if name not in existing
        ]
        if missing:
            # Another service may have created one first: fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            for topic in missing:
                outcome[topic.name] = (f"created ({partition_count(topic.num_partitions)}, "
                                       f"replication factor {replication_factor})")  # fmt: skip
    for name, what in outcome.items():
        if progress is not None:
            progress(f"topic {name}: {what}")
    return outcome


def _existing(partitions: int | None, asked: int | None) -> str:
    """What ``kafka init`` says of a topic that exists, with ``partitions`` (None: unknown),
    when ``asked`` for that many (None: not asked)."""
    said = partition_count(partitions)
    if asked is not None and partitions is not None and partitions != asked:
        said += (f", not the {asked} asked: an existing topic keeps its partitions, as "
                 "adding some moves keys to others; add them with Kafka's own tools, between "
                 "sales")  # fmt: skip
    return f"exists ({said})"


async def delete_topics(settings: Settings, names: Sequence[str]) -> None:
    """Delete the topics ``names`` (a benchmark's own, when it is done); Unavailable when the
    broker cannot be reached or refuses."""
    async with _admin(settings, f"delete the topics {', '.join(names)}") as (admin, existing):
        gone = [name for name in names if name in existing]
        if gone:
            await admin.delete_topics(gone)


@contextlib.asynccontextmanager
async def _admin(settings: Settings, doing: str
                 ) -> AsyncIterator[tuple[AIOKafkaAdminClient, set[str]]]:  # fmt: skip
    """An admin client of the broker and its topics now; Unavailable("cannot <doing>") on a
    Kafka error, closed in any case."""
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    try:
        await admin.start()
        yield admin, set(await admin.list_topics())
    except KafkaError as exc:
        raise Unavailable(f"cannot {doing}: {describe(exc)}") from exc
    finally:
        await admin.close()


def producer(settings: Settings, *, linger_ms: int = 2) -> AIOKafkaProducer:
    """A producer that counts a message as sent only when every in-sync replica has it. Not
    idempotent (the local broker does not support it): consumers deduplicate instead."""
    return AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        enable_idempotence=False,
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        request_timeout_ms=15_000,
    )


async def started_producer(settings: Settings, *, linger_ms: int = 2) -> AIOKafkaProducer:
    """A :func:`producer`, started once the engine's topics are made sure of (a broker that
    does not create topics on first use would refuse every message). If the broker cannot be
    reached it is stopped again and the error raised: a later call starts a fresh one."""
    out = producer(settings, linger_ms=linger_ms)
    started = False
    try:
        await ensure_topics(settings)
        await out.start()
        started = True
    finally:
        if not started:  # the error (or a cancellation) goes on; the half-made client stops
            with contextlib.suppress(Exception):
                await out.stop()
    return out


async def producer_when_up(settings: Settings, stop: asyncio.Event, who: str, *,
                           linger_ms: int = 2) -> AIOKafkaProducer | None:  # fmt: skip
    """:func:`started_producer`, tried again with backoff (0.1 s doubling to 5 s) while the
    broker cannot be reached: a service started during a broker outage waits for it. None
    when ``stop`` is set first. An error that is not an outage (a bad setting) is raised."""
    delay = 0.1
    while not stop.is_set():
        try:
            return await started_producer(settings, linger_ms=linger_ms)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log_failure(log, f"{who} cannot reach the broker yet; waiting for it", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(5.0, delay * 2)
    return None


async def poll_while(consumer: AIOKafkaConsumer, pending: asyncio.Future[Any]) -> None:
    """Until ``pending`` is done (its outcome is the caller's), ``consumer`` polled each
    POLL_WHILE_WAITING_S with its partitions paused, so that it fetches nothing more.

    aiokafka takes a member that has not polled for ``max_poll_interval_ms`` (5 minutes) for
    stuck, and leaves its group: a batch waiting that long for the shop, the provider or
    Postgres would be run again by another member, and its own commit refused. A rebalance
    meanwhile assigns partitions unpaused: what a poll gets from them is sought back, to come
    again once the batch is settled."""
    paused: set[TopicPartition] = set()
    try:
        while not pending.done():
            await asyncio.wait({pending}, timeout=POLL_WHILE_WAITING_S)
            if pending.done():
                break
            fresh = consumer.assignment() - consumer.paused()
            consumer.pause(*fresh)
            paused |= fresh
            for tp, records in (await consumer.getmany(timeout_ms=0)).items():
                consumer.seek(tp, records[0].offset)
    finally:
        consumer.resume(*(paused & consumer.assignment()))


def partition_of(key: bytes, partitions: Sequence[int]) -> int:
    """The partition of ``key`` among ``partitions`` (sorted): CRC-32 of the key, computed in
    C, the same for every producer of the engine, so one key's messages stay in order."""
    return partitions[zlib.crc32(key) % len(partitions)]


async def publish(
    out: AIOKafkaProducer, topic: str, messages: Sequence[tuple[bytes, bytes]]
) -> int:
    """Send (key, value) messages and wait until the broker has acknowledged every one.

    Messages are packed into per-partition batches directly: a key always maps to the same
    partition (CRC-32 of the key, computed in C), so each key's messages stay in order.
    Sending them one by one costs aiokafka's pure-Python partitioner and bookkeeping per
    message, which was the largest cost of the workers' order-events publisher.
    """
    if not messages:
        return 0
    partitions = sorted(await out.partitions_for(topic))
    by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, value in messages:
        by_partition.setdefault(partition_of(key, partitions), []).append((key, value))
    sends = []
    for partition, items in by_partition.items():
        batch = out.create_batch()
        for key, value in items:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                sends.append(await out.send_batch(batch, topic, partition=partition))
                batch = out.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        sends.append(await out.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*sends)
    return len(messages)


# How old a lag reader's view of the topics' partitions may get (partitions added to a topic
# are counted from then on). aiokafka's default is five minutes.
METADATA_AGE_MS = 30_000


class LagReader:
    """How far a consumer group is behind on a topic, read over one client kept for the
    reader's life (a client per reading would cost a connection and a bootstrap each time).
    It does not join the group: it only reads the group's committed offsets."""

    def __init__(self, settings: Settings, group: str) -> None:
        self.settings = settings
        self.group = group
        self._consumer: AIOKafkaConsumer | None = None

    async def read(self, topic: str) -> int:
        """Messages of ``topic`` the group has not committed yet, over all partitions (a
        partition it never committed counts from its start). Raises Unavailable when the
        broker cannot be reached."""
        try:
            consumer, partitions = await self._partitions(topic)
            if not partitions:
                return 0
            ends = await consumer.end_offsets(partitions)
            starts = await consumer.beginning_offsets(partitions)
            lag = 0
            for tp in partitions:
                committed = await consumer.committed(tp)
                lag += max(0, ends[tp] - (starts[tp] if committed is None else committed))
            return lag
        except KafkaError as exc:
            await self.aclose()  # a fresh client next time
            raise Unavailable(f"cannot read consumer lag from the broker: {describe(exc)}") from exc

    async def written(self, topic: str) -> int:
        """Messages ever written to ``topic``: its partitions' end offsets, which retention
        does not lower (0 for a topic not made yet). Raises Unavailable as :meth:`read`."""
        try:
            consumer, partitions = await self._partitions(topic)
            return sum((await consumer.end_offsets(partitions)).values()) if partitions else 0
        except KafkaError as exc:
            await self.aclose()
            raise Unavailable(f"cannot read {topic}'s offsets from the broker: "
                              f"{describe(exc)}") from exc  # fmt: skip

    async def _partitions(self, topic: str) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
        consumer = self._consumer or await self._start()
        # The client's own metadata is refreshed only every METADATA_AGE_MS (topics() asks
        # the broker but does not update it): a topic made since is read by a new client, the
        # broker's metadata being fetched at its start.
        if consumer.partitions_for_topic(topic) is None and topic in await consumer.topics():
            await self.aclose()
            consumer = await self._start()
        known = consumer.partitions_for_topic(topic) or set()
        return consumer, [TopicPartition(topic, p) for p in sorted(known)]

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            **client_options(self.settings), group_id=self.group, enable_auto_commit=False,
            request_timeout_ms=10_000, metadata_max_age_ms=METADATA_AGE_MS,
        )  # fmt: skip
        try:
            await consumer.start()
        except BaseException:  # a broker down: the half-started client is stopped, not left
            await asyncio.sleep(0)  # aiokafka's issue 647, as in dead_letters._newest
            await consumer.stop()
            raise
        self._consumer = consumer
        return consumer

    async def aclose(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await consumer.stop()


class LagCache:
    """The workers' consumer lag, read from the broker at most every ``ttl_s`` for all
    the pages polling this process; None while the broker does not answer."""

    def __init__(self, settings: Settings, ttl_s: float = 2.0) -> None:
        self.settings = settings
        self.reader = LagReader(settings, settings.consumer_group)
        self.ttl_s = ttl_s
        self._at = 0.0
        self._value: int | None = None

    async def read(self) -> int | None:
        if time.monotonic() - self._at >= self.ttl_s:
            self._at = time.monotonic()
            try:
                self._value = await self.reader.read(self.settings.topics.reservations)
            except Exception:  # noqa: BLE001 - shown as unknown; the next read tries again
                self._value = None
        return self._value

    async def aclose(self) -> None:
        await self.reader.aclose()


async def consumer_lag(settings: Settings, topic: str, group: str) -> int:
    """:meth:`LagReader.read` once."""
    reader = LagReader(settings, group)
    try:
        return await reader.read(topic)
    finally:
        await reader.aclose()
