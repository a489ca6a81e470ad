"""Messages parked on the dead-letter topic, with why and where each came from: by the saga's
consumer and by the order webhooks alike, each acknowledged by the broker before the batch
that held it is committed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

log = logging.getLogger("flashsale.workers")

T = TypeVar("T")


@dataclass(frozen=True)
class Parked:
    record: ConsumerRecord
    reason: str


async def park(out: AIOKafkaProducer, topic: str, parked: Sequence[Parked], *,
               counted: Callable[[str], None]) -> None:  # fmt: skip
    """Send ``parked`` to ``topic`` (headers ``reason`` and ``source``, the message's
    ``topic/partition/offset``) and wait for the broker's acknowledgement of each;
    ``counted`` is told each reason's first words (a metric's label)."""
    sends = []
    for item in parked:
        r = item.record
        log.error("dead-lettering %s[%d]@%d: %s", r.topic, r.partition, r.offset, item.reason)
        counted(item.reason.split(":")[0][:40])
        sends.append(await out.send(
            topic, key=r.key, value=r.value,
            headers=[("reason", item.reason.encode()[:1000]),
                     ("source", f"{r.topic}/{r.partition}/{r.offset}".encode())],
        ))  # fmt: skip
    await asyncio.gather(*sends)


def decoded(records: Sequence[ConsumerRecord], decode: Callable[[bytes], T],
            unreadable: str) -> tuple[list[tuple[ConsumerRecord, T]], list[Parked]]:  # fmt: skip
    """Each record with its value decoded, and those ``decode`` refused (ValueError), to park
    as ``unreadable`` and the reason."""
    read: list[tuple[ConsumerRecord, T]] = []
    refused: list[Parked] = []
    for record in records:
        try:
            read.append((record, decode(record.value)))
        except ValueError as exc:
            refused.append(Parked(record, f"{unreadable}: {exc}"))
    return read, refused
