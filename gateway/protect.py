"""Rate limits: GCRA in Redis, shared by every gateway process.

* Rate limits apply to the routes that write (join, reserve, cancel) per client IP and per
  buyer, with the generic cell rate algorithm in ``lua/ratelimit.lua``: one key per subject
  holding one timestamp, judged by Redis ``TIME`` so every gateway process shares the limit.
  Over the limit: 429 ``rate_limited`` with ``Retry-After``.
* The per-process in-flight cap is a middleware in ``gateway/app.py``.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from allocator.scripts import source
from flashsale.errors import RateLimited
from flashsale.keys import rate_limit_key
from flashsale.settings import Rate


class RateLimiter:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._script: AsyncScript = client.register_script(source("ratelimit"))

    async def check(self, subjects: list[tuple[str, Rate]]) -> None:
        """Count one request for each ``(subject, rate)``; raise RateLimited when any is over.

        Every subject is checked in one round trip. A request refused by one subject is still
        counted by the others, which only errs on the side of limiting."""
        active = [(s, r) for s, r in subjects if r.enabled]
        if not active:
            return
        pipe = self.client.pipeline(transaction=False)
        for subject, rate in active:
            interval_us = 1_000_000 / rate.per_second
            await self._script(
                keys=[rate_limit_key(subject)],
                args=[round(interval_us), round(interval_us * (rate.burst - 1))],
                client=pipe,
            )
        waits = await pipe.execute()
        worst = max(int(w) for w in waits)
        if worst > 0:
            raise RateLimited("too many requests; slow down", retry_after_s=worst / 1_000_000)
