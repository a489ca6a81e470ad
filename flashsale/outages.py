"""Which third-party exceptions mean that a dependency is down, as opposed to bad data.

A request that meets one of these gets 503 with ``Retry-After`` (the gateway), and a batch of
events waits and is run again (the workers): nothing was decided, so nothing is refused or
parked. Domain errors (:mod:`flashsale.errors`) are classified by their own class.
"""

from __future__ import annotations

import asyncpg
import redis.exceptions
from aiokafka.errors import KafkaError

from flashsale.errors import ProviderDown

# Redis or Postgres unreachable, a connection lost mid-call, a timeout.
DEPENDENCY_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
# What a worker waits out instead of parking its events on the dead letters: the above, a
# Postgres connection closed under it, the payment provider's open circuit, the broker.
WAIT_OUT: tuple[type[BaseException], ...] = (
    *DEPENDENCY_DOWN,
    asyncpg.InterfaceError,
    ProviderDown,
    KafkaError,
)
