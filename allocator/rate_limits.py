"""Rate limits: GCRA in Redis, shared by every gateway process.

The gateway limits the routes that write (join, reserve, cancel) per client IP and per buyer
with the generic cell rate algorithm in ``lua/ratelimit.lua``: one key per subject holding one
timestamp, judged by Redis ``TIME`` so every gateway process shares the limit. Over the limit:
:class:`~flashsale.errors.RateLimited` (429 with ``Retry-After``).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.commands.core import AsyncScript

from allocator.batching import Coalescer
from allocator.redis_calls import lua_script, send_packed
from flashsale.clients import RedisClient
from flashsale.errors import RateLimited
from flashsale.keys import rate_limit_key
from flashsale.settings import Rate


@dataclass(frozen=True, slots=True)
class RateKeys:
    """A request's rate limits, counted inside the script call that decides it: a join or a
    reservation on a single Redis node, whose script may touch the rate-limit keys too
    (``rate_gate`` in ``lua/lib.lua``). One round trip instead of two."""

    ip_key: str | None  # None: that limit is off
    buyer_key: str | None
    rates: tuple[int, int, int, int]  # per-IP and per-buyer GCRA interval and tolerance (us)


NO_LIMITS = RateKeys(None, None, (0, 0, 0, 0))


def rate_columns(
    limits: list[RateKeys], first: int
) -> tuple[list[str], list[int], list[int], tuple[int, int, int, int]]:
    """A batch's rate-limit keys, each once, to pass as ``KEYS[first..]``; each request's
    ``KEYS`` index of its per-IP key, then of its per-buyer key (0: that limit is off); and the
    one set of rates of the call (the settings', carried by every request that is limited)."""
    at: dict[str, int] = {}

    def index(key: str | None) -> int:
        return 0 if key is None else at.setdefault(key, first + len(at))

    ips = [index(limit.ip_key) for limit in limits]
    buyers = [index(limit.buyer_key) for limit in limits]
    rates = next((x.rates for x in limits if x.ip_key or x.buyer_key), NO_LIMITS.rates)
    return list(at), ips, buyers, rates


class RateLimiter:
    """GCRA checks of one process, coalesced: the checks of concurrent requests go to Redis in
    one write of packed ``EVALSHA`` calls (one per subject; each subject is its own slot), and
    their answers come back in one read. A rate check per request otherwise costs a socket
    write and read of its own, which was a quarter of the gateway's CPU on joins."""

    def __init__(self, client: RedisClient, *, window: float = 0.001) -> None:
        self.client = client
        self._script: AsyncScript = lua_script(client, "ratelimit")
        # attempts=1: a GCRA call is not idempotent; a batch whose reply was lost is not sent
        # again (the caller gets Unavailable), rather than counted twice.
        self._batches: Coalescer[tuple[tuple[str, Rate], ...], int] = Coalescer(
            self._check_many, "rate limits", window=window, max_batch=256, attempts=1
        )

    async def check(self, subjects: list[tuple[str, Rate]]) -> None:
        """Count one request for each ``(subject, rate)``; raise RateLimited when any is over.

        A request refused by one subject is still counted by the others, which only errs on
        the side of limiting."""
        active = tuple((s, r) for s, r in subjects if r.enabled)
        if not active:
            return
        worst = await self._batches.submit(active)
        if worst > 0:
            raise RateLimited("too many requests; slow down", retry_after_s=worst / 1_000_000)

    async def _check_many(self, requests: list[tuple[tuple[str, Rate], ...]]) -> list[int]:
        commands: list[tuple[str | int, ...]] = []
        for subjects in requests:
            for subject, rate in subjects:
                commands.append(("EVALSHA", self._script.sha, 1, rate_limit_key(subject),
                                 *rate.gcra_us()))  # fmt: skip
        waits = await send_packed(self.client, commands, script=self._script)
        worst, at = [], 0
        for subjects in requests:
            worst.append(max(int(w) for w in waits[at : at + len(subjects)]))
            at += len(subjects)
        return worst

    async def aclose(self) -> None:
        await self._batches.aclose()
