"""The outbox relay: SKU outbox streams (Redis) -> the ``reservations`` topic (Kafka), at least
once.

Each SKU's outbox stream is read through the consumer group ``relay``; every allocator service
runs one relay consumer. An entry is acknowledged (and deleted) only after the broker has
acknowledged every message made from it, so a relay that dies mid-way leaves its entries
pending; another relay claims them with ``XAUTOCLAIM`` once they have been idle for
``claim_idle_ms``. A message can therefore be published twice; workers deduplicate by event id.

One ``reservation.created`` entry carries a whole reserve batch; it becomes one message per
reservation (:func:`flashsale.events.outbox_events`), keyed by its reservation id
(:func:`flashsale.events.message_key`): a hot SKU spreads over every partition.

A round's stream commands are packed by hiredis and their replies read raw
(:func:`allocator.redis_calls.send_packed`): through redis-py's pipeline a quiet outbox's read
cost 16-19 us of the allocator's CPU, against 2.2-2.4 us, and a large sale's quiet outboxes
are read up to a thousand times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from aiokafka import AIOKafkaProducer

from allocator.pacing import SalePace, SaleRounds, Schedule
from allocator.redis_calls import Command, send_packed
from flashsale.clients import RedisClient
from flashsale.events import encode_event, message_key, outbox_events
from flashsale.kafka import publish
from flashsale.keys import SkuKeys
from flashsale.outages import log_failure
from flashsale.records import text

log = logging.getLogger("flashsale.relay")

GROUP = "relay"

Entry = tuple[Any, dict[Any, Any]]  # (entry id, fields; empty for an entry deleted since)


def _entries(raw: list[Any] | None) -> tuple[list[Entry], bool]:
    """The entries of a raw stream reply, and whether one of them was a bare nil: an entry
    deleted while pending, which Redis 6.2's ``XAUTOCLAIM`` reports without its id (it can
    only be acknowledged through a read of the relay's own pending entries)."""
    out: list[Entry] = []
    gone = False
    for entry in raw or ():
        if entry is None:
            gone = True
            continue
        entry_id, flat = entry
        out.append((entry_id, dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}))
    return out, gone


def _read_entries(reply: Any) -> list[Entry]:
    """The entries of one stream's ``XREADGROUP`` reply: nil when nothing is new, else a map
    (RESP3) or a list (RESP2) of stream name to entries."""
    if not reply:
        return []
    [raw] = reply.values() if isinstance(reply, dict) else [reply[0][1]]
    return _entries(raw)[0]


@dataclass
class RelayStats:
    entries: int = 0  # stream entries acknowledged
    messages: int = 0  # Kafka messages acknowledged by the broker
    claimed: int = 0  # entries taken over from another relay
    poison: int = 0  # entries that could not be read, sent to the dead-letter topic
    failures: int = 0  # rounds that could not publish (retried)


class OutboxRelay:
    """Relays the outboxes of the SKUs it is given. Several relays may run at once.

    ``batch`` is the stream entries read per SKU per round. An entry holds a whole reserve
    batch (up to 256 reservations) and a round is published before the next is read, so
    small rounds let the workers start on a burst while the relay is still reading it.
    ``per_round`` bounds the SKUs a round reads and the SKUs it sweeps for a dead relay's
    entries: one round over 100,000 SKUs kept the allocator's loop for 11 s."""

    def __init__(
        self,
        client: RedisClient,
        producer: AIOKafkaProducer,
        topic: str,
        dead_letter_topic: str,
        consumer: str,
        *,
        batch: int = 16,
        claim_idle_ms: int = 10_000,
        claim_every_s: float = 1.0,
        idle_poll_s: float = 0.5,
        idle_reads_per_s: float = 1000.0,
        claims_per_s: float = 1000.0,
        per_round: int = 500,
    ) -> None:
        self.client = client
        self.producer = producer
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.consumer = consumer
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.claim_every_s = claim_every_s
        self.claims_per_s = claims_per_s
        self.stats = RelayStats()
        self._groups: set[SkuKeys] = set()
        self._retry_own = False
        self._own_left: list[SkuKeys] = []  # SKUs whose own pending entries are still to read
        # The sweep for a dead relay's entries: each sale's turn at its own pace, the SKUs of
        # the sales whose turn came taken per_round a round.
        self._claim_turns = SaleRounds(claim_every_s, claims_per_s)
        self._claims_left: list[SkuKeys] = []
        self.per_round = per_round
        # A SKU whose stream had nothing new is read again after a delay that doubles from
        # 10 ms up to idle_poll_s; one with entries is read again at once. With many SKUs in
        # scope the ceiling grows, sale by sale, so that quiet outboxes cost at most
        # idle_reads_per_s reads a second in all while a small sale keeps its idle_poll_s
        # beside a large one; the sweep for a dead relay's entries costs at most claims_per_s
        # (allocator/pacing.py). No reservation waits for it: the gateway publishes each one
        # before answering, and the relay is the path for what it could not publish, and for
        # the holds' later events.
        self.idle_poll_s = idle_poll_s
        self.idle_reads_per_s = idle_reads_per_s
        self._reads = Schedule(rescan_s=idle_poll_s)
        self._pace = SalePace(idle_poll_s, idle_reads_per_s)

    async def _ensure_groups(self, skus: list[SkuKeys]) -> None:
        """The consumer group of each of ``skus`` not made sure of yet, packed in C: through
        redis-py's pipeline, a 100,000-SKU sale entering the scope (at its end, for a hold TTL
        and a minute) kept the allocator's core busy."""
        new = [keys for keys in skus if keys not in self._groups]
        if not new:
            return
        # From the start of the stream: entries written before any relay ran count too.
        commands: list[Command] = [("XGROUP", "CREATE", keys.outbox, GROUP, "0", "MKSTREAM")
                                   for keys in new]  # fmt: skip
        replies = await send_packed(self.client, commands, raise_on_error=False)
        for keys, reply in zip(new, replies, strict=True):
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply
            self._groups.add(keys)

    async def relay_once(self, skus: list[SkuKeys]) -> int:
        """One round over ``skus``: take over idle entries of dead relays, read new ones,
        publish, acknowledge. Returns the stream entries acknowledged; raises KafkaError or a
        Redis error when a round could not finish (its entries stay pending and are retried)."""
        now = time.monotonic()
        if len(self._groups) > 2 * max(len(skus), self.per_round):  # SKUs that left the scope
            self._groups &= set(skus)
        # Looking for a dead relay's entries now and then is plenty: they wait claim_idle_ms.
        # A sweep takes per_round SKUs a round until it has been through the sales whose turn
        # it is; a sale whose turn comes goes first (a small sale's turn comes often, and
        # waits for no large one's sweep).
        self._claims_left[:0] = self._claim_turns.due_skus(skus, now)
        in_scope = set(self._claim_turns.sales)  # not a sale that left it meanwhile
        claims = [keys for keys in self._claims_left[: self.per_round] if keys.sale_id in in_scope]
        del self._claims_left[: self.per_round]
        quiet_s = self._pace.of(skus)
        self._reads.rescan_s = self._pace.longest
        if self._retry_own:  # after a failed round, our own pending entries ("0") of every SKU
            self._own_left = list(skus)
            self._retry_own = False
            self._reads.forget()
        own = bool(self._own_left)
        if own:
            due = self._own_left[: self.per_round]
            del self._own_left[: self.per_round]
        else:
            await self._reads.look(skus, now)  # a large scope, in parts
            due = self._reads.due(skus, now, self.per_round)
        if not due and not claims:
            return 0
        finished = False
        try:
            acked = await self._round(claims, due, now, quiet_s, own)
            finished = True
        finally:
            if not finished:  # what was taken and not put back is read again at once
                self._reads.forget()
                if own:
                    self._own_left[:0] = due
        return acked

    async def _round(
        self,
        claims: list[SkuKeys],
        due: list[SkuKeys],
        now: float,
        quiet_s: dict[str, float],
        own: bool,
    ) -> int:
        await self._ensure_groups(list(dict.fromkeys(claims + due)))  # every SKU it reads
        start = "0" if own else ">"
        commands: list[Command] = [
            *(("XAUTOCLAIM", keys.outbox, GROUP, self.consumer, self.claim_idle_ms, "0-0",
               "COUNT", self.batch) for keys in claims),
            *(("XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", self.batch, "STREAMS",
               keys.outbox, start) for keys in due),
        ]  # fmt: skip
        try:
            replies = iter(await send_packed(self.client, commands))
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                # Redis lost the stream or its group (FLUSHALL, a restart without persistence):
                # create them again next round. Entries Redis lost are the reconciler's to
                # restore; nothing Redis still holds is skipped (the group starts at 0).
                log.warning("outbox consumer group missing (%s); creating it again", exc)
                self._groups.clear()
                self._reads.forget()
                return 0
            raise
        found: dict[SkuKeys, list[Entry]] = {}
        deleted = False  # a claimed entry was deleted: our own pending ones are read next
        for keys in claims:
            claimed, gone = _entries(next(replies)[1])
            deleted = deleted or gone
            self.stats.claimed += len(claimed)
            if claimed:
                found[keys] = claimed
        for keys in due:
            entries = _read_entries(next(replies))
            if entries:
                found[keys] = found.get(keys, []) + entries
                self._reads.busy(keys, now)
            else:
                self._reads.idle(keys, now, quiet_s.get(keys.sale_id, self.idle_poll_s))
        work = list(found.items())
        if not work:
            self._retry_own = deleted
            return 0
        published = False
        try:
            acked = await self._publish(work)
            published = True
        finally:
            # A round that did not publish: its entries stay pending, read first next round.
            self._retry_own = deleted or not published
            self.stats.failures += 0 if published else 1
        return acked

    async def _publish(self, work: list[tuple[SkuKeys, list[Entry]]]) -> int:
        sends: list[Awaitable[Any]] = []
        messages: list[tuple[bytes, bytes]] = []
        done: list[tuple[SkuKeys, list[Any]]] = []
        relayed: list[tuple[str, str]] = []  # (event type, reservation id)
        for keys, entries in work:
            ids = []
            for entry_id, fields in entries:
                ids.append(entry_id)
                if not fields:  # deleted while pending (XAUTOCLAIM reports it): nothing to send
                    continue
                try:
                    events = outbox_events(fields)
                except (ValueError, KeyError) as exc:
                    log.error("unreadable outbox entry %s of %s: %r", text(entry_id), keys.outbox,
                              exc)  # fmt: skip
                    self.stats.poison += 1
                    sends.append(await self.producer.send(
                        self.dead_letter_topic, key=keys.outbox.encode(),
                        value=repr({text(k): text(v) for k, v in fields.items()}).encode(),
                        headers=[("reason", f"unreadable outbox entry: {exc}".encode()),
                                 ("source", keys.outbox.encode())],
                    ))  # fmt: skip
                    continue
                messages += [(message_key(e.reservation_id), encode_event(e)) for e in events]
                relayed += [(e.type, e.reservation_id) for e in events]
            done.append((keys, ids))
        # Every message acknowledged by the broker before any entry is.
        await publish(self.producer, self.topic, messages)
        await asyncio.gather(*sends)
        await send_packed(self.client, [
            command for keys, ids in done
            for command in (("XACK", keys.outbox, GROUP, *ids), ("XDEL", keys.outbox, *ids))
        ])  # fmt: skip
        acked = sum(len(ids) for _, ids in done)
        for kind, rid in relayed:
            log.info("relayed %s", kind, extra={"reservation_id": rid})
        self.stats.entries += acked
        self.stats.messages += len(messages) + len(sends)
        return acked


async def run_relay(
    relay: OutboxRelay,
    skus: Callable[[], Awaitable[list[SkuKeys]]],
    *,
    stop: asyncio.Event,
    interval: float = 0.01,
    on_round: Callable[[int], None] | None = None,
) -> None:
    """Relay until ``stop`` is set: at once again while there is work, else every
    ``interval`` seconds. A failed round is logged and retried with backoff; its entries
    stay pending, so nothing is lost."""
    backoff = interval
    while not stop.is_set():
        try:
            acked = await relay.relay_once(await skus())
        except Exception as exc:  # noqa: BLE001 - the loop outlives any round
            backoff = min(2.0, max(0.1, backoff * 2))
            log_failure(log, f"relay round failed, retrying in {backoff:.2f}s", exc)
            acked = 0
        else:
            backoff = interval
            if on_round is not None:
                on_round(acked)
            if acked:
                continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
