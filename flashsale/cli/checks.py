"""Checks that run before a command does anything: flag values (each refusal names its flag:
exit 2, nothing written) and the configuration a service needs before it forks."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from flashsale.errors import InvalidInput
from flashsale.keys import ID_PATTERN
from flashsale.settings import Settings
from flashsale.tokens import Signers


def positive(kind: type[int] | type[float], field: str, value: str) -> Any:
    try:
        parsed = kind(value)
    except ValueError:
        raise InvalidInput(field, f"must be a positive number, got {value!r}") from None
    if parsed <= 0:
        raise InvalidInput(field, f"must be a positive number, got {value!r}")
    return parsed


def non_negative(field: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidInput(field, f"must be a number, got {value!r}") from None
    if not number >= 0:
        raise InvalidInput(field, f"must be >= 0, got {value!r}")
    return number


def fraction(field: str, value: str) -> float:
    number = non_negative(field, value)
    if number > 1:
        raise InvalidInput(field, f"must be within 0..1, got {value!r}")
    return number


def port_number(field: str, value: str) -> int:
    port = positive(int, field, value)
    if port > 65535:
        raise InvalidInput(field, f"must be a TCP port (1..65535), got {value!r}")
    return int(port)


def within(field: str, value: str, low: int, high: int) -> int:
    """A whole number within ``low..high``."""
    try:
        number = int(value)
    except ValueError:
        raise InvalidInput(field, f"must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise InvalidInput(field, f"must be within {low}..{high}, got {value!r}")
    return number


_DURATION = re.compile(r"([1-9][0-9]{0,6})([smhd])\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def duration(field: str, value: str) -> timedelta:
    """A positive duration written as a number and a unit: ``90s``, ``10m``, ``2h``, ``1d``."""
    found = _DURATION.match(value.strip())
    if not found:
        raise InvalidInput(field, f"must be a duration like 90s, 10m, 2h or 1d, got {value!r}")
    return timedelta(**{_UNITS[found[2]]: int(found[1])})


def sale_id(field: str, value: str) -> str:
    if not ID_PATTERN.match(value):
        raise InvalidInput(field, f"not a sale id: {value!r}")
    return value


def service_settings(settings: Settings) -> None:
    """Fail before forking anything when the stack or the secrets are not configured."""
    settings.require_redis()
    settings.require_database()
    Signers.from_settings(settings)
