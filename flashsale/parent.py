"""A ``flashsale`` process started by another one ends with it: the services under ``flashsale
up`` (or ``gateway --workers N``), and the engine a demo, benchmark or fault run starts. A
SIGKILLed or OOM-killed ``flashsale up`` left every service running, each in its own session,
holding its ports and consuming its partitions, with nobody to restart or stop it.

The parent puts its pid in the child's environment (:func:`followed`); the child asks the
kernel for SIGTERM, its graceful stop, when that parent dies (:func:`follow_parent`). Linux
only (``prctl``); elsewhere children outlive a parent killed outright, as before."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("flashsale.parent")

PARENT_PID = "FLASHSALE_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def followed() -> dict[str, str]:
    """The environment of a ``flashsale`` command this process starts and should take with it.
    Give it from a thread that lives as long as the child should: the kernel's signal follows
    the thread that started the child."""
    return {PARENT_PID: str(os.getpid())}


def follow_parent() -> None:
    """When :func:`followed` started this process: SIGTERM when the parent dies, however it
    dies (sent at once when it died before this ran)."""
    expected = os.environ.pop(PARENT_PID, None)  # not handed on to this process's children
    if expected is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot follow the parent process: prctl failed (errno %d)",
                    ctypes.get_errno())  # fmt: skip
        return
    if str(os.getppid()) != expected:
        os.kill(os.getpid(), signal.SIGTERM)
