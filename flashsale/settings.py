"""One typed settings object, read from the environment once at the entry point.

Resolution, per variable: the process environment wins; otherwise the values that
``flashsale dev up`` wrote to ``<home>/dev.env`` (the embedded stack), and for
``FLASHSALE_PSP_URL`` the one a running ``flashsale up`` wrote to ``<home>/engine.env``;
otherwise unset.
A component that needs an unset server gets a :class:`~flashsale.errors.ConfigError` that
says how to fix it, never a silent default pointing at some other server.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from urllib.parse import parse_qsl, urljoin, urlsplit, urlunsplit

from flashsale.env_values import (
    admin_apart,
    bootstrap,
    choice,
    flag,
    http_url,
    in_flight_ceilings,
    networks,
    origin,
    origins,
    seconds,
    secret_setting,
    trimmed,
    webhook_secret,
)
from flashsale.errors import ConfigError
from flashsale.topics import Topics, consumer_groups

DEV_ENV_FILE = "dev.env"
# What a running `flashsale up` tells other commands in the same state folder (the payment
# simulator it started), so `flashsale audit` run from another shell finds it.
ENGINE_ENV_FILE = "engine.env"
_EXPORT_LINE = re.compile(r"^export ([A-Z_][A-Z0-9_]*)=(.*)$")


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string: masked in ``repr``/``str`` so it cannot leak through logs by accident."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def each_key(self) -> tuple[str, ...]:
        """Its keys: one, or several comma-separated during a rotation, the current first."""
        return tuple(key.strip() for key in self._value.split(",") if key.strip())

    def current(self) -> str:
        """The key to sign or send with: the first ('' when unset)."""
        return next(iter(self.each_key()), "")

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def mask_url(url: str | None) -> str | None:
    """``url`` with any password, and the value of each query parameter, replaced by ``***``
    (for logs, ``repr`` and start lines): libpq takes ``?password=``, and a shop's webhook
    URL may carry a token in its query."""
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
    query = "&".join(
        name + ("=***" if sep else "")
        for name, sep, _ in (p.partition("=") for p in parts.query.split("&"))
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query if parts.query else ""))


def redirect_target(asked: str, location: str | None) -> str:
    """Where a redirect answered to ``asked`` points (its ``Location``, relative to ``asked``
    or not), masked as :func:`mask_url` masks; "nowhere" without one."""
    return str(mask_url(urljoin(asked, location))) if location else "nowhere"


SECRET_PARAMETERS = ("pass", "token", "secret", "key", "sig", "auth")


def _query_values(url: str) -> list[str]:
    """The values of ``url``'s query parameters named as secrets are (``password=``,
    ``token=``...), for the log filter; not ``sslmode=require``, whose value is a word."""
    return [value for name, value in parse_qsl(urlsplit(url).query)
            if value and any(word in name.lower() for word in SECRET_PARAMETERS)]  # fmt: skip


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``export KEY=value`` lines (the format ``flashsale dev env`` prints)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        match = _EXPORT_LINE.match(raw.strip())
        if match:
            value = match.group(2)
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            values[match.group(1)] = value
    return values


def home_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The engine's state folder: ``$FLASHSALE_HOME`` or ``./.flashsale``. ConfigError when
    it names a file."""
    env = os.environ if environ is None else environ
    home = Path(env.get("FLASHSALE_HOME") or Path.cwd() / ".flashsale").resolve()
    if home.exists() and not home.is_dir():
        raise ConfigError(f"FLASHSALE_HOME: {home} is a file, not a folder")
    return home


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate limit: ``per_second`` sustained, ``burst`` at once. ``per_second == 0``: off."""

    per_second: float
    burst: int

    @classmethod
    def parse(cls, text: str, name: str) -> Rate:
        """``"R"`` or ``"R,B"`` (requests per second, burst; burst defaults to 2R) or ``off``."""
        if text.strip().lower() in ("off", "0", "none"):
            return cls(0.0, 0)
        rate_text, _, burst_text = text.partition(",")
        try:
            rate = float(rate_text)
            burst = int(burst_text) if burst_text.strip() else max(1, int(rate * 2))
        except (ValueError, OverflowError):  # overflow: an infinite rate's default burst
            raise ConfigError(f"{name} must be 'RATE[,BURST]' or 'off', got {text!r}") from None
        if not 0 < rate < math.inf or burst < 1:  # false for nan too
            raise ConfigError(f"{name} needs a positive rate and burst, got {text!r}")
        return cls(rate, burst)

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def gcra_us(self) -> tuple[int, int]:
        """(emission interval, burst tolerance) in microseconds, as the GCRA scripts take
        them; (0, 0) when off."""
        if not self.enabled:
            return 0, 0
        interval = 1_000_000 / self.per_second
        return round(interval), round(interval * (self.burst - 1))


LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")
ARCHIVE_AFTER_S = 86_400.0  # FLASHSALE_ARCHIVE_AFTER's default: a day after a sale's end


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SASL = ("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")
_ONE_OF_SASL = f"{', '.join(SASL_MECHANISMS[:-1])} or {SASL_MECHANISMS[-1]}"


def _uses_tls(protocol: str) -> bool:
    return protocol in ("SSL", "SASL_SSL")


@dataclass(frozen=True, slots=True)
class KafkaAccess:
    """How the engine's Kafka clients reach ``KAFKA_BOOTSTRAP``: in the clear (the default),
    over TLS (``SSL``), with a SASL login (``SASL_PLAINTEXT``) or both (``SASL_SSL``, what
    managed services ask). TLS checks the brokers against the system's CAs, or only against
    ``KAFKA_SSL_CAFILE``."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: Secret = Secret("")
    ca_file: str | None = None

    @property
    def tls(self) -> bool:
        return _uses_tls(self.protocol)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaAccess:
        protocol = (env.get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").strip().upper()
        if protocol not in KAFKA_PROTOCOLS:
            raise ConfigError(f"KAFKA_SECURITY_PROTOCOL must be one of "
                              f"{', '.join(KAFKA_PROTOCOLS)}, got {protocol!r}")  # fmt: skip
        sasl = {name: (env.get(name) or "").strip() for name in _SASL}
        mechanism, username, password = sasl.values()
        if protocol.startswith("SASL_"):
            if mechanism.upper() not in SASL_MECHANISMS:
                raise ConfigError(
                    f"KAFKA_SASL_MECHANISM must be {_ONE_OF_SASL} with "
                    f"KAFKA_SECURITY_PROTOCOL={protocol}, got {mechanism!r}"
                )
            if missing := [name for name, value in sasl.items() if not value]:
                raise ConfigError(f"{missing[0]} is not set; KAFKA_SECURITY_PROTOCOL={protocol} "
                                  "logs in with it")  # fmt: skip
        elif given := [name for name, value in sasl.items() if value]:
            raise ConfigError(f"{given[0]} is set but KAFKA_SECURITY_PROTOCOL={protocol} "
                              "sends no login: use SASL_SSL or SASL_PLAINTEXT")  # fmt: skip
        ca_file = (env.get("KAFKA_SSL_CAFILE") or "").strip() or None
        if ca_file is not None and not _uses_tls(protocol):
            raise ConfigError(f"KAFKA_SSL_CAFILE is set but KAFKA_SECURITY_PROTOCOL={protocol} "
                              "does not use TLS: use SSL or SASL_SSL")  # fmt: skip
        if ca_file is not None and not os.path.isfile(ca_file):
            raise ConfigError(f"KAFKA_SSL_CAFILE: no such file {ca_file!r}")
        return cls(protocol, mechanism.upper() or None, username or None, Secret(password), ca_file)


@dataclass(frozen=True)
class Settings:
    """Everything the engine reads from its environment. Build it with :meth:`from_env`."""

    home: Path
    redis_url: str | None = None
    # FLASHSALE_REDIS_CLUSTER=1: REDIS_URL names one node of a Redis Cluster (any node).
    redis_cluster: bool = False
    database_url: str | None = None
    # FLASHSALE_PG_POOL_MODE=transaction: DATABASE_URL leads to a transaction pooler
    # (PgBouncer's pool_mode=transaction, a managed service's pooled endpoint).
    pg_pool_mode: str = "session"
    # How long a call waits for Redis, and a statement for Postgres, before the server counts as
    # down (a hung process, a partition: the connection stays open and nothing comes back).
    redis_timeout_s: float = 5.0
    pg_timeout_s: float = 10.0
    kafka_bootstrap: str | None = None
    kafka: KafkaAccess = KafkaAccess()
    admin_token: Secret = Secret("")
    secret: Secret = Secret("")
    buyer_token_secret: Secret = Secret("")
    log_level: str = "INFO"
    log_format: str = "auto"  # json | text | auto: JSON unless stderr is a terminal
    # Gateway protection (README, "Running the engine"): GCRA limits per client IP and per buyer
    # on the routes that write, a per-process cap on requests in flight, a deadline for bodies.
    rate_per_ip: Rate = Rate(100.0, 200)
    rate_per_buyer: Rate = Rate(5.0, 10)
    max_in_flight: int = 2000
    # Within it, new arrivals (joins) and waiting buyers' polls have ceilings of their own, so
    # admitted buyers' reservations always find room (gateway.middleware).
    max_joins_in_flight: int = 200
    max_polls_in_flight: int = 800
    body_timeout_s: float = 5.0
    # X-Forwarded-For: FLASHSALE_TRUST_FORWARDED=1 trusts the direct peer (one proxy in front);
    # FLASHSALE_TRUSTED_PROXIES lists the proxies' networks (CIDRs) for several hops.
    trust_forwarded: bool = False
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    # Browser origins (storefronts) allowed to call the buyer API; "*" for any, without
    # credentials. Empty: no CORS at all.
    cors_origins: tuple[str, ...] = ()
    # FLASHSALE_RESERVATIONS_URL: the public origin of the gateway processes that serve only
    # admitted buyers' reservations (`flashsale gateway --reservations-only`); an admitted
    # status answer names it in `reserve_url`. None: reserve where you poll.
    reservations_url: str | None = None
    # Storefront JWTs: public keys (a JWKS file or URL) for ES256/RS256, and the audience a
    # token must name (README, "Buyer tokens").
    buyer_jwks: str | None = None
    buyer_jwt_audience: str | None = None
    topics: Topics = field(default_factory=Topics)
    consumer_group: str = "flashsale-workers"
    # How long the broker waits for a silent worker before its partitions go to another one.
    worker_session_timeout_s: float = 10.0
    # How long after its end the reconciler archives a sale (reconciler/archive.py); None: never.
    archive_after_s: float | None = ARCHIVE_AFTER_S
    # The payment provider: FLASHSALE_PSP_URL, or the simulator that `flashsale up` starts.
    psp_url: str | None = None
    # Order webhooks to the storefront (workers/webhooks.py): off without a URL.
    webhook_url: str | None = None
    webhook_secret: Secret = Secret("")
    webhook_group: str = "flashsale-webhooks"
    # Which values came from the state folder (dev.env, engine.env) rather than the environment.
    from_dev_env: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = trimmed(os.environ if environ is None else environ)
        home = home_dir(env)
        dev = read_env_file(home / DEV_ENV_FILE)
        engine = read_env_file(home / ENGINE_ENV_FILE)

        used_dev: set[str] = set()
        if not env.get("FLASHSALE_PSP_URL") and engine.get("FLASHSALE_PSP_URL"):
            used_dev.add("FLASHSALE_PSP_URL")

        def pick(name: str) -> str | None:
            value = env.get(name)
            if value:
                return value
            if dev.get(name):
                used_dev.add(name)
                return dev[name]
            return None

        def secret_of(name: str, *, keys: bool = False) -> Secret:
            return Secret(secret_setting(pick(name), name, keys=keys))

        def rate(name: str, default: str) -> Rate:
            return Rate.parse(env.get(name) or default, name)

        hook = http_url(env.get("FLASHSALE_WEBHOOK_URL"), "FLASHSALE_WEBHOOK_URL")
        groups = consumer_groups(env, webhooks=bool(hook))
        settings = cls(
            home=home,
            redis_url=pick("REDIS_URL"),
            redis_cluster=flag(pick("FLASHSALE_REDIS_CLUSTER"), "FLASHSALE_REDIS_CLUSTER"),
            database_url=pick("DATABASE_URL"),
            pg_pool_mode=choice(
                env, "FLASHSALE_PG_POOL_MODE", ("session", "transaction"), "session"
            ),
            redis_timeout_s=seconds(env, "FLASHSALE_REDIS_TIMEOUT", 5.0, minimum=0.1),
            pg_timeout_s=seconds(env, "FLASHSALE_PG_TIMEOUT", 10.0, minimum=0.1),
            kafka_bootstrap=bootstrap(pick("KAFKA_BOOTSTRAP")),
            kafka=KafkaAccess.from_env(env),
            admin_token=secret_of("FLASHSALE_ADMIN_TOKEN", keys=True),
            secret=secret_of("FLASHSALE_SECRET", keys=True),
            buyer_token_secret=secret_of("FLASHSALE_BUYER_TOKEN_SECRET", keys=True),
            log_level=choice(env, "FLASHSALE_LOG_LEVEL", LOG_LEVELS, "info").upper(),
            log_format=choice(env, "FLASHSALE_LOG_FORMAT", ("auto", "json", "text"), "auto"),
            rate_per_ip=rate("FLASHSALE_RATE_PER_IP", "100,200"),
            rate_per_buyer=rate("FLASHSALE_RATE_PER_BUYER", "5,10"),
            **in_flight_ceilings(env),
            body_timeout_s=seconds(env, "FLASHSALE_BODY_TIMEOUT", 5.0, minimum=0.1),
            trust_forwarded=flag(env.get("FLASHSALE_TRUST_FORWARDED"), "FLASHSALE_TRUST_FORWARDED"),
            trusted_proxies=networks(
                env.get("FLASHSALE_TRUSTED_PROXIES") or "", "FLASHSALE_TRUSTED_PROXIES"
            ),
            cors_origins=origins(env.get("FLASHSALE_CORS_ORIGINS") or ""),
            reservations_url=origin(
                env.get("FLASHSALE_RESERVATIONS_URL") or "", "FLASHSALE_RESERVATIONS_URL"
            ),
            buyer_jwks=env.get("FLASHSALE_BUYER_JWKS") or None,
            buyer_jwt_audience=env.get("FLASHSALE_BUYER_JWT_AUDIENCE") or None,
            topics=Topics.from_env(env),
            consumer_group=groups[0],
            worker_session_timeout_s=seconds(
                env, "FLASHSALE_WORKER_SESSION_TIMEOUT", 10.0, minimum=1.0, maximum=30.0
            ),
            archive_after_s=_archive_after(env),
            psp_url=http_url(
                env.get("FLASHSALE_PSP_URL") or engine.get("FLASHSALE_PSP_URL"), "FLASHSALE_PSP_URL"
            ),
            webhook_url=hook,
            webhook_secret=Secret(webhook_secret(env.get("FLASHSALE_WEBHOOK_SECRET"), hook)),
            webhook_group=groups[1],
            from_dev_env=frozenset(used_dev),
        )
        admin_apart(settings.admin_token.each_key(), settings.buyer_token_secret.each_key())
        return settings

    # -- accessors that fail with an actionable message -----------------------------------

    def require_redis(self) -> str:
        return _require(self.redis_url, "REDIS_URL", self.home)

    def require_database(self) -> str:
        return _require(self.database_url, "DATABASE_URL", self.home)

    def require_kafka(self) -> str:
        return _require(self.kafka_bootstrap, "KAFKA_BOOTSTRAP", self.home)

    def secrets(self) -> list[str]:
        """Every secret value in force, for the log redaction filter."""
        values = [self.admin_token, self.secret, self.buyer_token_secret, self.kafka.password,
                  self.webhook_secret]  # fmt: skip
        found = [key for s in values if s for key in (s.reveal(), *s.each_key())]
        for url in (self.redis_url, self.database_url, self.webhook_url, self.psp_url):
            password = urlsplit(url).password if url else None
            if password:
                found.append(password)
            found += _query_values(url) if url else []
        return found

    def __repr__(self) -> str:
        return (
            f"Settings(home={str(self.home)!r}, redis_url={mask_url(self.redis_url)!r}, "
            f"redis_cluster={self.redis_cluster!r}, "
            f"database_url={mask_url(self.database_url)!r}, "
            f"kafka_bootstrap={self.kafka_bootstrap!r}, kafka={self.kafka!r}, "
            f"admin_token={self.admin_token!r}, secret={self.secret!r}, "
            f"buyer_token_secret={self.buyer_token_secret!r}, "
            f"log_level={self.log_level!r}, log_format={self.log_format!r})"
        )


def _require(value: str | None, name: str, home: Path) -> str:
    if not value:
        raise ConfigError(
            f"{name} is not set and no embedded stack is running in {home}: "
            "run `flashsale dev up` or export it"
        )
    return value


def _archive_after(env: Mapping[str, str]) -> float | None:
    """FLASHSALE_ARCHIVE_AFTER: seconds or a duration (default a day), or ``never``."""
    name = "FLASHSALE_ARCHIVE_AFTER"
    if (env.get(name) or "").strip().lower() == "never":
        return None
    try:
        return seconds(env, name, ARCHIVE_AFTER_S, minimum=0.0)
    except ConfigError as exc:
        raise ConfigError(f"{exc}: the time after a sale's end (7d), or never") from None
