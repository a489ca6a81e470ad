"""What the load tools ask of the admin API, as a merchandiser or an SRE would: create and
preload a sale, change its admission rate, end it, and run the post-sale audit once the
pipeline has drained."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp


def _admin(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create_sale(session: aiohttp.ClientSession, base: str, token: str,
                      spec: dict[str, Any]) -> str:  # fmt: skip
    """Create the sale ``spec`` describes and preload it; its id. RuntimeError with the
    gateway's answer when either step is refused."""
    async with session.post(f"{base}/admin/v1/sales", json=spec, headers=_admin(token)) as r:
        if r.status != 201:
            raise RuntimeError(f"creating the sale failed: {r.status} {await r.text()}")
        sale_id = str((await r.json())["id"])
    async with session.post(f"{base}/admin/v1/sales/{sale_id}/preload",
                            headers=_admin(token)) as r:  # fmt: skip
        if r.status != 200:
            raise RuntimeError(f"preloading the sale failed: {r.status} {await r.text()}")
    return sale_id


async def set_admission_rate(session: aiohttp.ClientSession, base: str, token: str,
                             sale_id: str, rate: int) -> None:  # fmt: skip
    """Change the admission rate, as an operator would mid-queue."""
    async with session.patch(f"{base}/admin/v1/sales/{sale_id}", json={"admission_rate": rate},
                             headers=_admin(token)) as r:  # fmt: skip
        if r.status != 200:
            raise RuntimeError(f"changing the admission rate failed: {r.status} {await r.text()}")


async def end_sale(session: aiohttp.ClientSession, base: str, token: str, sale_id: str) -> None:
    """End the sale: its pump stops, its holds run out as usual."""
    async with session.post(f"{base}/admin/v1/sales/{sale_id}/end",
                            headers=_admin(token)) as r:  # fmt: skip
        if r.status != 200:
            raise RuntimeError(f"ending the sale failed: {r.status} {await r.text()}")


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
                raise RuntimeError(f"the audit failed: {r.status} {await r.text()}")
            report: dict[str, Any] = await r.json()
        if report["passed"] or report["facts"].get("drained") or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.5)  # offsets still being committed: not drained yet
