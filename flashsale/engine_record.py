"""The record a running ``flashsale up`` keeps in the state folder (``<home>/engine.env``): the
payment simulator it started. Commands run from another shell (``flashsale audit``) read it
through Settings; an engine about to start its own simulator checks it first.

Two simulators on one stack would each know only the payments their own engine's workers made
(the workers of both share one consumer group), so the audit and the reconciler, asking one of
them, would miss the others' charges."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from flashsale.errors import Conflict
from flashsale.settings import ENGINE_ENV_FILE, read_env_file

PROBE_TIMEOUT_S = 1.0  # a simulator on loopback answers its probe in milliseconds


def running_simulator(home: Path) -> str | None:
    """The URL of the payment simulator an engine on this stack runs, when the record names
    one that answers its health probe; None for no record, or one a killed ``up`` left."""
    url = read_env_file(home / ENGINE_ENV_FILE).get("FLASHSALE_PSP_URL")
    if not url:
        return None
    probe = f"{url}/healthz"
    try:
        with urllib.request.urlopen(probe, timeout=PROBE_TIMEOUT_S) as answer:  # noqa: S310
            return url if answer.status == 200 else None
    except (OSError, ValueError):  # refused, timed out (URLError is an OSError), or no URL
        return None


def refuse_a_second_simulator(home: Path) -> None:
    """Raise Conflict when an engine on this stack already runs a payment simulator."""
    url = running_simulator(home)
    if url is not None:
        raise Conflict(
            f"an engine is running on this stack: its payment simulator answers at {url} "
            f"({home / ENGINE_ENV_FILE}); a second engine would start a simulator of its own, "
            "and each would know only the payments its own workers made. Stop that engine "
            "first, or set FLASHSALE_PSP_URL to share its simulator",
            code="engine_running",
        )
