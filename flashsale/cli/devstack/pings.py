"""The readiness pings of the embedded stack: a real Redis ``PING``, a Postgres ``SELECT 1``
and a Kafka metadata request, each over a client opened for that one ping (the stack asks
while a server starts; a service's ``/healthz`` keeps its clients, see
:mod:`flashsale.ops_endpoints`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka.client import AIOKafkaClient

from flashsale.cli.devstack.errors import StackError


async def ping_redis(url: str, timeout_s: float = 1.0) -> None:
    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    try:
        if not await client.ping():
            raise StackError("redis PING failed")
    finally:
        await client.aclose()


async def ping_postgres(dsn: str, timeout_s: float = 2.0) -> None:
    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        if await conn.fetchval("SELECT 1") != 1:
            raise StackError("postgres SELECT 1 failed")
    finally:
        await conn.close()


class _Silent(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


async def ping_kafka(bootstrap: str, timeout_s: float = 2.0) -> None:
    """A metadata request; raises while the broker does not answer. aiokafka's own ERROR line
    for a refused connection is kept out of the output: a broker still starting refuses the
    first pings of every `dev up`, and the exception is the answer."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    silent, logger = _Silent(), logging.getLogger("aiokafka")
    logger.addFilter(silent)
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)  # sends a Metadata request
    finally:
        logger.removeFilter(silent)
        await client.close()


PINGS: dict[str, Callable[[str], Any]] = {
    "redis": ping_redis,
    "postgres": ping_postgres,
    "kafka": ping_kafka,
}
