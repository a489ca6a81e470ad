"""The dead-letter topic read back: what the workers and the relay parked there, and why;
and sent again, once its cause is mended, to the topics it came from.

Read without a consumer group (nothing is committed, so reading changes nothing for anyone):
the last messages of each partition, from their end offsets back, and on until the broker has
nothing more. A broker may report an end offset short of the last message: tansu answers the
start of the partition's last record batch plus one, so a batch of three parked together
reads as one. The count is then what was read.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from flashsale.errors import Unavailable
from flashsale.kafka import client_options, started_producer
from flashsale.outages import describe
from flashsale.settings import Settings
from flashsale.timefmt import iso_ms

READ_PATIENCE_S = 15.0


@dataclass(frozen=True)
class Parked:
    """One parked message: when, where it came from (``topic/partition/offset``, or the
    outbox a relay could not read), why, and its bytes as text."""

    at: str
    partition: int
    offset: int
    source: str
    reason: str
    key: str
    value: str


@dataclass(frozen=True)
class DeadLetters:
    topic: str
    parked: int  # ever written: the partitions' end offsets
    kept: int  # still on the broker (retention drops the oldest)
    messages: list[Parked]  # the newest ``limit``, oldest first
    exists: bool = True  # False: the broker has no such topic yet


async def read_dead_letters(settings: Settings, limit: int) -> DeadLetters:
    """The newest ``limit`` messages of the dead-letter topic. Raises Unavailable when the
    broker cannot be reached or does not hand them over within READ_PATIENCE_S."""
    topic = settings.topics.dead_letter
    read = await _newest(settings, limit)
    if read is None:
        return DeadLetters(topic, 0, 0, [], exists=False)
    records, ends, starts = read
    found = [_parked(r) for r in records]
    return DeadLetters(topic, sum(ends.values()), sum(ends[tp] - starts[tp] for tp in ends),
                       found[-limit:])  # fmt: skip


Offsets = dict[TopicPartition, int]


async def _newest(settings: Settings, limit: int
                  ) -> tuple[list[ConsumerRecord], Offsets, Offsets] | None:  # fmt: skip
    """The newest ``limit`` records of each partition of the dead-letter topic, oldest first,
    with the partitions' end and start offsets (None: no such topic)."""
    topic = settings.topics.dead_letter
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False,
                                request_timeout_ms=10_000)  # fmt: skip
    try:
        await consumer.start()
        partitions = [TopicPartition(topic, p) for p in
                      sorted(consumer.partitions_for_topic(topic) or ())]  # fmt: skip
        if not partitions:
            return None
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, max(starts[tp], ends[tp] - limit))
        found = await _read_past(consumer, ends)
    except KafkaError as exc:
        raise Unavailable(f"cannot read {topic} from the broker: {describe(exc)}") from exc
    finally:
        # aiokafka's consumer stopped before it ever waited raises CancelledError (its issue
        # 647, open): one turn of the loop first.
        await asyncio.sleep(0)
        await consumer.stop()
    for r in found:
        tp = TopicPartition(topic, r.partition)
        ends[tp] = max(ends[tp], r.offset + 1)
    found.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
    return found, ends, starts


async def _read_past(consumer: AIOKafkaConsumer, ends: Offsets) -> list[ConsumerRecord]:
    """Every message from the positions sought, past ``ends`` until a fetch brings none."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_PATIENCE_S
    found: list[ConsumerRecord] = []
    while True:
        short = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
        if loop.time() > deadline:
            raise Unavailable(f"the broker did not hand over {consumer.assignment()} in "
                              f"{READ_PATIENCE_S:.0f} s")  # fmt: skip
        batch = await consumer.getmany(timeout_ms=500)
        if not batch and not short:
            return found
        for records in batch.values():
            found += records


def _header(record: ConsumerRecord, name: str) -> str:
    return next((v.decode(errors="replace") for k, v in record.headers if k == name), "")


def _parked(r: ConsumerRecord) -> Parked:
    return Parked(iso_ms(r.timestamp), r.partition, r.offset, _header(r, "source"),
                  _header(r, "reason"), (r.key or b"").decode(errors="replace"),
                  (r.value or b"").decode(errors="replace"))  # fmt: skip


@dataclass
class Resending:
    """What ``resend_dead_letters`` chose: the records for each of the engine's topics, and
    how many it left, by why."""

    dead_letter: str
    read: int = 0  # parked messages looked at
    matched: int = 0
    topics: dict[str, list[ConsumerRecord]] = field(default_factory=dict)
    left: Counter[str] = field(default_factory=Counter)


async def resend_dead_letters(
    settings: Settings, *, limit: int, reason: str | None = None,
    within: timedelta | None = None, dry_run: bool = False,
    doing: Callable[[str], None] = lambda _s: None,
) -> Resending:  # fmt: skip
    """The parked messages among the newest ``limit`` whose reason holds ``reason`` (any case)
    and that were parked ``within`` the last while, each sent again to the topic it came from
    (its ``source`` header), with its key and value as they were and a header ``resent``
    naming the dead letter. Only the engine's reservations and order-events topics are sent
    to; the relay's outbox entries and other topics' messages are left, and counted. The
    consumers take a message twice without harm, so sending one again is safe; the dead
    letter stays where it is (Kafka deletes nothing by hand)."""
    doing("reading the dead letters")
    read = await _newest(settings, limit)
    records = read[0][-limit:] if read is not None else []
    since = (time.time() - within.total_seconds()) * 1000 if within is not None else None
    wanted = (reason or "").casefold()
    ours = {settings.topics.reservations, settings.topics.order_events}
    plan = Resending(settings.topics.dead_letter, read=len(records))
    for r in records:
        if wanted not in _header(r, "reason").casefold() or (
            since is not None and r.timestamp < since
        ):
            continue
        plan.matched += 1
        source = _header(r, "source")
        topic, *place = source.split("/")
        if len(place) != 2 or not all(n.isdigit() for n in place):
            plan.left[f"from {source or 'nowhere said'}, not a topic (a relay's outbox)"] += 1
        elif topic not in ours:
            plan.left[f"from {topic}, not one of this engine's topics (FLASHSALE_TOPIC_*)"] += 1
        else:
            plan.topics.setdefault(topic, []).append(r)
    if dry_run or not plan.topics:
        return plan
    out = await started_producer(settings)
    try:
        sent, total = 0, sum(map(len, plan.topics.values()))
        for topic, chosen in plan.topics.items():
            acks = []
            for r in chosen:
                acks.append(await out.send(topic, key=r.key, value=r.value, headers=[
                    ("resent", f"{r.topic}/{r.partition}/{r.offset}".encode())]))  # fmt: skip
                sent += 1
                if sent % 1000 == 0:
                    doing(f"resending: {sent:,} of {total:,} sent")
            await asyncio.gather(*acks)  # each acknowledged by the broker
    except KafkaError as exc:
        raise Unavailable(f"cannot resend to the broker: {describe(exc)}") from exc
    finally:
        await out.stop()
    return plan
