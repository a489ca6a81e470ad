"""A small process supervisor for ``flashsale up`` and ``flashsale gateway --workers N``.

Each child is a ``flashsale`` command in its own process group. A child that exits while the
supervisor is running is restarted after a backoff that doubles on every quick crash (from
``BACKOFF_MIN_S`` to ``BACKOFF_MAX_S``) and resets once the child has stayed up for
``STABLE_AFTER_S``; every exit is logged with its code or signal. A child that hangs (its
event loop blocked, the process paused: it lives and serves nothing) is killed once its
heartbeat (:mod:`flashsale.event_loop`: a file touched each second from its loop) is
``hung_after_s`` old, and restarted as a crashed one. SIGTERM or Ctrl-C stops every
child with SIGTERM, waits ``GRACE_S`` for them to finish what they are doing, then kills what
is left. A supervisor that is killed outright takes its children with it: each is sent SIGTERM
by the kernel when it dies (:mod:`flashsale.parent`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from flashsale.event_loop import HEARTBEAT_ENV
from flashsale.parent import followed

log = logging.getLogger("flashsale.supervisor")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 15.0
STABLE_AFTER_S = 5.0
GRACE_S = 15.0
POLL_S = 0.2
HUNG_AFTER_S = 30  # a heartbeat this old is a hung child (0: never)
STARTING_S = 10.0  # the first beat comes after the imports: it is not awaited before this


@dataclass
class Child:
    name: str
    args: list[str]  # arguments of the ``flashsale`` command
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    heartbeat: Path | None = None
    beat: int | None = None  # the heartbeat file's last mtime seen, and when (monotonic)
    beat_seen: float = 0.0
    backoff: float = BACKOFF_MIN_S
    restart_at: float = 0.0
    restarts: int = 0

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "flashsale", *self.args]


def describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(
        self, children: list[Child], *, on_exit: Callable[[int], None] | None = None,
        hung_after_s: float = HUNG_AFTER_S,
    ) -> None:  # fmt: skip
        self.children = children
        self.on_exit = on_exit  # called with the pid of every child that exited
        self.hung_after_s = hung_after_s
        self.stopping = False

    def _start(self, child: Child) -> None:
        env = {**os.environ, **child.env, **followed()}
        if child.heartbeat is not None:
            child.heartbeat.unlink(missing_ok=True)
            env[HEARTBEAT_ENV] = str(child.heartbeat)
        child.process = subprocess.Popen(child.argv(), env=env, start_new_session=True)
        child.started, child.beat = time.monotonic(), None
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def _stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; returns 0 after a clean stop."""
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        beats = Path(tempfile.mkdtemp(prefix="flashsale-beats-")) if self.hung_after_s else None
        try:
            for index, child in enumerate(self.children):
                if beats is not None:
                    child.heartbeat = beats / f"{index}-{child.name}"
                self._start(child)
            while not self.stopping:
                self._watch()
                time.sleep(POLL_S)
            return self._shutdown()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if beats is not None:
                shutil.rmtree(beats, ignore_errors=True)

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)
                continue
            code = process.poll()
            if code is None:
                if now - child.started >= STABLE_AFTER_S:
                    child.backoff = BACKOFF_MIN_S
                self._kill_if_hung(child, process)
                continue
            if self.on_exit is not None:
                self.on_exit(process.pid)
            log.warning(
                "%s (pid %d) %s after %.1fs; restarting in %.1fs",
                child.name, process.pid, describe(code), now - child.started, child.backoff,
            )  # fmt: skip
            child.process = None
            child.restart_at = now + child.backoff
            child.backoff = min(BACKOFF_MAX_S, child.backoff * 2)

    def _kill_if_hung(self, child: Child, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``child`` if its heartbeat has not moved for ``hung_after_s`` (counted from
        its start, plus ``STARTING_S``, until its first beat): its exit is then seen as a
        crash's. A beat is a change of the file's mtime, timed by this process's monotonic
        clock: the wall clock stepping (NTP, a VM resumed) would make every beat look old."""
        if child.heartbeat is None:
            return
        now = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            beat = child.heartbeat.stat().st_mtime_ns
            if beat != child.beat:
                child.beat, child.beat_seen = beat, now
        silent = now - (child.beat_seen if child.beat is not None else child.started + STARTING_S)
        if silent > self.hung_after_s:
            log.warning("%s (pid %d) has not answered for %.0fs (hung or paused): killing it",
                        child.name, process.pid, silent)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            child.beat, child.beat_seen = 0, now  # killed once: its exit comes next

    def _shutdown(self) -> int:
        running = [c for c in self.children if c.process is not None]
        log.info("stopping %d processes", len(running))
        for child in running:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killing it", child.name, GRACE_S)
                child.process.kill()
                child.process.wait()
            if self.on_exit is not None:
                self.on_exit(child.process.pid)
        log.info("stopped")
        return 0
