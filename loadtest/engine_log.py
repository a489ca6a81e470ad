"""Why a demo stopped making progress, from its engine's log: the warnings and errors the
services logged (JSON lines, :mod:`flashsale.logs`), read as the log grows and each kind said
once, shown when units stay held and none is sold (:class:`Stall`). A demo whose workers wait
for a grant showed the same progress line for minutes, its reason in a file it did not name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

SALE_ID = re.compile(r"\bsale-[0-9a-z-]+")
SAID_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})


@dataclass(slots=True)
class EngineLog:
    path: Path
    _offset: int = 0
    _said: set[str] = field(default_factory=set)

    def warnings(self, sale_id: str) -> list[str]:
        """The warnings and errors logged since the last call that concern ``sale_id`` or no
        sale (the stack may hold others, which the reconciler also tends), each kind (its
        figures aside) once."""
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                chunk = log.read()
        except FileNotFoundError:
            return []
        whole = chunk.rfind(b"\n") + 1  # a line being written is read the next time
        self._offset += whole
        found = []
        for line in chunk[:whole].splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a child's own output, not a record
            if not isinstance(record, dict) or record.get("level") not in SAID_LEVELS:
                continue
            message = str(record.get("message", ""))
            if any(named != sale_id for named in SALE_ID.findall(message)):
                continue
            kind = re.sub(r"\d+", "N", message)
            if kind not in self._said:
                self._said.add(kind)
                found.append(message)
        return found


@dataclass(slots=True)
class Stall:
    """Whether the units sold (or orders ended) stopped moving while some are held (or still
    open) for ``after_s`` seconds: the payment saga is not getting on."""

    after_s: float = 10.0
    _done: int = -1
    _since: float = 0.0

    def stuck(self, held: int, done: int, now: float) -> bool:
        if done != self._done or held == 0:
            self._done, self._since = done, now
            return False
        return now - self._since >= self.after_s


class Stalled:
    """Tells, once a run stops getting on (:class:`Stall`), what its engine warned of: the log
    named once, then each new kind of warning."""

    def __init__(self, log: EngineLog, sale_id: str, progress: Callable[[str], None],
                 what: tuple[str, str], after_s: float = 10.0) -> None:  # fmt: skip
        """``what``: what did not happen, and what the waiting ones are ("unit sold", "held")."""
        self.log, self.sale_id, self.progress, self.what = log, sale_id, progress, what
        self.stall = Stall(after_s)
        self._named = False

    def note(self, held: int, done: int, now: float) -> None:
        """``held``: units held (or orders open); ``done``: units sold (or orders ended)."""
        if not self.stall.stuck(held, done, now):
            return
        if not self._named:
            self._named = True
            self.progress(f"   no {self.what[0]} for {self.stall.after_s:g}s while {held} "
                          f"are {self.what[1]} (the engine's log: {self.log.path})")  # fmt: skip
        for message in self.log.warnings(self.sale_id):
            self.progress(f"   the engine: {message}")
