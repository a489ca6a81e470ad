"""The engine's Redis connections: redis-py's, made to give up on a connection that can no
longer serve, so that redis-py's retry (``flashsale.clients.redis_client``: twice, on a fresh
connection) carries the call instead of failing it.

* **Reset under it.** Under uvloop, writing to a connection the peer reset raises
  ``RuntimeError(... the handler is closed)`` instead of an ``OSError``, which redis-py does
  not retry: after a network reset, each dead connection left in a pool cost one caller a
  503 (found by ``flashsale chaos``: the admin's preload right after ``network-reset``).
  Nothing was sent on it, so the call is safe to send again.
* **Demoted under it.** After a failover behind one endpoint (a managed service's DNS name, a
  virtual IP), connections opened before it still lead to the old primary, now a replica,
  which refuses every write with ``READONLY`` (also inside a script) and would go on doing so
  for as long as the pool keeps them. The connection is dropped and the call sent again on a
  new one, which reaches the new primary: what redis-py's own Sentinel connection does. A
  refused write did not run.

Both raise redis-py's ``ConnectionError``, which its retry takes and the engine's outage
classification (:mod:`flashsale.outages`) counts as an outage where no retry carries it
(``allocator.redis_calls``' packed calls).

A :class:`Script` the server lost (NOSCRIPT) is sent again whole with EVAL, which runs
wherever the call lands, instead of being loaded through any pooled connection, which may
still lead to the old primary: see ``allocator.redis_calls``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.typing import EncodableT, KeyT

from flashsale.outages import describe, is_closed_transport, is_demotion


class _GivesUp(AbstractConnection):
    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().send_packed_command(*args, **kwargs)
        except RuntimeError as exc:
            if not is_closed_transport(exc):
                raise
            raise redis.exceptions.ConnectionError(f"connection reset: {exc}") from exc

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except redis.exceptions.ResponseError as exc:
            if not is_demotion(exc):
                raise
            await self.disconnect()
            raise redis.exceptions.ConnectionError(
                f"the server is a replica now: {describe(exc)}"
            ) from exc


class Connection(_GivesUp, aioredis.Connection):
    """A TCP connection (``redis://``)."""


class SSLConnection(_GivesUp, aioredis.SSLConnection):
    """A TLS connection (``rediss://``)."""


# redis-py's connection class, as ``from_url`` chose it for the URL's scheme -> the engine's
# (a Unix socket has no failover and no reset to give up on).
REPLACES: dict[type[AbstractConnection], type[AbstractConnection]] = {
    aioredis.Connection: Connection,
    aioredis.SSLConnection: SSLConnection,
}


class Script(AsyncScript):
    """A Lua script called by EVALSHA; a call answered NOSCRIPT is sent again whole with EVAL
    (see the module's text)."""

    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: aioredis.Redis | aioredis.RedisCluster | None = None,
    ) -> Any:
        target = self.registered_client if client is None else client
        if isinstance(target, Pipeline):  # the pipeline loads its scripts itself
            return await super().__call__(keys, args, client)
        keys, args = keys or (), tuple(args or ())
        try:
            return await target.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await target.eval(cast(str, self.script), len(keys), *keys, *args)
