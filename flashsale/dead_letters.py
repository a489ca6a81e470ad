"""The dead-letter topic read back: what the workers and the relay parked there, and why.

Read without a consumer group (nothing is committed, so reading changes nothing for anyone):
the last messages of each partition, from their end offsets back, and on until the broker has
nothing more. A broker may report an end offset short of the last message: tansu answers the
start of the partition's last record batch plus one, so a batch of three parked together
reads as one. The count is then what was read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from flashsale.errors import Unavailable
from flashsale.kafka import client_options
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
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False,
                                request_timeout_ms=10_000)  # fmt: skip
    try:
        await consumer.start()
        partitions = [TopicPartition(topic, p) for p in
                      sorted(consumer.partitions_for_topic(topic) or ())]  # fmt: skip
        if not partitions:
            return DeadLetters(topic, 0, 0, [], exists=False)
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
    for m in found:
        tp = TopicPartition(topic, m.partition)
        ends[tp] = max(ends[tp], m.offset + 1)
    found.sort(key=lambda m: (m.at, m.partition, m.offset))
    return DeadLetters(topic, sum(ends.values()), sum(ends[tp] - starts[tp] for tp in ends),
                       found[-limit:])  # fmt: skip


async def _read_past(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]
                     ) -> list[Parked]:  # fmt: skip
    """Every message from the positions sought, past ``ends`` until a fetch brings none."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_PATIENCE_S
    found: list[Parked] = []
    while True:
        short = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
        if loop.time() > deadline:
            raise Unavailable(f"the broker did not hand over {consumer.assignment()} in "
                              f"{READ_PATIENCE_S:.0f} s")  # fmt: skip
        batch = await consumer.getmany(timeout_ms=500)
        if not batch and not short:
            return found
        for records in batch.values():
            for r in records:
                headers = {name: value.decode(errors="replace") for name, value in r.headers}
                found.append(Parked(
                    iso_ms(r.timestamp), r.partition, r.offset, headers.get("source", ""),
                    headers.get("reason", ""), (r.key or b"").decode(errors="replace"),
                    (r.value or b"").decode(errors="replace"),
                ))  # fmt: skip
