"""An asyncio buyer driver: many buyers taking the real journey over HTTP, as a storefront
would send them.

Each buyer joins the queue, polls its status at the server's ``retry_after_ms`` (capped, so
a demo does not idle), reserves once admitted, and ends with a definitive answer: a
reservation or ``sold_out`` (or an error, counted). 429 and 503 answers are retried after
their ``Retry-After``. Latencies are kept per route.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from allocator.pump import quantile


@dataclass
class DriverStats:
    outcomes: Counter[str] = field(default_factory=Counter)  # reserved, sold_out, error:...
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    reservations: list[str] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # monotonic, per definitive answer

    def routes(self) -> dict[str, dict[str, float]]:
        return {route: {"requests": len(v), "p50_ms": round(quantile(v, 0.5) * 1000, 1),
                        "p99_ms": round(quantile(v, 0.99) * 1000, 1)}
                for route, v in sorted(self.latencies.items())}  # fmt: skip


class Buyers:
    def __init__(self, base_url: str, sale_id: str, sku: str, *, max_poll_ms: int = 500,
                 patience_s: float = 120.0) -> None:  # fmt: skip
        self.base = base_url.rstrip("/")
        self.sale = sale_id
        self.sku = sku
        self.max_poll_ms = max_poll_ms
        self.patience_s = patience_s
        self.stats = DriverStats()

    async def _call(self, session: aiohttp.ClientSession, route: str, method: str, path: str,
                    **kwargs: Any) -> tuple[int, Any]:  # fmt: skip
        while True:
            began = time.monotonic()
            async with session.request(method, self.base + path, **kwargs) as response:
                body = orjson.loads(await response.read() or b"null")
                status = response.status
                retry_after = response.headers.get("Retry-After")
            self.stats.latencies.setdefault(route, []).append(time.monotonic() - began)
            self.stats.statuses[status] += 1
            if (
                status in (429, 503)
                and retry_after is not None
                and not (
                    isinstance(body, dict) and body.get("error", {}).get("code") == "queue_full"
                )
            ):
                await asyncio.sleep(min(5.0, float(retry_after)))
                continue
            return status, body

    async def journey(self, session: aiohttp.ClientSession, token: str,
                      payment_token: str) -> str:  # fmt: skip
        """One buyer, start to definitive answer; returns the outcome."""
        auth = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + self.patience_s
        status, body = await self._call(session, "join", "POST",
                                        f"/v1/sales/{self.sale}/queue", headers=auth)  # fmt: skip
        if status != 200:
            return f"error:join:{status}"
        ticket = body["ticket"]
        state = body["state"]
        while state == "waiting" and time.monotonic() < deadline:
            await asyncio.sleep(min(self.max_poll_ms, body.get("retry_after_ms", 250)) / 1000)
            status, body = await self._call(
                session, "status", "GET", f"/v1/sales/{self.sale}/queue/status",
                headers={"X-Queue-Ticket": ticket},
            )  # fmt: skip
            if status != 200:
                return f"error:status:{status}"
            ticket = body.get("ticket", ticket)
            state = body["state"]
        if state != "admitted":
            return "sold_out" if state == "sold_out" else f"error:{state}"
        status, body = await self._call(
            session, "reserve", "POST", f"/v1/sales/{self.sale}/reservations",
            headers={**auth, "X-Admission-Token": body["admission_token"],
                     "Idempotency-Key": uuid.uuid4().hex},
            json={"sku": self.sku, "quantity": 1, "payment_token": payment_token},
        )  # fmt: skip
        if status == 201:
            self.stats.reservations.append(body["reservation_id"])
            return "reserved"
        if status == 409 and body["error"]["code"] == "sold_out":
            return "sold_out"
        return f"error:reserve:{status}:{body.get('error', {}).get('code')}"

    async def run(
        self,
        buyers: list[tuple[str, str]],
        *,
        concurrency: int = 500,
        on_answer: Callable[[DriverStats], None] | None = None,
    ) -> DriverStats:
        """Drive ``buyers`` ((buyer token, payment token) pairs), ``concurrency`` at a time."""
        gate = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(token: str, payment: str) -> None:
                async with gate:
                    try:
                        outcome = await self.journey(session, token, payment)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        outcome = f"error:{type(exc).__name__}"
                self.stats.outcomes[outcome] += 1
                self.stats.answered_at.append(time.monotonic())
                if on_answer is not None:
                    on_answer(self.stats)

            await asyncio.gather(*(one(t, p) for t, p in buyers))
        return self.stats
