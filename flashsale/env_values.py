"""The readers of single environment values for :class:`~flashsale.settings.Settings`:
numbers, choices, flags, networks, origins and URLs. A value one refuses is a ConfigError that
names the variable and says what it takes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from urllib.parse import urlsplit

from flashsale.errors import ConfigError


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
    if found is None or (port is not None and tcp_port(port) is None):
        raise ConfigError(f"{name}: {text!r} is not an origin: scheme://host[:port] "
                          f"(no path, a port of 1..65535){also}")  # fmt: skip
    scheme = found["scheme"].lower()
    shown = "" if port is None or port == DEFAULT_PORTS[scheme] else f":{int(port)}"
    return f"{scheme}://{found['host'].lower()}{shown}"


PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: "²" is isdigit() and not int()


def tcp_port(text: str) -> int | None:
    """The TCP port (1..65535) ``text`` writes, or None."""
    port = int(text) if PORT.fullmatch(text) else 0
    return port if 0 < port < 65536 else None


def flag(value: str | None, name: str) -> bool:
    """A yes/no setting: unset, ``0``, ``false`` or ``no`` is off; ``1``, ``true``, ``yes`` on."""
    word = (value or "").strip().lower()
    if word in ("", "0", "false", "no"):
        return False
    if word in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0 (got {value!r})")


def http_url(value: str | None, name: str) -> str | None:
    """An ``http(s)://host[:port][/path]`` URL, or None when empty (``FLASHSALE_PSP_URL``: a
    malformed one failed each payment instead of the start)."""
    if not value:
        return None
    if not is_http_url(value.strip()):
        raise ConfigError(f"{name}: {value!r} is not an http(s)://host[:port] URL")
    return value.strip()


def is_http_url(value: str) -> bool:
    """``http(s)://host[:port][/path]``, the port within 1..65535."""
    try:
        parts = urlsplit(value)  # ValueError: a bracket not closed ("http://[::1")
        port_ok = parts.port is None or parts.port > 0  # ValueError: not a number, > 65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok


SHORTEST_SECRET = 16


def secret_setting(value: str | None, name: str, *, keys: bool = False) -> str:
    """A secret setting, '' when unset. Each of its keys (comma-separated with ``keys``: the
    first signs, the others still verify during a rotation) is at least 16 characters, so it
    cannot be guessed like a password; the length of a refused one is named, never its text."""
    if not value:
        return ""
    for key in value.split(",") if keys else [value]:
        length = len(key.strip())
        if length < SHORTEST_SECRET and (length or not keys):  # ",," is no key
            each = " each (comma-separated keys)" if keys else ""
            raise ConfigError(f"{name} must be at least {SHORTEST_SECRET} characters{each}, "
                              f"got {length}")  # fmt: skip
    return value
