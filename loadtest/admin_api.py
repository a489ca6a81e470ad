"""What the load tools ask of the admin API, as a merchandiser or an SRE would: create and
preload a sale, change its admission rate, end it, and run the post-sale audit once the
pipeline has drained."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp

from flashsale.errors import FlashsaleError

# A 503 (a dependency down, with Retry-After) is waited out this many times, as an admin
# would, before the step counts as failed: every step here is safe to send again (a sale is
# created under an idempotency key; preload, a rate and an end are absolute).
ATTEMPTS = 5


def _admin(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _ask(session: aiohttp.ClientSession, method: str, url: str, token: str, *,
               what: str, expect: int, **kwargs: Any) -> Any:  # fmt: skip
    """The JSON answer to one admin request, a 503 waited out (``Retry-After``, at most
    ATTEMPTS times); FlashsaleError naming ``what`` with the gateway's answer otherwise (one
    line from the command line)."""
    headers = {**_admin(token), **kwargs.pop("headers", {})}
    attempt = 1
    while True:
        async with session.request(method, url, headers=headers, **kwargs) as r:
            if r.status == 503 and attempt < ATTEMPTS:
                attempt += 1
                await asyncio.sleep(min(5.0, float(r.headers.get("Retry-After", "1"))))
                continue
            if r.status != expect:
                raise FlashsaleError(f"{what} failed: {r.status} {await r.text()}")
            return await r.json()


async def create_sale(session: aiohttp.ClientSession, base: str, token: str,
                      spec: dict[str, Any]) -> str:  # fmt: skip
    """Create the sale ``spec`` describes and preload it; its id. FlashsaleError with the
    gateway's answer when either step is refused (a 503 is waited out first)."""
    created = await _ask(session, "POST", f"{base}/admin/v1/sales", token,
                         what="creating the sale", expect=201, json=spec,
                         headers={"Idempotency-Key": uuid.uuid4().hex})  # fmt: skip
    sale_id = str(created["id"])
    await _ask(session, "POST", f"{base}/admin/v1/sales/{sale_id}/preload", token,
               what="preloading the sale", expect=200)  # fmt: skip
    return sale_id


async def set_admission_rate(session: aiohttp.ClientSession, base: str, token: str,
                             sale_id: str, rate: int) -> None:  # fmt: skip
    """Change the admission rate, as an operator would mid-queue."""
    await _ask(session, "PATCH", f"{base}/admin/v1/sales/{sale_id}", token,
               what="changing the admission rate", expect=200,
               json={"admission_rate": rate})  # fmt: skip


async def end_sale(session: aiohttp.ClientSession, base: str, token: str, sale_id: str) -> None:
    """End the sale: its pump stops, its holds run out as usual."""
    await _ask(session, "POST", f"{base}/admin/v1/sales/{sale_id}/end", token,
               what="ending the sale", expect=200)  # fmt: skip


async def archive(session: aiohttp.ClientSession, base: str, token: str,
                  sale_id: str) -> dict[str, Any]:  # fmt: skip
    """Archive the ended sale (its audit recorded, its per-buyer Redis state deleted)."""
    answer: dict[str, Any] = await _ask(session, "POST", f"{base}/admin/v1/sales/{sale_id}/archive",
                                        token, what="archiving the sale", expect=200)  # fmt: skip
    return answer


async def audit(session: aiohttp.ClientSession, base: str, token: str, sale_id: str, *,
                patience: float = 60) -> dict[str, Any]:  # fmt: skip
    """The post-sale audit report, asked again until it passes or says the pipeline has
    drained (the last offsets committed, the outboxes empty), for at most ``patience`` s."""
    deadline = time.monotonic() + patience
    while True:
        async with session.get(f"{base}/admin/v1/sales/{sale_id}/audit",
                               headers=_admin(token)) as r:  # fmt: skip
            if r.status == 503 and time.monotonic() < deadline:
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status != 200:
                raise FlashsaleError(f"the audit failed: {r.status} {await r.text()}")
            report: dict[str, Any] = await r.json()
        if report["passed"] or report["facts"].get("drained") or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.5)  # offsets still being committed: not drained yet
