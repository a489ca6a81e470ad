"""The publisher of the ``order-events`` outbox: the Postgres ``outbox`` table to Kafka.

Every saga statement queues its order events as one ``outbox`` row in the transaction that
made the change; this loop moves them to the broker and deletes them only after the broker
acknowledged every message, so an event is published at least once and never lost. The
table is a queue, not a log: ``order_events`` keeps every event for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from flashsale.kafka import publish
from flashsale.outages import log_failure

log = logging.getLogger("flashsale.workers")

_CLAIM_OUTBOX = """
SELECT id, topic, key, payload FROM outbox WHERE published_at IS NULL
ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
"""


async def publish_outbox(pool: asyncpg.Pool, out: AIOKafkaProducer, stop: asyncio.Event, *,
                         on_published: Callable[[int], None], batch: int = 100,
                         interval: float = 0.05) -> None:  # fmt: skip
    """Move the ``outbox`` table to Kafka, ``batch`` rows (each a statement's events) at a
    time: rows are deleted in the transaction that locked them, after the broker
    acknowledged every message (a crash in between republishes; consumers key on order id
    and version). Several publishers share the work (SKIP LOCKED). A failed round is logged
    and tried again after a wait that doubles up to 5 s, back to ``interval`` once one works."""
    wait = interval
    while not stop.is_set():
        try:
            sent = await _publish_some(pool, out, batch)
        except Exception as exc:  # noqa: BLE001 - the loop outlives any round
            wait = min(5.0, max(0.1, wait * 2))
            log_failure(log, f"order-events outbox: retrying in {wait:.1f}s", exc)
            sent = 0
        else:
            wait = interval
        if sent:
            on_published(sent)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)


async def _publish_some(pool: asyncpg.Pool, out: AIOKafkaProducer, batch: int) -> int:
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_CLAIM_OUTBOX, batch)
        if not rows:
            return 0
        by_topic: dict[str, list[tuple[bytes, bytes]]] = {}
        for row in rows:
            payload = orjson.loads(row["payload"])
            events = payload if isinstance(payload, list) else [payload]
            by_topic.setdefault(row["topic"], []).extend(
                (str(e["order_id"]).encode(), orjson.dumps(e)) for e in events
            )
        sent = 0
        for topic, messages in by_topic.items():
            sent += await publish(out, topic, messages)
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])",
                           [r["id"] for r in rows])  # fmt: skip
    return sent
