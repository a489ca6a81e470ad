"""Each granted reservation is published to Kafka before the buyer is told about it.

A reservation is decided in Redis, and a 201 promises it will become an order. Redis can lose
its last moments (``FLUSHALL``, a restart without persistence, a machine crash inside the AOF's
fsync window) before the outbox relay has moved the reservation to Kafka: the buyer would hold
a 201 for a reservation that no longer exists anywhere. So the gateway publishes the
reservation's ``reservation.created`` event itself and answers 201 only once the broker has
acknowledged it (``acks="all"``).

On a gateway that also serves the waiting room, the producer runs on an event loop of its own
(:class:`flashsale.event_loop.LoopThread`). On the gateway's loop, during a spike, every step
of the exchange with the broker queued behind thousands of joins and polls: a broker that
acknowledges in 3 ms took about 290 ms (median of a 50,000-buyer demo), most of a
reservation's latency. The reservations listener (``gateway --reservations-only``) has no
joins or polls on its loop, so its producer shares that loop: the hop to a thread and back
cost each reservation about 55 us of CPU there.

The relay still publishes the same event from the outbox (the workers' inbox drops the
duplicate), and stays the only path for what the gateway never acknowledged. If the broker
does not acknowledge within ``ANNOUNCE_TIMEOUT_S`` the buyer is answered 503 with
``Retry-After``: the hold stays, and a retry with the same ``Idempotency-Key`` publishes again
and answers 201. Only granted reservations are published, a few per unit of stock; refusals
and sold-out answers never wait for the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer

from allocator.batching import Coalescer
from flashsale.errors import Unavailable
from flashsale.event_loop import LoopThread
from flashsale.events import ReservationEvent, encode_event, message_key
from flashsale.kafka import publish, started_producer
from flashsale.settings import Settings

ANNOUNCE_TIMEOUT_S = 3.0

T = TypeVar("T")


class Announcer:
    """One producer per gateway process, started by :meth:`warm` when the process starts or
    else at its first use (a gateway starts and serves everything else while the broker is
    down), after the topics are made sure of (a broker that does not create topics on first
    use would refuse every reservation)."""

    def __init__(self, settings: Settings, timeout_s: float = ANNOUNCE_TIMEOUT_S, *,
                 own_loop: bool = True) -> None:  # fmt: skip
        """``own_loop``: run the producer on a loop thread of its own (a gateway whose loop
        also serves joins and polls), else on the caller's loop (the reservations listener)."""
        self.settings = settings
        self.timeout_s = timeout_s
        self._out: AIOKafkaProducer | None = None  # made and used on the producer's loop only
        self._lock = asyncio.Lock()  # bound to a loop at its first use: the producer's
        self._thread = LoopThread("announcer") if own_loop else None
        # Reservations granted together (one reserve batch) are announced together: one hop
        # to the producer's thread and one send per partition for all of them. The batch is
        # taken at the next turn of the loop, so no reservation waits for others to come.
        self._together: Coalescer[tuple[bytes, bytes], None] = Coalescer(
            self._cross, "announcer", window=0.0
        )

    async def announce(self, event: ReservationEvent) -> None:
        """Return once the broker has acknowledged ``event``; Unavailable when it cannot."""
        await self._together.submit((message_key(event.reservation_id), encode_event(event)))

    async def _there(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result, run on the producer's loop."""
        return await (coro if self._thread is None else self._thread.call(coro))

    async def _cross(self, messages: list[tuple[bytes, bytes]]) -> list[None]:
        await self._there(self._publish(messages))
        return [None] * len(messages)

    async def _publish(self, messages: list[tuple[bytes, bytes]]) -> None:
        out = await self._producer()
        try:
            async with asyncio.timeout(self.timeout_s):
                await publish(out, self.settings.topics.reservations, messages)
        except TimeoutError as exc:
            raise Unavailable(
                "the order pipeline did not take the reservation in time; retry with the same "
                "Idempotency-Key"
            ) from exc

    @property
    def started(self) -> bool:
        """The producer is running (started by :meth:`warm` or a first reservation)."""
        return self._out is not None

    async def warm(self) -> None:
        """Start the producer now rather than at the first reservation (a server's startup
        calls this in the background): started by the first reservations of a 50,000-buyer
        demo, it kept them waiting 117-539 ms (the topics made sure of, the bootstrap, the
        metadata, all on a machine busy with the spike). If the broker is down, the first
        reservation tries again, as without it."""
        with contextlib.suppress(Exception):
            await self._there(self._producer())

    async def _producer(self) -> AIOKafkaProducer:
        if self._out is not None:
            return self._out
        async with self._lock:
            if self._out is None:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        self._out = await started_producer(self.settings, linger_ms=1)
                except Exception as exc:
                    raise Unavailable(
                        "the order pipeline is unavailable; retry with the same Idempotency-Key"
                    ) from exc
            return self._out

    async def aclose(self) -> None:
        await self._together.aclose()
        if self._thread is None:
            await self._close()
        else:
            await self._thread.stop(self._close())

    async def _close(self) -> None:
        if self._out is not None:
            await self._out.stop()
            self._out = None
