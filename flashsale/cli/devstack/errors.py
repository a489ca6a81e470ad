"""The dev stack's own failure: a dev-tooling error, outside the engine's domain tree."""

from __future__ import annotations

from pathlib import Path

from flashsale.errors import FlashsaleError


class StackError(FlashsaleError):
    """The embedded dev stack failed to start or stop (the message carries the log tail)."""

    code = "stack_error"

    @classmethod
    def no_env(cls, home: Path, *, stopped: bool) -> StackError:
        """No environment to give: the stack in ``home`` is ``stopped``, or there is none."""
        if stopped:
            return cls(f"the embedded stack in {home} is stopped: start it with `flashsale dev up`")
        return cls(f"no embedded stack in {home}: run `flashsale dev up` first")
