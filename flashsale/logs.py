"""The engine's logs: one setup for every process.

* On stderr, JSON lines when stderr is not a terminal (``FLASHSALE_LOG_FORMAT=json|text``
  chooses), each with an ISO 8601 UTC timestamp, the level, the logger and the message.
* Fields bound to the work in progress (:func:`bound`: ``request_id`` in the gateway,
  ``reservation_id`` wherever a reservation is handled) and fields passed with ``extra=`` are
  added to every line: one reservation's lines in the gateway, the relay, the workers and the
  reconciler are found with one grep of its id.
* Every secret in force is redacted.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import orjson

from flashsale.settings import Settings

# The fields bound to the current request or task; copied onto each record logged in it.
CONTEXT: ContextVar[Mapping[str, str]] = ContextVar(
    "flashsale_log_context", default=MappingProxyType({})
)
# Attributes every LogRecord has: anything else on a record came from ``extra=`` or CONTEXT.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName",
}  # fmt: skip


@contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Every line logged inside (in this task and the tasks it starts) carries ``fields``;
    None values are left out."""
    token = CONTEXT.set({**CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        CONTEXT.reset(token)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The bound and ``extra=`` fields of a record."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def timestamp(created: float) -> str:
    """ISO 8601 in UTC to the millisecond: ``2026-12-02T10:21:15.123Z``."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class BindContext(logging.Filter):
    """Copies the bound fields onto each record (without overwriting ``extra=`` ones)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in CONTEXT.get().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


# Shorter secrets are not redacted: replacing every "p" of a message would garble it.
REDACTED_LENGTH = 4


class RedactSecrets(logging.Filter):
    """Replace any secret value that reaches a log record with ``********``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= REDACTED_LENGTH]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            redacted = message
            for secret in self._secrets:
                redacted = redacted.replace(secret, "********")
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": timestamp(record.created), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(), **fields_of(record),
        }  # fmt: skip
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    """``2026-12-02T10:21:15.123Z INFO flashsale.relay message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        extra = "".join(f" {k}={v}" for k, v in fields_of(record).items())
        line = f"{timestamp(record.created)} {record.levelname} {record.name} " \
               f"{record.getMessage()}{extra}"  # fmt: skip
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _EngineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so reconfiguring replaces only it."""


def configure_logging(settings: Settings) -> None:
    """Logs on stderr in the configured format, with bound fields and secrets redacted.
    Idempotent; leaves other handlers alone."""
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _EngineHandler)]:
        root.removeHandler(existing)
    handler = _EngineHandler()
    as_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handler.addFilter(BindContext())
    handler.addFilter(RedactSecrets(settings.secrets()))
    root.addHandler(handler)
    root.setLevel(settings.log_level)


def one_shot() -> None:
    """For a command that runs once and reports what failed in a line of its own: the Kafka
    client's own error lines about the same failure (a refused connection) came first."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
