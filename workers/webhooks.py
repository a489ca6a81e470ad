"""Order webhooks: every event of the ``order-events`` topic POSTed to the storefront's
``FLASHSALE_WEBHOOK_URL``, signed as Standard Webhooks sign them, from the workers process.

* A consumer group of its own (``FLASHSALE_WEBHOOK_GROUP``) on ``order-events``: the saga
  never waits for the shop, and several workers processes share the partitions.
* Each event is sent with the order it belongs to (sale, SKU, buyer, quantity, amount), read
  from Postgres. ``webhook-id`` is ``<order id>.<version>``: the same for every delivery of
  one event, so the shop can drop a repeat; an order's events go out one after another, in
  the order of their versions.
* Offsets are committed only once every event of the batch was answered 2xx (or parked):
  nothing the engine recorded is skipped, and an event may come twice. Stopped, the workers
  give the batch in hand ``DRAIN_S`` to finish (no failed send repeated) before leaving it
  uncommitted to the next owner, who sends it all again.
* No answer, a timeout, a 5xx, a redirect (not followed: the log says where it points) or a
  4xx about the endpoint rather than the event (401, 403, 404, 405, 408, 410, 429: a wrong
  secret or path, a busy shop): sent again after a wait that doubles up to a minute (or the
  shop's ``Retry-After``, if longer, up to ten minutes), for as long as the shop needs
  (nothing later is sent meanwhile; the alert ``FlashsaleWebhooksFailing`` says so).
  Another 4xx (400, 409, 422...), five times in a row: the shop refuses that event for
  good, and it is parked on the dead-letter topic with the status.
* While a batch waits for the shop, the consumer polls with its partitions paused, so it
  stays in its group however long the shop is away (``flashsale.kafka.poll_while``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from standardwebhooks import Webhook

from flashsale import __version__
from flashsale.kafka import client_options, poll_while
from flashsale.outages import describe, is_outage, log_failure
from flashsale.settings import Secret, Settings, mask_url, redirect_target
from flashsale.timefmt import iso, retry_after
from workers.parking import Parked, decoded

log = logging.getLogger("flashsale.webhooks")

# A shop that does not answer within this is sent the event again.
TIMEOUT_S = 10.0
# Sent again after 0.5 s, doubling up to LONGEST_WAIT_S; or after the shop's Retry-After when
# that is longer, up to LONGEST_ASKED_WAIT_S.
LONGEST_WAIT_S = 60.0
LONGEST_ASKED_WAIT_S = 600.0
# A 4xx but these, this many times in a row: the shop refuses the event for good.
REFUSALS = 5
# 4xx answers about the endpoint, not the event (busy; the wrong secret, path or method; gone):
# sent again until the shop is mended, as for a 5xx. Parked, a sale's every event would go.
AGAIN = frozenset({401, 403, 404, 405, 408, 410, 429})
# Orders whose events are sent at once (an order's own events go one after another).
CONCURRENCY = 16
# Stopped, the batch in hand has this long to finish (sends answered, none repeated after a
# failure) and is committed if it did: given up at once, the next owner sent it all again.
DRAIN_S = 5.0


class Abandoned:
    """What :meth:`WebhookSender.deliver` gives for an event it stopped sending before the
    shop took it: the batch is not committed, and the next owner sends it."""


ABANDONED = Abandoned()

_ORDERS = """
SELECT e.order_id, e.seq, e.created_at, o.sale_id, o.sku, o.buyer_id, o.quantity, o.amount,
       o.currency
FROM unnest($1::text[], $2::int[]) AS t(order_id, seq)
JOIN order_events e ON e.order_id = t.order_id AND e.seq = t.seq
JOIN orders o ON o.id = t.order_id
"""


class Answer(NamedTuple):
    """What the shop answered to one sending."""

    status: int | None  # None: no answer
    retry_after_s: float | None


@dataclass(frozen=True)
class Delivery:
    """One event as the shop receives it."""

    record: ConsumerRecord
    id: str  # webhook-id: <order id>.<version>
    order_id: str
    body: bytes


def event_body(event: dict[str, Any], row: asyncpg.Record) -> bytes:
    """The JSON the shop receives: the event's type and time, and the order as it became."""
    return orjson.dumps({
        "type": event["type"],
        "timestamp": iso(row["created_at"]),
        "data": {
            "order_id": event["order_id"], "version": event["version"],
            "state": event["state"], "from_state": event["from_state"],
            "cause": event["cause"], "sale_id": row["sale_id"], "sku": row["sku"],
            "buyer_id": row["buyer_id"], "quantity": row["quantity"], "amount": row["amount"],
            "currency": row["currency"].strip(),
        },
    })  # fmt: skip


class WebhookSender:
    """POSTs signed events to the shop; each answer is observed as 2xx, 4xx, 5xx or
    no_answer with its duration."""

    def __init__(self, url: str, secret: str, *,
                 observe: Callable[[str, float], None] = lambda outcome, seconds: None,
                 timeout_s: float = TIMEOUT_S, first_wait_s: float = 0.5) -> None:  # fmt: skip
        """``secret``: a signing key, or several comma-separated during a rotation, each of
        which signs every webhook."""
        self.url = url
        self.first_wait_s = first_wait_s
        self.signers = [Webhook(key) for key in Secret(secret).each_key()]
        self.observe = observe
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WebhookSender:
        self.session = aiohttp.ClientSession(
            timeout=self.timeout, headers={"User-Agent": f"flashsale-webhooks/{__version__}"}
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    def sign(self, hook_id: str, at: datetime, body: bytes) -> str:
        """The ``webhook-signature`` header: a signature by each key, space-separated, of
        which a shop's library accepts any."""
        return " ".join(signer.sign(hook_id, at, body) for signer in self.signers)

    async def send(self, delivery: Delivery) -> Answer:
        """What the shop answered: its status (None when it did not) and the seconds its
        ``Retry-After`` asked for."""
        assert self.session is not None, "use WebhookSender as an async context manager"
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.sign(delivery.id, now, delivery.body),
        }
        began = time.monotonic()
        try:
            # A redirect is not followed: a 301 would turn the POST into a GET, and a 307
            # would send the signed order wherever it points.
            async with self.session.post(self.url, data=delivery.body, headers=headers,
                                         allow_redirects=False) as answer:  # fmt: skip
                await answer.read()
                status, location = answer.status, answer.headers.get("Location")
                asked = retry_after(answer.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.observe("no_answer", time.monotonic() - began)
            log.warning("webhook %s: no answer from the shop (%s)", delivery.id, describe(exc))
            return Answer(None, None)
        self.observe(f"{status // 100}xx", time.monotonic() - began)
        if 300 <= status < 400:
            log.warning("webhook %s: answered %d (a redirect to %s, not followed: "
                        "FLASHSALE_WEBHOOK_URL should name the address it points to)",
                        delivery.id, status, redirect_target(self.url, location))  # fmt: skip
        return Answer(status, asked)

    async def deliver(
        self, delivery: Delivery, stop: asyncio.Event, given_up: asyncio.Event | None = None
    ) -> Parked | Abandoned | None:
        """Send until the shop answers 2xx (None) or refuses the event for good (it is to be
        parked). Once ``stop`` is set, a failed try is not repeated; once ``given_up`` is set
        (the stop's grace over; ``stop`` itself by default), nothing more is sent and a send
        on its way is dropped: ABANDONED either way."""
        given_up = given_up or stop
        wait, refusals = self.first_wait_s, 0
        while not given_up.is_set():
            sending = asyncio.ensure_future(self.send(delivery))
            giving_up = asyncio.ensure_future(given_up.wait())
            await asyncio.wait({sending, giving_up}, return_when=asyncio.FIRST_COMPLETED)
            giving_up.cancel()
            if not sending.done():  # given up: the next owner sends it again
                sending.cancel()
                return ABANDONED
            status, asked = sending.result()
            if status is not None and 200 <= status < 300:
                return None
            if status is not None and 400 <= status < 500 and status not in AGAIN:
                refusals += 1
                if refusals >= REFUSALS:
                    return Parked(delivery.record, f"webhook refused: HTTP {status}")
            else:
                refusals = 0
            if stop.is_set():
                break
            pause = min(LONGEST_ASKED_WAIT_S, max(wait, asked or 0.0))
            log.warning("webhook %s: answered %s, sending again in %.1fs", delivery.id,
                        status or "nothing", pause)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            if stop.is_set():
                break
            wait = min(LONGEST_WAIT_S, wait * 2)
        return ABANDONED


class WebhookNotifier:
    """The consumer of ``order-events`` that hands each event to :class:`WebhookSender`."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, sender: WebhookSender, *,
                 park: Callable[[list[Parked]], Awaitable[None]],
                 max_batch: int = 500) -> None:  # fmt: skip
        self.settings = settings
        self.pool = pool
        self.sender = sender
        self.park = park
        self.max_batch = max_batch

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: a failed round (the broker, a rebalance that took the batch's
        partitions, a bug) is logged and the consumer made again after a wait that doubles
        up to 5 s; what it had not committed comes again."""
        wait = 0.1
        while not stop.is_set():
            try:
                await self._consume(stop)
            except Exception as exc:  # noqa: BLE001 - the webhooks outlive any round
                wait = min(5.0, wait * 2)
                log_failure(log, f"order webhooks: starting again in {wait:.1f}s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
            else:
                wait = 0.1

    async def _consume(self, stop: asyncio.Event) -> None:
        session_ms = round(self.settings.worker_session_timeout_s * 1000)  # as the saga's
        consumer = AIOKafkaConsumer(
            self.settings.topics.order_events, **client_options(self.settings),
            group_id=self.settings.webhook_group, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.max_batch,
            session_timeout_ms=session_ms, heartbeat_interval_ms=min(1_000, session_ms // 3),
        )  # fmt: skip
        try:
            await consumer.start()
            log.info("order webhooks to %s (group %s)", mask_url(self.sender.url),
                     self.settings.webhook_group)  # fmt: skip
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=self.max_batch)
                if not batch:
                    continue
                records = [r for tp in sorted(batch) for r in batch[tp]]
                settling = asyncio.ensure_future(self._settle(records, stop))
                try:
                    await poll_while(consumer, settling)  # the shop may be away for hours
                finally:
                    settling.cancel()  # only if the poll failed: the round starts again
                if not settling.result():
                    return  # stopping: nothing committed; the next owner sends them again
                await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items()})
        finally:
            with contextlib.suppress(KafkaError, OSError):
                await consumer.stop()

    async def _settle(self, records: list[ConsumerRecord], stop: asyncio.Event) -> bool:
        """Every record delivered or parked (True), or not, ``stop`` set and its DRAIN_S
        over first (False)."""
        deliveries, refused = await self._deliveries(records, stop)
        if deliveries is None:
            return False
        by_order: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_order.setdefault(delivery.order_id, []).append(delivery)
        gate, given_up = asyncio.Semaphore(CONCURRENCY), asyncio.Event()
        answered = 0  # events the shop took, or refused for good

        async def one_order(events: list[Delivery]) -> list[Parked]:
            nonlocal answered
            parked = []
            async with gate:
                for delivery in events:  # in the order of their versions: none after a gap
                    outcome = await self.sender.deliver(delivery, stop, given_up)
                    if isinstance(outcome, Abandoned):  # the batch stays uncommitted: the
                        given_up.set()  # others would only be sent twice
                        break
                    answered += 1
                    if outcome is not None:
                        parked.append(outcome)
            return parked

        async def grace() -> None:
            await stop.wait()
            await asyncio.sleep(DRAIN_S)
            given_up.set()

        timer = asyncio.ensure_future(grace())
        try:
            for outcome in await asyncio.gather(*map(one_order, by_order.values())):
                refused += outcome
        finally:
            timer.cancel()
        if answered < len(deliveries):
            log.info("order webhooks stopping: %d of the batch's %d events not answered within "
                     "%gs of the stop; the next owner sends the batch again",
                     len(deliveries) - answered, len(deliveries), DRAIN_S)  # fmt: skip
            return False
        if refused:
            await self.park(refused)
        return True

    async def _deliveries(self, records: list[ConsumerRecord], stop: asyncio.Event
                          ) -> tuple[list[Delivery] | None, list[Parked]]:  # fmt: skip
        """The records as deliveries, their orders read from Postgres (an outage waited out:
        None when ``stop`` is set first); those that cannot be sent, as refused."""
        events, refused = decoded(records, _event, "webhook: unreadable event")
        if not events:
            return [], refused
        wait = 0.1
        while True:
            try:
                rows = await self.pool.fetch(_ORDERS, [e["order_id"] for _, e in events],
                                             [e["version"] for _, e in events])  # fmt: skip
                break
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning("order webhooks wait for Postgres (%s)", describe(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
                if stop.is_set():
                    return None, refused
                wait = min(5.0, wait * 2)
        found = {(r["order_id"], r["seq"]): r for r in rows}
        deliveries = []
        for record, event in events:
            order_id, version = event["order_id"], event["version"]
            row = found.get((order_id, version))
            if row is None:
                refused.append(Parked(record, f"webhook: no such order event {order_id} "
                                               f"version {version}"))  # fmt: skip
                continue
            deliveries.append(Delivery(record, f"{order_id}.{version}", order_id,
                                       event_body(event, row)))  # fmt: skip
        return deliveries, refused


def _event(value: bytes) -> dict[str, Any]:
    """An order event as the workers publish it; ValueError naming what is wrong."""
    try:
        event = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(event, dict):
        raise ValueError("not a JSON object")
    if not isinstance(event.get("order_id"), str) or type(event.get("version")) is not int:
        raise ValueError("no order_id and version")
    if not isinstance(event.get("type"), str):
        raise ValueError("no type")
    return event
