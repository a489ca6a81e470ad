"""How the engine writes times: ISO 8601 in UTC with a ``Z``, and Unix milliseconds (what the
Redis scripts compare against ``TIME``)."""

from __future__ import annotations

from datetime import UTC, datetime


def unix_ms(moment: datetime) -> str:
    """Unix time in milliseconds, as text (a Redis hash value)."""
    return str(int(moment.timestamp() * 1000))


def iso(moment: datetime | None, timespec: str = "auto") -> str | None:
    """ISO 8601 in UTC (``2026-12-01T12:00:00Z``); None stays None. ``timespec`` as
    :meth:`datetime.isoformat`'s (``"seconds"`` for a report a person reads)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def iso_ms(ms: int) -> str:
    """ISO 8601 (UTC, milliseconds) of a Unix time in milliseconds."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
