"""An asyncio buyer driver: many buyers taking the real journey over HTTP, as a storefront
would send them.

Each buyer joins the queue, polls its status at the server's ``retry_after_ms`` (capped, so
a demo does not idle), reserves once admitted, and ends with a definitive answer: a
reservation or ``sold_out`` (or an error, counted). A reservation refused sold out for now
(``holds_pending``: units other buyers hold may come back) is asked again each second while
the turn lasts, as the page offers: ``sold_out`` is definitive once for good or the turn
over. 429 and 503 answers are retried after their ``Retry-After``, and a request whose
connection failed is sent again after a short, growing pause, as a storefront would (a join
and a status read are safe to repeat, a reservation carries its ``Idempotency-Key``), until
the buyer's patience runs out. Latencies are kept per route. Requests go through the small
keep-alive client of :mod:`loadtest.http_client`: the driver shares the machine with the engine.

An admitted buyer reserves where the status answer's ``reserve_url`` says (the gateway's
reservations listener), else on the gateway, and from an event loop of its own
(:class:`flashsale.event_loop.LoopThread`), as from the buyer's own device: on the driver's
main loop, busy with the joins and polls of thousands of simulated buyers, each step of the
exchange queued behind them, and the load generator's own backlog (about 100 ms at the median
of a 50,000-buyer demo) was counted as the reservation's latency.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import orjson

from allocator.pump import quantile
from flashsale.event_loop import LoopThread
from flashsale.tokens import unverified_claims
from loadtest.http_client import Client, HttpError, Response

Plan = Literal["buy", "no_show", "abandon"]
# An admitted buyer told "sold out for now" tries again this long after, while the turn lasts.
AGAIN_S = 1.0


class Person(NamedTuple):
    """One buyer: their tokens, when they arrive (``time.monotonic()``; 0: at once) and what
    they do: buy, let their admission lapse (``no_show``), or close the tab while waiting
    (``abandon``: they stop polling without leaving)."""

    token: str
    payment: str
    at: float = 0.0
    plan: Plan = "buy"


@dataclass(frozen=True, slots=True)
class Eta:
    """The first ETA a buyer was shown while waiting, and how long they then waited."""

    p50: float
    p90: float | None
    waited: float  # seconds from when it was shown until admitted
    pre_queue: bool  # shown before the place was drawn


@dataclass
class DriverStats:
    outcomes: Counter[str] = field(default_factory=Counter)  # reserved, sold_out, error:...
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    reservations: list[str] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # monotonic, per definitive answer
    reserved_at: list[float] = field(default_factory=list)  # monotonic, per reservation granted
    # (queue position, admission deadline ms) of each admitted buyer, from the admission token
    # the gateway signed: the deadline is when that position was admitted plus the window.
    admissions: list[tuple[int, int]] = field(default_factory=list)
    # The first ETA of each admitted buyer who was shown one: how honest the estimates were.
    etas: list[Eta] = field(default_factory=list)
    pre_queue_joins: int = 0  # joins answered with a place in the pre-queue
    no_retry_after: int = 0  # 429 or 503 answers without Retry-After
    # How late this process's event loop ran a 10 ms timer, every 10 ms while driving: a
    # latency measured here includes the time its answer waited for this loop.
    loop_lag: list[float] = field(default_factory=list)
    connection_failures: int = 0  # requests sent again after their connection failed
    # Where reservations were sent: "listener" (an admitted answer's reserve_url), "gateway"
    # (no reserve_url), "fallback" (the listener could not be reached: sent to the gateway).
    reserved_via: Counter[str] = field(default_factory=Counter)

    def lag(self) -> dict[str, float]:
        """The driver's own event-loop lag (ms), p50 and p99."""
        return {"p50_ms": round(quantile(self.loop_lag, 0.5) * 1000, 1),
                "p99_ms": round(quantile(self.loop_lag, 0.99) * 1000, 1)}  # fmt: skip

    def routes(self) -> dict[str, dict[str, float]]:
        return {route: {"requests": len(v), "p50_ms": round(quantile(v, 0.5) * 1000, 1),
                        "p99_ms": round(quantile(v, 0.99) * 1000, 1)}
                for route, v in sorted(self.latencies.items())}  # fmt: skip


class Buyers:
    def __init__(self, base_url: str, sale_id: str, sku: str, *, max_poll_ms: int = 500,
                 patience_s: float = 120.0, window_ms: int = 0) -> None:  # fmt: skip
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"the driver needs http://host:port, got {base_url!r}")
        self.window_ms = window_ms  # the sale's admission window: admitted at = deadline - it
        self.host, self.port = parts.hostname, parts.port
        self.sale = sale_id
        self.sku = sku
        self.max_poll_ms = max_poll_ms
        self.patience_s = patience_s
        self.stats = DriverStats()
        # Requests in flight at once (see run): new arrivals' joins, and the requests of buyers
        # already in line (polls, reservations), each within their own connections.
        self.gates = {"join": asyncio.Semaphore(500), "in_line": asyncio.Semaphore(500)}
        # The admitted buyers' reservations: their own loop, a client per (host, port).
        self.device = LoopThread("reservations")
        self.reserve_clients: dict[tuple[str, int], Client] = {}

    async def _call(self, client: Client, route: str, method: str, path: str, *,
                    headers: dict[str, str], deadline: float, body: Any = None,
                    fallback: tuple[Client, str] | None = None) -> tuple[int, Any]:  # fmt: skip
        """One request, repeated after 429/503 (at their ``Retry-After``) and after a failed
        connection (with a pause from 0.1 s doubling to 2 s) until ``deadline``; HttpError
        when the connection still fails then. A failed connection moves the request to
        ``fallback`` (client, path), once. A reservation is sent (and timed) on the buyer's
        own loop; the rest within the gates of this one."""
        payload = b"" if body is None else orjson.dumps(body)
        latencies = self.stats.latencies.setdefault(route, [])
        pause = 0.1
        gate = self.gates["join" if route == "join" else "in_line"]
        while True:
            try:
                if route == "reserve":
                    response, took = await self.device.call(
                        _timed(client, method, path, headers, payload)
                    )  # fmt: skip
                else:
                    async with gate:  # a connection is held only while a request is in flight
                        response, took = await _timed(client, method, path, headers, payload)
            except (HttpError, OSError) as exc:
                if time.monotonic() + pause > deadline:
                    raise HttpError(f"{route}: {exc}") from exc
                self.stats.connection_failures += 1
                if fallback is not None:
                    (client, path), fallback = fallback, None
                    self.stats.reserved_via["fallback"] += 1
                    continue
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
                continue
            latencies.append(took)
            status = response.status
            data = orjson.loads(response.body or b"null")
            self.stats.statuses[status] += 1
            retry_after = response.headers.get("retry-after")
            if status in (429, 503) and retry_after is None:
                self.stats.no_retry_after += 1
            if (
                status in (429, 503)
                and retry_after is not None
                and not (
                    isinstance(data, dict) and data.get("error", {}).get("code") == "queue_full"
                )
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(min(5.0, float(retry_after)))
                continue
            return status, data

    async def journey(self, client: Client, token: str, payment_token: str,
                      plan: Plan = "buy") -> str:  # fmt: skip
        """One buyer, start to definitive answer; returns the outcome (``abandoned`` for a
        buyer who gave up while waiting, ``no_show`` for one admitted who never reserved)."""
        auth = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + self.patience_s
        status, body = await self._call(client, "join", "POST", f"/v1/sales/{self.sale}/queue",
                                        headers=auth, deadline=deadline)  # fmt: skip
        if status != 200:
            return f"error:join:{status}"
        ticket = body["ticket"]
        state = body["state"]
        self.stats.pre_queue_joins += bool(body.get("pre_queue"))
        # (shown at, p50, p90, before the draw) of the first ETA shown
        first_eta: tuple[float, float, float | None, bool] | None = None
        # A join can already be admitted; the admission token comes with a status answer.
        while (state == "waiting" or (state == "admitted" and "admission_token" not in body)) \
                and time.monotonic() < deadline:  # fmt: skip
            if state == "waiting":
                await asyncio.sleep(min(self.max_poll_ms, body.get("retry_after_ms", 250)) / 1000)
            status, body = await self._call(
                client, "status", "GET", f"/v1/sales/{self.sale}/queue/status",
                headers={"X-Queue-Ticket": ticket}, deadline=deadline,
            )  # fmt: skip
            if status != 200:
                return f"error:status:{status}"
            ticket = body.get("ticket", ticket)
            state = body["state"]
            eta = body.get("eta_seconds") or {}
            if first_eta is None and state == "waiting" and eta.get("p50") is not None:
                first_eta = (time.time(), float(eta["p50"]), eta.get("p90"),
                             body.get("position") is None)  # fmt: skip
            if plan == "abandon" and state == "waiting":
                return "abandoned"  # the tab is closed: no leave, no more polls
        if state != "admitted":
            return "sold_out" if state == "sold_out" else f"error:{state}"
        if "admission_token" not in body:
            return "error:no_admission_token"
        admitted = unverified_claims(body["admission_token"])
        self.stats.admissions.append((int(admitted["p"]), int(admitted["d"])))
        if first_eta is not None and self.window_ms:
            admitted_at = (int(admitted["d"]) - self.window_ms) / 1000
            shown, p50, p90, pre_queue = first_eta
            self.stats.etas.append(Eta(p50, p90, max(0.0, admitted_at - shown), pre_queue))
        if plan == "no_show":
            return "no_show"
        url = body.get("reserve_url")
        target, path = self._reserve_at(url)
        self.stats.reserved_via["listener" if url else "gateway"] += 1
        admission = body["admission_token"]
        turn_ends = time.monotonic() + body.get("admission_expires_in_ms", 0) / 1000
        while True:
            status, body = await self._call(
                target, "reserve", "POST", path, fallback=self._reserve_at(None) if url else None,
                headers={**auth, "X-Admission-Token": admission,
                         "Idempotency-Key": uuid.uuid4().hex},
                body={"sku": self.sku, "quantity": 1, "payment_token": payment_token},
                deadline=deadline,
            )  # fmt: skip
            if status == 201:
                self.stats.reservations.append(body["reservation_id"])
                self.stats.reserved_at.append(time.monotonic())
                return "reserved"
            if status != 409 or body["error"]["code"] != "sold_out":
                return f"error:reserve:{status}:{body.get('error', {}).get('code')}"
            # Sold out for now (units others hold may come back): tried again while the turn
            # lasts, as the page offers; the answer is definitive once for good, or the turn over.
            if not body["error"].get("holds_pending") or \
                    time.monotonic() + AGAIN_S + 0.5 > min(turn_ends, deadline):  # fmt: skip
                return "sold_out"
            await asyncio.sleep(AGAIN_S)

    def _reserve_at(self, url: str | None) -> tuple[Client, str]:
        """The client (used on the reservations loop only) and path of a reservation:
        ``reserve_url`` as the status answer gave it, else this gateway's route."""
        host, port, path = self.host, self.port, f"/v1/sales/{self.sale}/reservations"
        if url:
            parts = urlsplit(url)
            host, port, path = parts.hostname or host, parts.port or 80, parts.path
        client = self.reserve_clients.get((host, port))
        if client is None:
            client = self.reserve_clients[host, port] = Client(host, port, connections=256)
        return client, path

    async def run(
        self,
        buyers: Sequence[Person] | Sequence[tuple[str, str]],
        *,
        concurrency: int = 500,
        on_answer: Callable[[DriverStats], None] | None = None,
    ) -> DriverStats:
        """Drive ``buyers`` (people, or (buyer token, payment token) pairs arriving at once),
        with at most ``concurrency`` joins in flight and as many requests of buyers already in
        line (a waiting buyer holds no connection between polls). Real buyers each have their
        own connection: a flood of arrivals does not hold back the polls and reservations of
        those already queued in the client, only in the gateway. A buyer who abandoned is not
        counted as answered."""
        self.gates = {"join": asyncio.Semaphore(concurrency),
                      "in_line": asyncio.Semaphore(concurrency)}  # fmt: skip
        client = Client(self.host, self.port, connections=2 * concurrency)
        try:

            async def one(person: Person) -> None:
                await asyncio.sleep(max(0.0, person.at - time.monotonic()))
                try:
                    outcome = await self.journey(client, person.token, person.payment,
                                                 person.plan)  # fmt: skip
                except (HttpError, OSError, TimeoutError) as exc:
                    outcome = f"error:{type(exc).__name__}"
                self.stats.outcomes[outcome] += 1
                if outcome != "abandoned":
                    self.stats.answered_at.append(time.monotonic())
                if on_answer is not None:
                    on_answer(self.stats)

            watch = asyncio.ensure_future(self._watch_lag())
            try:
                await asyncio.gather(*(one(b if isinstance(b, Person) else Person(*b))
                                       for b in buyers))  # fmt: skip
            finally:
                watch.cancel()
        finally:
            await client.aclose()
            await self.aclose()
        return self.stats

    async def aclose(self) -> None:
        """Close the reservations' clients and stop their loop (``run`` does, at its end)."""
        clients = list(self.reserve_clients.values())
        self.reserve_clients.clear()
        await self.device.stop(_close_all(clients))

    async def _watch_lag(self, every_s: float = 0.01) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await asyncio.sleep(every_s)
            self.stats.loop_lag.append(max(0.0, loop.time() - began - every_s))


async def _timed(client: Client, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[Response, float]:  # fmt: skip
    """One request and its latency, both on the caller's loop."""
    began = time.monotonic()
    response = await client.request(method, path, headers, body)
    return response, time.monotonic() - began


async def _close_all(clients: list[Client]) -> None:
    for client in clients:
        await client.aclose()
