"""The engine's logs: on stderr, stamped, with every secret in force redacted."""

from __future__ import annotations

import logging

from flashsale.settings import Settings


class RedactSecrets(logging.Filter):
    """Replace any secret value that reaches a log record with ``********``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            redacted = message
            for secret in self._secrets:
                redacted = redacted.replace(secret, "********")
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class _EngineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so reconfiguring replaces only it."""


def configure_logging(settings: Settings) -> None:
    """Logs on stderr with secrets redacted. Idempotent; leaves other handlers alone."""
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _EngineHandler)]:
        root.removeHandler(existing)
    handler = _EngineHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%H:%M:%S")
    )
    handler.addFilter(RedactSecrets(settings.secrets()))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
