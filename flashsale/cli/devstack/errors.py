"""The dev stack's own failure: a dev-tooling error, outside the engine's domain tree."""

from __future__ import annotations

from flashsale.errors import FlashsaleError


class StackError(FlashsaleError):
    """The embedded dev stack failed to start or stop (the message carries the log tail)."""

    code = "stack_error"
