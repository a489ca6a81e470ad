"""Which exceptions mean that a dependency is down, as opposed to bad data: one classification
for the gateway (503 with ``Retry-After``), the workers (the batch waits and runs again, nothing
is parked on the dead letters) and the reconciler (the item is tried again next pass).

A dependency that is unavailable, restarting, overloaded, read-only or in conflict is an
outage: the same request can succeed later. Read from the libraries' own exception trees:

* **Postgres** (asyncpg), by SQLSTATE class: ``08`` connection exception, ``53``
  insufficient resources (too many connections, out of memory, disk full), ``57`` operator
  intervention (admin or crash shutdown, cannot connect now, statement timeout), ``40``
  transaction rollback (serialization failure, deadlock), ``55P03`` lock not available, and
  ``25006`` a read-only transaction (a hot standby behind the endpoint, or writes turned off
  for maintenance: the engine never asks for one itself), ``42501`` a privilege the user
  was not granted (a grant mends it, as a password does a refused login; ``settings_at_fault``
  says so in words). Also ``42P01``, ``42703`` and
  ``42883``, a table, column or function that does not exist: the schema is behind this
  version of the engine (``flashsale migrate`` not run yet, or a new version deployed before
  its migrations), which running them mends; :func:`schema_error` says so in words. And
  ``42P05`` and ``26000``, a prepared statement named twice or missing: a transaction pooler
  without ``FLASHSALE_PG_POOL_MODE=transaction``, which the setting mends.
  asyncpg's client-state errors too (``InterfaceError``: a connection closed under it;
  ``InternalClientError``: the protocol surprised by a server going away), except those about
  the client's own configuration.
* **Redis** (redis-py): connection errors (loading included), timeouts, ``READONLY`` (a
  replica after a failover), ``OOM``, ``MISCONF`` (writes stopped: its disk full or
  failing), ``NOREPLICAS``, ``TRYAGAIN``, a ``BUSY`` script and ``NOPERM`` (an ACL user not
  allowed a command or key), also when a command inside a script met them (Redis 6.2 wraps
  those in "Error running script", which redis-py raises as a plain ``ResponseError``; an
  ACL's refusal there has no code in 6.2 or 7.0, only words, which are looked for); a
  database ``REDIS_URL`` names that the server does not have; on a Redis Cluster also
  ``CLUSTERDOWN``, a slot no node serves (mid-failover), redirections that never settled,
  and a cluster none of whose known nodes answers.
* **The rest**: ``OSError`` (refused, reset, timed out, a name not resolved, out of sockets),
  except one about a file (it names one: missing, not allowed, a folder), which retrying does
  not mend; the broker's errors, the payment provider's open circuit, and the engine's own
  :class:`~flashsale.errors.Unavailable`.
* **uvloop's closed transport**: writing to a connection the peer reset raises
  ``RuntimeError("unable to perform operation on <TCPTransport closed=True ...>; the handler
  is closed")`` under uvloop, where asyncio raises ``ConnectionResetError``
  (MagicStack/uvloop#506). redis-py and asyncpg let it through as it is (and drop the
  connection), so it is recognised here by uvloop's wording.
* **redis-py's write racing a close**: a connection closed while a command is being written
  (a node killed mid-failover, a reset) leaks ``AttributeError``/``TypeError`` from the
  connection's write instead of a ``ConnectionError`` (redis/redis-py#3546, #4287). It is
  recognised by where it was raised, redis-py's ``_send_packed_command``; the same error
  anywhere else is a bug.

Everything else (a constraint violation, bad encoding, a wrong type, a malformed record) can
never succeed as it is, and is handled as bad data.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Iterator

import aiohttp
import asyncpg
import redis.asyncio.connection
import redis.exceptions
from aiokafka.errors import KafkaError

from flashsale.errors import ConfigError, ProviderDown, SchemaBehind, Unavailable

_SQLSTATE_CLASSES = ("08", "53", "57", "40")
_SQLSTATES = ("55P03", "25006", "42501")  # 42501: a privilege the user was not granted
_SCHEMA_STATES = ("42P01", "42703", "42883")  # undefined table, column, function
# A prepared statement named twice on, or missing from, a server connection: asyncpg's cache
# behind a transaction pooler, which runs each transaction on any connection.
_POOLER_STATES = ("42P05", "26000")
_CLIENT_MISCONFIGURED = (
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)
_ALWAYS = (
    OSError,  # TimeoutError and ConnectionError included
    KafkaError,
    ProviderDown,
    Unavailable,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.ClusterError,  # "TTL exhausted": redirected too many times
    redis.exceptions.NoPermissionError,  # NOPERM: an ACL, mended without a release
    asyncpg.InternalClientError,
)


# Redis's answers that say "not now": a busy script, a replica, full memory, too few replicas
# for a write, a dataset being loaded, a cluster mid-failover, writes stopped because its
# disk is full or failing (MISCONF: until a save succeeds again). Redis 6.2 wraps one met by a
# command inside a script: "Error running script (call to f_…): @user_script:56:
# @user_script: 56: -READONLY You can't write against a read only replica."
_PASSING = ("BUSY", "READONLY", "OOM", "NOREPLICAS", "MASTERDOWN", "LOADING", "TRYAGAIN",
            "CLUSTERDOWN", "MISCONF", "NOPERM")  # fmt: skip
_SCRIPT_REFUSED = re.compile(r"(?:ERR )?Error running script .*?@user_script: \d+: -?([A-Z]+) ")
# An ACL user's command or key refused inside a script: words without a code, in Redis 6.2
# (wrapped as above) and 7.0 ("ERR The user executing the script can't run this command or
# subcommand script: <sha>, on @user_script:1.").
_SCRIPT_ACL = re.compile(r"The user executing the script can't [^.]*?(?= script: |$|\.)")
_CLOSED_TRANSPORT = "the handler is closed"
_REDIS_WRITE = (redis.asyncio.connection.__file__, "_send_packed_command")
_NO_CLUSTER_NODE = "Redis Cluster cannot be connected"
_NOT_A_CLUSTER = "Cluster mode is not enabled on this node"
_NO_SUCH_DB = "DB index is out of range"  # SELECT, as a connection to REDIS_URL/N opens
_SELECT_IN_A_CLUSTER = "SELECT is not allowed in cluster mode"  # a node, asked for /1


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says a dependency is down: retry later, nothing is wrong with the
    request or the event."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return False  # about a file: retrying will not make it appear
    if isinstance(exc, _ALWAYS):
        return True
    if is_closed_transport(exc):
        return True
    if isinstance(exc, (AttributeError, TypeError)) and _raised_in(exc, _REDIS_WRITE):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return (state[:2] in _SQLSTATE_CLASSES or state in _SQLSTATES
                or state in _SCHEMA_STATES or state in _POOLER_STATES)  # fmt: skip
    if isinstance(exc, asyncpg.InterfaceError):
        return not isinstance(exc, _CLIENT_MISCONFIGURED)
    if isinstance(exc, redis.exceptions.MovedError):
        return True  # a cluster read as one server (settings_at_fault): no key here is safe
    if isinstance(exc, redis.exceptions.ResponseError):  # a missing database is a setting too
        said = str(exc)
        return _refused_for(exc) in _PASSING or _NO_SUCH_DB in said or _SELECT_IN_A_CLUSTER in said
    if isinstance(exc, redis.exceptions.RedisClusterException):
        return str(exc).startswith(_NO_CLUSTER_NODE)
    return False


def schema_error(exc: BaseException) -> SchemaBehind | None:
    """What to tell an operator when ``exc`` says the database schema is behind the engine
    (a missing table, column or function); None for any other exception."""
    if isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", "") in _SCHEMA_STATES:
        return SchemaBehind(f"the database schema is behind this version of the engine ({exc}): "
                            "run `flashsale migrate`")  # fmt: skip
    return None


def settings_at_fault(exc: BaseException) -> ConfigError | None:
    """What to tell an operator when ``exc`` says the settings are at fault: ``REDIS_URL``
    leads to another kind of Redis than ``FLASHSALE_REDIS_CLUSTER`` says, or its login is
    refused, or it names a database the server does not have; the user of ``DATABASE_URL``
    or ``REDIS_URL`` was not granted what the engine does; ``DATABASE_URL`` leads to a
    transaction pooler not set as one; None for any other exception. The services still
    count it as an outage (a 503, and not ready): a setting is fixed without a release, a
    password or a grant on the server too."""
    for refused in _redis_chain(exc):  # the cluster client wraps what a node answered
        if isinstance(refused, redis.exceptions.AuthenticationError):
            return ConfigError(f"Redis refused the login of REDIS_URL: {refused}")
        if isinstance(refused, redis.exceptions.NoPermissionError) or (
            isinstance(refused, redis.exceptions.ResponseError)
            and _refused_for(refused) == "NOPERM"
        ):
            in_script = _SCRIPT_ACL.search(str(refused))
            said = (str(refused) if in_script is None
                    else f"t{in_script.group(0)[1:]} (ACL LOG names it)")  # fmt: skip
            return ConfigError(f"Redis refused REDIS_URL's user: {said}: allow it what the "
                               f"engine does ({_USERS})")  # fmt: skip
    if isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", "") in _POOLER_STATES:
        said = str(exc).splitlines()[0]  # asyncpg adds a hint of its own below
        return ConfigError(f"Postgres: {said}: {BEHIND_A_POOLER}")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return ConfigError(f"Postgres refused DATABASE_URL's user: {exc}: grant it what the "
                           f"engine does ({_USERS})")  # fmt: skip
    if isinstance(exc, redis.exceptions.ResponseError) and _SELECT_IN_A_CLUSTER in str(exc):
        return ConfigError(f"{CLUSTER_READ_AS_ONE}, and name database 0 (/0), a cluster's "
                           "only one")  # fmt: skip
    if isinstance(exc, redis.exceptions.ResponseError) and _NO_SUCH_DB in str(exc):
        return ConfigError(f"REDIS_URL names a database this Redis does not have ({exc}): use "
                           "one below its `databases` setting (16 by default), as /0")  # fmt: skip
    if isinstance(exc, redis.exceptions.RedisClusterException) and _NOT_A_CLUSTER in str(exc):
        return ConfigError("FLASHSALE_REDIS_CLUSTER=1, but the Redis at REDIS_URL is a single "
                           "server, not a node of a Redis Cluster: unset "
                           "FLASHSALE_REDIS_CLUSTER, or point REDIS_URL at a node of the "
                           "cluster")  # fmt: skip
    # The cluster client follows MOVED itself (allocator/redis_calls.py too): one that
    # reaches here was answered to a client of a single server.
    if isinstance(exc, redis.exceptions.MovedError):
        return ConfigError(CLUSTER_READ_AS_ONE)
    return None


_FROM_REDIS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)


def _redis_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling, as long as Redis raised it:
    redis-py's cluster client says "Cluster mode is not enabled on this node" of any refusal
    of CLUSTER SLOTS, an ACL's included, and "cannot be connected" of a refused login."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None or (seen is not exc and not isinstance(seen, _FROM_REDIS)):
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


BEHIND_A_POOLER = ("DATABASE_URL leads to a transaction pooler (PgBouncer's pool_mode = "
                   "transaction, say): set FLASHSALE_PG_POOL_MODE=transaction (docs/PRODUCTION.md, "
                   '"Behind a transaction pooler")')  # fmt: skip
_USERS = 'docs/PRODUCTION.md, "The engine\'s users"'
CLUSTER_READ_AS_ONE = ("REDIS_URL leads to a node of a Redis Cluster, read as a single server: "
                       "set FLASHSALE_REDIS_CLUSTER=1")  # fmt: skip


def is_closed_transport(exc: BaseException) -> bool:
    """True when ``exc`` is uvloop's refusal to write to a connection the peer reset: nothing
    was sent on it."""
    return type(exc) is RuntimeError and _CLOSED_TRANSPORT in str(exc)


def is_demotion(exc: BaseException) -> bool:
    """True when ``exc`` is a write refused because the server is a replica now (``READONLY``,
    also met inside a script): after a failover behind one endpoint (a managed service's DNS
    name, a virtual IP), the connection it came on still leads to the old primary."""
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and _refused_for(exc) == "READONLY"


def _refused_for(exc: redis.exceptions.ResponseError) -> str:
    """The error code of a Redis answer redis-py left in its text (``BUSY``, ``NOREPLICAS``,
    ``WRONGTYPE``...; it takes the code off those it has a class for), that of the command a
    script ran when Redis 6.2 wrapped it, ``NOPERM`` for an ACL's refusal inside a script
    (worded without it); '' when there is none."""
    text = str(exc)
    if _SCRIPT_ACL.search(text):
        return "NOPERM"
    wrapped = _SCRIPT_REFUSED.match(text)
    if wrapped is not None:
        return wrapped.group(1)
    code = text.split(" ", 1)[0]
    return code if code.isupper() else ""


def _raised_in(exc: BaseException, where: tuple[str, str]) -> bool:
    """``exc`` passed through the function named ``where[1]`` of the file ``where[0]``."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == where[1] and code.co_filename == where[0]:
            return True
        tb = tb.tb_next
    return False


def describe(exc: BaseException) -> str:
    """``Type: message``, for logs: redis-py's repr of its errors leaves the message out. A
    schema behind the engine is said in words, with what mends it, and so is an HTTPS server's
    certificate that is not trusted."""
    mend = schema_error(exc) or settings_at_fault(exc)
    if mend is not None:
        return mend.message
    if (untrusted := untrusted_certificate(exc)) is not None:
        return untrusted
    if isinstance(exc, ConfigError):  # the setting to fix, in words
        return exc.message
    text, name = str(exc), type(exc).__name__
    if text.startswith(name):  # aiokafka's errors name themselves
        return text
    return f"{name}: {text}" if text else name


def server_of(exc: BaseException) -> str | None:
    """Which server an outage is about, by the library that raised it (or an exception it
    wraps): "Redis", "Postgres", "the Kafka broker"; None when it does not say."""
    seen: BaseException | None = exc
    for _ in range(5):  # a short chain of causes: raise ... from, or raised while handling
        if seen is None:
            return None
        if isinstance(seen, redis.exceptions.RedisError):
            return "Redis"
        if isinstance(seen, asyncpg.PostgresError | asyncpg.InterfaceError):
            return "Postgres"
        if isinstance(seen, KafkaError):
            return "the Kafka broker"
        if isinstance(seen, aiohttp.ClientConnectorError):  # the provider, a gateway
            return f"the server at {seen.host}:{seen.port}"
        seen = seen.__cause__ or seen.__context__
    return None


QUIET_S = 5.0  # an outage a loop keeps meeting is logged once per this many seconds
_clock = time.monotonic
_quiet: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, what) -> (last line, rounds)


def log_failure(logger: logging.Logger, what: str, exc: BaseException, *,
                key: str | None = None) -> None:  # fmt: skip
    """Log a failed round of a loop that goes on: one warning line for an outage, the traceback
    for anything else (a bug or bad data, which the next round may meet again). The same
    outage met again by the same loop (``what``, or ``key`` when given: a request's route
    rather than its path) within QUIET_S of its last line is counted into the next line
    instead: an admission pump ticks ten times a second, and during an outage every request
    of a spike meets it."""
    if not is_outage(exc):
        logger.error("%s: %s", what, describe(exc), exc_info=exc)
        return
    seen, now = (logger.name, key or what), _clock()
    last, rounds = _quiet.get(seen, (None, 0))
    if last is not None and now - last < QUIET_S:
        _quiet[seen] = (last, rounds + 1)
        return
    if len(_quiet) >= 10_000:  # one key per loop and sale: only a long life gets here
        _quiet.clear()
    _quiet[seen] = (now, 0)
    if rounds and last is not None:  # rounds are only counted after a line
        logger.warning("%s: %s (%d more times in the last %.1fs)", what, describe(exc), rounds,
                       now - last)  # fmt: skip
    else:
        logger.warning("%s: %s", what, describe(exc))


def untrusted_certificate(exc: BaseException) -> str | None:
    """An HTTPS call's server certificate refused (aiohttp's error, or urllib's), in words: the
    engine's HTTPS calls (the shop's webhooks, the payment provider, a JWKS URL) trust the
    system's CAs, which OpenSSL's ``SSL_CERT_FILE`` replaces by a bundle. None for any other
    exception; Redis, Postgres and Kafka name their CAs in their own settings."""
    refused = getattr(exc, "certificate_error", None) or getattr(exc, "reason", None)
    if not isinstance(refused, ssl.SSLCertVerificationError):
        return None
    host, port = getattr(exc, "host", None), getattr(exc, "port", None)
    where = f"{host}:{port}" if host else "the server"
    return (f"the certificate of {where} is not trusted: {refused.verify_message}; the engine "
            f"trusts the system's CAs, or those of the bundle SSL_CERT_FILE names")  # fmt: skip
