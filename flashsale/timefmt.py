"""How the engine writes times: ISO 8601 in UTC with a ``Z``, and Unix milliseconds (what the
Redis scripts compare against ``TIME``); and the one time it reads from another server's HTTP
answer, ``Retry-After``."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def unix_ms(moment: datetime) -> str:
    """Unix time in milliseconds, as text (a Redis hash value)."""
    return str(int(moment.timestamp() * 1000))


def iso(moment: datetime | None, timespec: str = "milliseconds") -> str | None:
    """ISO 8601 in UTC, to the millisecond (``2026-12-01T12:00:00.000Z``: ECMAScript's date
    format, which every browser's ``Date`` reads; Postgres's microseconds are not); None stays
    None. ``timespec`` as :meth:`datetime.isoformat`'s (``"seconds"`` for a report a person
    reads)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def iso_ms(ms: int) -> str:
    """ISO 8601 (UTC, milliseconds) of a Unix time in milliseconds."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (RFC 9110: a number of seconds, or an
    HTTP date, already gone by: 0), or None when there is none that can be read."""
    text = (value or "").strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" in the date: UTC, as HTTP dates are
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
