"""The readers of single environment values for :class:`~flashsale.settings.Settings`:
numbers, choices, flags, networks, origins and URLs. A value one refuses is a ConfigError that
names the variable and says what it takes. And the names the engine reads, to say which others
are set (a mistyped name)."""

from __future__ import annotations

import base64
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network
from urllib.parse import urlsplit

from flashsale.errors import ConfigError


def trimmed(env: Mapping[str, str]) -> dict[str, str]:
    """Each value without the spaces and line ends around it, which no setting can mean: a
    value read from a file keeps its last newline (a Kubernetes secret made ``--from-file``),
    and kept it named a database "flashsale\\n" or an audience no token carries. A blank
    value is then the empty string, so unset."""
    return {name: value.strip() for name, value in env.items()}


def networks(text: str, name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """Comma-separated CIDRs (a bare address is its own /32 or /128)."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            found.append(ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{name} must list networks like 10.0.0.0/8, got {part!r}") from None
    return tuple(found)


def number(env: Mapping[str, str], name: str, default: float, *, minimum: float,
           maximum: float = math.inf) -> float:  # fmt: skip
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not minimum <= value < math.inf:  # false for nan too
        raise ConfigError(f"{name} must be a finite number of at least {minimum:g}, got {raw!r}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {raw!r}")
    return value


def seconds(env: Mapping[str, str], name: str, default: float, *, minimum: float,
            maximum: float = math.inf) -> float:  # fmt: skip
    """A setting in seconds, written as a number or as a duration (``90s``, ``10m``, ``7d``)."""
    raw = env.get(name)
    if not raw:
        return default
    value = seconds_of(raw)
    if value is None:
        raise ConfigError(f"{name} must be {SECONDS_TAKEN}, got {raw!r}")
    if not minimum <= value < math.inf:  # false for nan too
        raise ConfigError(f"{name} must be a finite number of at least {minimum:g} seconds, "
                          f"got {raw!r}")  # fmt: skip
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g} seconds, got {raw!r}")
    return value


# One to four parts, largest unit first, each at most once: 90s, 10m, 2h, 1d, 1h30m, 2d12h.
DURATION = re.compile(r"(?:([0-9]{1,7})d)?(?:([0-9]{1,7})h)?(?:([0-9]{1,7})m)?(?:([0-9]{1,7})s)?\Z")
SECONDS_TAKEN = "seconds or a duration like 90s, 10m or 1h30m"


def duration_seconds(text: str) -> int | None:
    """The seconds of ``text`` written with units, largest first (``90s``, ``10m``, ``2h``,
    ``1d``, ``1h30m``), or None when it is not written so."""
    found = DURATION.match(text.strip())
    if not found or all(part is None for part in found.groups()):
        return None
    days, hours, minutes, secs = (int(part or 0) for part in found.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


def seconds_of(text: str) -> float | None:
    """``text`` as seconds: a number (``30``, ``0.5``, ``0.5s``) or a duration (``10m``,
    ``1h30m``); None when it is neither."""
    for number in (text.strip(), text.strip().removesuffix("s")):
        try:
            return float(number)
        except ValueError:
            pass
    found = duration_seconds(text)
    return None if found is None else float(found)


def in_flight_ceilings(env: Mapping[str, str]) -> dict[str, int]:
    """A gateway process's in-flight cap, and within it the joins' and the polls' ceilings
    (by default a tenth and two fifths of the cap), which must leave room under it for
    admitted buyers' reservations: that room is what they are for."""
    total = int(number(env, "FLASHSALE_MAX_IN_FLIGHT", 2000, minimum=1))
    joins = int(number(env, "FLASHSALE_MAX_JOINS_IN_FLIGHT", max(1, total // 10), minimum=1))
    polls = int(number(env, "FLASHSALE_MAX_POLLS_IN_FLIGHT", max(1, total * 2 // 5), minimum=1))
    given = env.get("FLASHSALE_MAX_JOINS_IN_FLIGHT") or env.get("FLASHSALE_MAX_POLLS_IN_FLIGHT")
    if given and joins + polls >= total:  # unset, they leave half of any cap but 1 or 2
        raise ConfigError(
            f"FLASHSALE_MAX_JOINS_IN_FLIGHT ({joins}) and FLASHSALE_MAX_POLLS_IN_FLIGHT ({polls}) "
            f"leave no room under FLASHSALE_MAX_IN_FLIGHT ({total}) for admitted buyers' "
            "reservations: lower them, or raise the cap"
        )
    return {"max_in_flight": total, "max_joins_in_flight": joins, "max_polls_in_flight": polls}


def choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = (env.get(name) or default).strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?\Z",
    re.IGNORECASE,
)
DEFAULT_PORTS = {"http": "80", "https": "443"}


def origins(value: str) -> tuple[str, ...]:
    """FLASHSALE_CORS_ORIGINS: comma-separated ``scheme://host[:port]`` origins, or ``*``."""
    listed = [o.strip() for o in value.split(",") if o.strip()]
    return tuple(each if each == "*" else str(origin(each, "FLASHSALE_CORS_ORIGINS",
                                                     also=", or * for any"))
                 for each in listed)  # fmt: skip


def origin(value: str, name: str, also: str = "") -> str | None:
    """One ``scheme://host[:port]`` origin (no path), or None when empty; written as a browser
    writes its ``Origin`` (scheme and host in lower case, no default port), which is what it
    is compared with."""
    text = value.strip().rstrip("/")
    if not text:
        return None
    found = ORIGIN.match(text)
    port = found and found["port"]
    if found is None or (port is not None and tcp_port(port) is None) or not is_host(found["host"]):
        raise ConfigError(f"{name}: {text!r} is not an origin: scheme://host[:port] "
                          f"(no path, a port of 1..65535){also}")  # fmt: skip
    scheme = found["scheme"].lower()
    shown = "" if port is None or port == DEFAULT_PORTS[scheme] else f":{int(port)}"
    return f"{scheme}://{found['host'].lower()}{shown}"


def is_host(host: str) -> bool:
    """False for a host of digits and dots that is no whole IPv4 address (``999.1.1.1``,
    ``127.1``): browsers and aiohttp refuse those, where the name of a host is looked up."""
    if host.strip("0123456789."):
        return True
    try:
        IPv4Address(host)
    except ValueError:
        return False
    return True


PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: "²" is isdigit() and not int()


def tcp_port(text: str) -> int | None:
    """The TCP port (1..65535) ``text`` writes, or None."""
    port = int(text) if PORT.fullmatch(text) else 0
    return port if 0 < port < 65536 else None


def bootstrap(servers: str | None) -> str | None:
    """``KAFKA_BOOTSTRAP`` checked (None: unset): comma-separated ``host[:port]``. Checked when
    the settings are read, as every other setting: a port aiokafka could not read failed the
    first client with a ValueError and its traceback, and found later than the start, it was
    taken for a broker that is down (a gateway served, its readiness saying Kafka was down)."""
    for server in servers.split(",") if servers else ():
        host, colon, port = server.strip().rpartition(":")
        if not colon:
            host, port = port, "9092"  # aiokafka's default
        if not host.strip("[]") or "/" in host or tcp_port(port) is None:  # no scheme
            raise ConfigError(f"KAFKA_BOOTSTRAP: {server.strip()!r} is not host:port "
                              "(several are separated by commas)")  # fmt: skip
    return servers


def flag(value: str | None, name: str) -> bool:
    """A yes/no setting: unset, ``0``, ``false`` or ``no`` is off; ``1``, ``true``, ``yes`` on."""
    word = (value or "").strip().lower()
    if word in ("", "0", "false", "no"):
        return False
    if word in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0 (or true/false, yes/no), got {value!r}")


def http_url(value: str | None, name: str) -> str | None:
    """An ``http(s)://host[:port][/path]`` URL, or None when empty (``FLASHSALE_PSP_URL``: a
    malformed one failed each payment instead of the start)."""
    if not value:
        return None
    if not is_http_url(value.strip()):
        raise ConfigError(f"{name}: {value!r} is not an http(s)://host[:port] URL")
    return value.strip()


def is_http_url(value: str) -> bool:
    """``http(s)://host[:port][/path]``, the port within 1..65535, a host of digits and dots
    a whole IPv4 address (aiohttp refuses ``127.1`` or ``999.1.1.1`` when it connects)."""
    try:
        parts = urlsplit(value)  # ValueError: a bracket not closed ("http://[::1")
        port_ok = parts.port is None or parts.port > 0  # ValueError: not a number, > 65535
        host = parts.hostname or ""
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and port_ok and is_host(host)


SHORTEST_SECRET = 16


def secret_setting(value: str | None, name: str, *, keys: bool = False) -> str:
    """A secret setting, '' when unset. Each of its keys (comma-separated with ``keys``: the
    first signs, the others still verify during a rotation) is at least 16 characters, so it
    cannot be guessed like a password; the length of a refused one is named, never its text."""
    if not value:
        return ""
    given = value.split(",") if keys else [value]
    blank_allowed = keys and any(key.strip() for key in given)  # ",," is no key, but one is
    for key in given:
        length = len(key.strip())
        if length < SHORTEST_SECRET and (length or not blank_allowed):
            each = " each (comma-separated keys)" if keys else ""
            raise ConfigError(f"{name} must be at least {SHORTEST_SECRET} characters{each}, "
                              f"got {length}")  # fmt: skip
    return value


WEBHOOK_SECRET_BYTES = (24, 64)  # Standard Webhooks' range for a signing key


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th ... 11th, 12th, 13th ... 21st."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def webhook_secret(value: str | None, url: str | None) -> str:
    """``FLASHSALE_WEBHOOK_SECRET``: ``whsec_`` and the base64 of 24 to 64 random bytes, as
    Standard Webhooks libraries take it; required with ``FLASHSALE_WEBHOOK_URL``. During a
    rotation ``new,old``: each webhook is signed by both. Its text is never named."""
    name, make = "FLASHSALE_WEBHOOK_SECRET", "`flashsale token webhook-secret` makes one"
    keys = [key.strip() for key in (value or "").split(",") if key.strip()]
    if not keys:
        if url:
            raise ConfigError(f"{name} is not set: FLASHSALE_WEBHOOK_URL needs it to sign the "
                              f"webhooks ({make})")  # fmt: skip
        return ""
    least, most = WEBHOOK_SECRET_BYTES
    for n, key in enumerate(keys, 1):
        try:
            raw = base64.b64decode(key.removeprefix("whsec_"), validate=True)
        except ValueError:
            raw = b""
        if not key.startswith("whsec_") or not least <= len(raw) <= most:
            which = f"{name}: its {_ordinal(n)} key" if len(keys) > 1 else name
            raise ConfigError(f"{which} must be whsec_ and the base64 of {least} to {most} "
                              f"random bytes ({make})")  # fmt: skip
    return ",".join(keys)


def admin_apart(admin: Iterable[str], buyer: Iterable[str]) -> None:
    """No key of the admin token is one of the buyer-token secret's, which the storefront
    holds to sign buyer tokens: a shop with it would hold every admin operation too."""
    if set(admin) & set(buyer):
        raise ConfigError("FLASHSALE_ADMIN_TOKEN must differ from FLASHSALE_BUYER_TOKEN_SECRET: "
                          "the storefront signs buyer tokens with that one, and would hold the "
                          "admin token")  # fmt: skip


# Every FLASHSALE_ variable some part of the engine reads (the servers' own are REDIS_URL,
# DATABASE_URL and KAFKA_*): any other one set is said at start, with the likeliest meant.
VARIABLES = frozenset({
    "FLASHSALE_ADMIN_TOKEN", "FLASHSALE_ARCHIVE_AFTER", "FLASHSALE_BODY_TIMEOUT",
    "FLASHSALE_BUYER_JWKS", "FLASHSALE_BUYER_JWT_AUDIENCE", "FLASHSALE_BUYER_TOKEN_SECRET",
    "FLASHSALE_CONSUMER_GROUP", "FLASHSALE_CORS_ORIGINS", "FLASHSALE_HOME",
    "FLASHSALE_LOG_FORMAT", "FLASHSALE_LOG_LEVEL", "FLASHSALE_MAX_IN_FLIGHT",
    "FLASHSALE_MAX_JOINS_IN_FLIGHT", "FLASHSALE_MAX_POLLS_IN_FLIGHT", "FLASHSALE_PG_POOL_MODE",
    "FLASHSALE_PG_TIMEOUT", "FLASHSALE_PSP_URL", "FLASHSALE_RATE_PER_BUYER",
    "FLASHSALE_RATE_PER_IP", "FLASHSALE_REDIS_CLUSTER", "FLASHSALE_REDIS_TIMEOUT",
    "FLASHSALE_RESERVATIONS_URL", "FLASHSALE_SECRET", "FLASHSALE_TOPIC_DEAD_LETTER",
    "FLASHSALE_TOPIC_ORDER_EVENTS", "FLASHSALE_TOPIC_PREFIX", "FLASHSALE_TOPIC_RESERVATIONS",
    "FLASHSALE_TRUSTED_PROXIES", "FLASHSALE_TRUST_FORWARDED", "FLASHSALE_WORKER_SESSION_TIMEOUT",
    "FLASHSALE_WEBHOOK_GROUP", "FLASHSALE_WEBHOOK_SECRET", "FLASHSALE_WEBHOOK_URL",
    # set by `flashsale up` and the dev stack for the processes they start
    "FLASHSALE_HEARTBEAT", "FLASHSALE_PARENT_PID", "FLASHSALE_SPAWN_LOG",
    # the spike test's options (loadtest/locustfile.py)
    "FLASHSALE_SPIKE_BUCKETS", "FLASHSALE_SPIKE_BUYERS", "FLASHSALE_SPIKE_DRAIN",
    "FLASHSALE_SPIKE_HOLD", "FLASHSALE_SPIKE_RAMP", "FLASHSALE_SPIKE_SALE",
    "FLASHSALE_SPIKE_STOCK",
})  # fmt: skip
OTHERS = "FLASHSALE_TEST_"  # the test suite's own


def unknown_settings(env: Mapping[str, str]) -> list[str]:
    """A line for each ``FLASHSALE_`` variable set that nothing reads (a mistyped name would
    otherwise leave its default in force without a word), or that does nothing alone."""
    lines = []
    for name in sorted(env):
        if name.startswith("FLASHSALE_") and name not in VARIABLES and not name.startswith(OTHERS):
            meant = difflib.get_close_matches(name, VARIABLES, n=1, cutoff=0.8)
            lines.append(f"{name} is set but is not a setting of this engine"
                         + (f" ({meant[0]}?)" if meant else "") + ": ignored")  # fmt: skip
    # Settings of the order webhooks that do nothing without their URL.
    if not env.get("FLASHSALE_WEBHOOK_URL"):
        lines += [f"{name} is set but FLASHSALE_WEBHOOK_URL is not: no order webhooks are sent"
                  for name in ("FLASHSALE_WEBHOOK_SECRET", "FLASHSALE_WEBHOOK_GROUP")
                  if env.get(name)]  # fmt: skip
    return lines
