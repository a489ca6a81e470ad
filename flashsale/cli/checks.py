"""Checks that run before a command does anything: flag values (each refusal names its flag:
exit 2, nothing written) and the configuration a service needs before it forks."""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from flashsale.env_values import SECONDS_TAKEN, duration_seconds, is_http_url, seconds_of, tcp_port
from flashsale.errors import InvalidInput, shown
from flashsale.keys import ID_PATTERN
from flashsale.settings import Settings
from flashsale.tokens import Signers

# The largest number a flag takes: float() also reads "inf", "nan" and 1e300, which no
# duration, rate or count here can be (a billion seconds is 31 years).
LARGEST = 1e9
# The shortest time between two reconciler passes (back to back, as a chaos fault races
# them) or two refreshes of a watched status: each reads Redis and Postgres.
SHORTEST_INTERVAL_S = 0.05


def positive(kind: type[int] | type[float], field: str, value: str) -> Any:
    what = "a positive whole number" if kind is int else "a positive number"  # a count: not 1.5
    try:
        parsed = kind(value)
    except ValueError:
        raise InvalidInput(field, f"must be {what}, got {shown(value)}") from None
    if not 0 < parsed <= LARGEST:  # false for nan too
        raise InvalidInput(field, f"must be {what} up to {LARGEST:,.0f}, got {shown(value)}")
    return parsed


def seconds(
    field: str,
    value: str,
    shortest: float = 0.0,
    longest: float = LARGEST,
    *,
    zero: bool = False,
    whole: bool = False,
) -> float:
    """A length of time typed as seconds (``30``, ``0.5``) or with units (``90s``, ``10m``,
    ``1h30m``, ``0.5s``), as ``--starts-in`` takes it: more than 0 (with ``zero``, 0 too), at
    least ``shortest`` (more often, a loop would only keep its servers busy), at most
    ``longest`` and, with ``whole``, a whole number of seconds."""
    number = _seconds(field, value)
    if whole and not number.is_integer() and math.isfinite(number):
        raise InvalidInput(field, f"must be a whole number of seconds, got {shown(value)}")
    if not (number > 0 or (zero and number == 0)) or not shortest <= number <= longest:  # nan
        low = f"from {shortest:g} to" if shortest or zero else "more than 0 and at most"
        raise InvalidInput(field, f"must be {low} {longest:,.0f} seconds, got {shown(value)}")
    return number


def _seconds(field: str, value: str) -> float:
    number = seconds_of(value)
    if number is None:
        raise InvalidInput(field, f"must be {SECONDS_TAKEN}, got {shown(value)}")
    return number


def _number(field: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidInput(field, f"must be a number, got {shown(value)}") from None


def non_negative(field: str, value: str) -> float:
    number = _number(field, value)
    if not 0 <= number <= LARGEST:  # false for nan too
        raise InvalidInput(field, f"must be from 0 to {LARGEST:,.0f}, got {shown(value)}")
    return number


def fraction(field: str, value: str) -> float:
    """A share, within 0..1."""
    number = _number(field, value)
    if not 0 <= number <= 1:  # false for nan too
        raise InvalidInput(field, f"must be within 0..1, got {shown(value)}")
    return number


def port_number(field: str, value: str) -> int:
    port = tcp_port(value)
    if port is None:
        raise InvalidInput(field, f"must be a TCP port (1..65535), got {shown(value)}")
    return port


def http_url(field: str, value: str) -> str:
    """An ``http(s)://host[:port][/path]`` URL that a client can be pointed at."""
    if not is_http_url(value):
        raise InvalidInput(field, f"must be an http(s)://host[:port] URL, got {shown(value)}")
    return value


def results_doc(given: str | None, default: str | None, instead: str) -> Path | None:
    """The document whose results block a run rewrites: ``--doc``, else ``default`` (None:
    the run rewrites none), checked before the run. ``instead``: how to run without one."""
    if given:
        doc = Path(given)
        if not doc.is_file():
            raise InvalidInput("doc", f"no such file: {doc}")
        return doc
    if default is not None and not Path(default).is_file():
        raise InvalidInput("doc", f"no {default} here, whose results block a full run rewrites: "
                                  "run it in the project's folder, name the document with "
                                  f"--doc, or run {instead}")  # fmt: skip
    return None if default is None else Path(default)


def output_file(field: str, value: str) -> Path:
    """A path a command will write its report to when it ends: checked before it starts, so a
    typo does not cost a whole run."""
    path = Path(value)
    if not path.parent.is_dir():
        raise InvalidInput(field, f"no folder {path.parent} to write it in")
    if path.is_dir():
        raise InvalidInput(field, f"{path} is a folder")
    if not os.access(path.parent, os.W_OK):
        raise InvalidInput(field, f"cannot write in {path.parent}")
    return path


def output_folder(field: str, value: str) -> Path:
    """A folder a command writes its reports in, made now if it is not there."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InvalidInput(field, f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker else exc.strerror
        raise InvalidInput(field, f"cannot make the folder {path}: {why}") from None
    if not os.access(path, os.W_OK):
        raise InvalidInput(field, f"cannot write in {path}")
    return path


def free_to_listen(host: str, ports: dict[str, int]) -> None:
    """Each of ``ports`` (by flag) distinct and free on ``host``, before anything is started:
    a gateway binds with SO_REUSEPORT, so a port another engine's gateway holds would be
    shared with it silently, and a service whose port is taken exits and is restarted
    forever. Racy by nature (a port may be taken just after), so the services say it too."""
    seen: dict[int, str] = {}
    for field, port in ports.items():
        if port in seen:
            raise InvalidInput(field, f"{port} is also the {seen[port]}")
        seen[port] = field
    for field, port in ports.items():
        try:
            family, kind, proto, _name, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except socket.gaierror:
            raise InvalidInput("host", f"cannot listen on {host}: no such address") from None
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise InvalidInput(field, f"{host}:{port} is in use by another process"
                                       ) from None  # fmt: skip
                why = os.strerror(exc.errno or 0).lower()
                raise InvalidInput(field, f"cannot listen on {host}:{port}: {why}") from None


def free_ops_port(args: argparse.Namespace) -> int | None:
    """A service's ``--ops-port``, if given: a port, and free to listen on ``--host``."""
    if not args.ops_port:
        return None
    port = port_number("ops-port", args.ops_port)
    free_to_listen(args.host, {"ops-port": port})
    return port


MAX_PROCESSES = 64  # processes of one service a flag may ask for (a typo forked hundreds)


def within(field: str, value: str, low: int, high: int) -> int:
    """A whole number within ``low..high``."""
    try:
        number = int(value)
    except ValueError:
        raise InvalidInput(field, f"must be a whole number, got {shown(value)}") from None
    if not low <= number <= high:
        raise InvalidInput(field, f"must be within {low}..{high}, got {shown(value)}")
    return number


LONGEST = timedelta(days=3650)  # ten years


def duration(field: str, value: str, *, zero: bool = False) -> timedelta:
    """A positive duration written as numbers with units, largest first: ``90s``, ``10m``,
    ``2h``, ``1d``, ``1h30m``; with ``zero``, also one of nothing (``0s``)."""
    length = duration_seconds(value)
    if length is None:
        raise InvalidInput(field, f"must be a duration like 90s, 10m, 2h, 1d or 1h30m, "
                           f"got {shown(value)}")  # fmt: skip
    if not length:  # "0s", "0h0m"
        if zero:
            return timedelta(0)
        raise InvalidInput(field, f"must be longer than 0s, got {shown(value)}")
    if length > LONGEST.total_seconds():
        raise InvalidInput(field, f"must be at most {LONGEST.days}d, got {shown(value)}")
    return timedelta(seconds=length)


def in_seconds(field: str, value: str) -> str:
    """A number of seconds as typed; one written with units (``90s``, ``10m``, ``1h30m``), as
    ``--starts-in`` takes it, as its seconds. Anything else is left for the field's own check
    to judge."""
    text = str(value).strip()
    if not text or text[-1].isdigit() or text[-1] == "." or not text[0].isdigit():
        return value
    return str(int(duration(field, text, zero=True).total_seconds()))  # 0: the field judges


def sale_id(field: str, value: str) -> str:
    if not ID_PATTERN.match(value):
        raise InvalidInput(field, f"not a sale id: {shown(value)}")
    return value


def service_settings(settings: Settings) -> None:
    """Fail before forking anything when the stack or the secrets are not configured."""
    settings.require_redis()
    settings.require_database()
    Signers.from_settings(settings)


# `up`'s other ports by flag, in the order of their defaults: PORT+1, PORT+2, ...
AFTER_PORT = ("allocator-port", "workers-port", "psp-port", "reconciler-port", "reservation-port")


def ports_after(port: int, args: argparse.Namespace, unused: dict[str, str]) -> dict[str, int]:
    """Each port of AFTER_PORT, given or PORT+n; one for a process not started (``unused``:
    why not) is refused. A --port too high for the defaults of the others is refused naming
    --port (not a flag nobody typed, with PORT+n)."""
    given = {flag: getattr(args, flag.replace("-", "_")) for flag in AFTER_PORT}
    if given_unused := [flag for flag in unused if given[flag]]:
        raise InvalidInput(given_unused[0], unused[given_unused[0]])
    needed = set(AFTER_PORT) - set(unused)
    ports = {flag: port_number(flag, value) for flag, value in given.items() if value}
    short = [(offset, flag) for offset, flag in enumerate(AFTER_PORT, 1)
             if flag in needed and not given[flag] and port + offset > 65535]  # fmt: skip
    if short:
        raise InvalidInput("port", (
            f"{port} leaves no room for the ports after it (PORT+1 to PORT+{len(AFTER_PORT)}): "
            f"give a port up to {65535 - short[-1][0]}, or each of "
            + ", ".join(f"--{flag}" for _, flag in short)))  # fmt: skip
    return {flag: ports.get(flag, port + offset) for offset, flag in enumerate(AFTER_PORT, 1)}
