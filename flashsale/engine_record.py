"""The records a running ``flashsale up`` keeps in the state folder. ``<home>/engine.env``: the
payment simulator it started. Commands run from another shell (``flashsale audit``) read it
through Settings; an engine about to start its own simulator checks it first.
``<home>/engines/<port>.json``: where its services listen, which ``dev status`` shows.
``<home>/benches/<pid>.json``: a running benchmark that makes sales, which an engine would take
up as its own: neither starts beside the other. Each names its process by pid and by
:func:`process_identity`, as the embedded stack's ``stack.json`` names its servers.

Two simulators on one stack would each know only the payments their own engine's workers made
(the workers of both share one consumer group), so the audit and the reconciler, asking one of
them, would miss the others' charges."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from flashsale.errors import Conflict
from flashsale.settings import ENGINE_ENV_FILE, read_env_file

PROBE_TIMEOUT_S = 1.0  # a simulator on loopback answers its probe in milliseconds
ENGINES_DIR = "engines"  # <home>/engines/<port>.json: each running `up`, by its gateway port
BENCHES_DIR = "benches"  # <home>/benches/<pid>.json: each running bench that makes sales


def running_simulator(home: Path) -> str | None:
    """The URL of the payment simulator an engine on this stack runs, when the record names
    one that answers its health probe; None for no record, or one a killed ``up`` left."""
    url = read_env_file(home / ENGINE_ENV_FILE).get("FLASHSALE_PSP_URL")
    return url if url and answers(f"{url}/healthz") else None


def answers(probe: str) -> bool:
    """``probe`` (a service's health URL) answers 200 within PROBE_TIMEOUT_S."""
    try:
        with urllib.request.urlopen(probe, timeout=PROBE_TIMEOUT_S) as answer:  # noqa: S310
            return bool(answer.status == 200)
    except (OSError, ValueError):  # refused, timed out (URLError is an OSError), or no URL
        return False


def running_engines(home: Path) -> list[dict[str, Any]]:
    """The records of the engines running on this stack, by gateway port: ``pid`` (the
    supervisor's), ``gateway``, ``admin_page``, ``reservations`` (or None), ``ops`` (each
    service's port by name), ``version``, ``started_at``. One a killed ``up`` left behind is
    skipped."""
    return _live_records(home / ENGINES_DIR)


def running_benches(home: Path) -> list[dict[str, Any]]:
    """The records of the benchmarks that make sales running on this stack: ``pid`` and
    ``bench`` (its name, as ``flashsale bench`` takes it). One a killed run left is skipped."""
    return _live_records(home / BENCHES_DIR)


def process_identity(pid: int) -> str | None:
    """What tells the process ``pid`` runs now from any other that had or will have the same
    pid: the boot, and the moment of it the process started (in clock ticks: not moved by
    changes of the wall clock). None when no such process runs (or not on Linux). A pid
    recorded with this is the recorded process only while this is the same: after a reboot,
    or pids wrapping around, it can be another process of the same program."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return f"{boot}:{fields[19]}"  # the 22nd field, starttime (the 3rd is fields[0])


def this_process() -> dict[str, Any]:
    """What a record of this process names it by: ``pid`` and ``identity``."""
    return {"pid": os.getpid(), "identity": process_identity(os.getpid())}


def is_recorded_process(pid: int, identity: str | None) -> bool:
    """``pid`` is the process a record made with ``identity`` (:func:`process_identity`)
    names, as far as its process still runs; a record without one (made before records had
    it) is taken at its pid's word."""
    return identity is None or process_identity(pid) == identity


def _live_records(folder: Path) -> list[dict[str, Any]]:
    """The JSON records in ``folder`` whose ``pid`` is a live flashsale process, the one
    recorded, by file name (numbers in their order)."""
    found = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stem.zfill(10)):
        try:
            record = orjson.loads(path.read_bytes())
            pid = int(record["pid"])
            alive = _runs_flashsale(pid) and is_recorded_process(pid, record.get("identity"))
        except (OSError, ValueError, KeyError, TypeError):  # gone meanwhile, or half written
            continue
        if alive:
            found.append(record)
    return found


def _runs_flashsale(pid: int) -> bool:
    """``pid`` is a live flashsale process (not a pid a killed ``up`` left, reused since)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return b"flashsale" in command and state not in ("Z", "X")


def refuse_to_start_an_engine(home: Path, *, own_simulator: bool) -> None:
    """Raise Conflict when a benchmark that makes sales runs on this stack: the engine would
    take its sales up as live ones. With ``own_simulator`` (the engine would start its own
    payment simulator), also when an engine on this stack already runs one. The engine a
    benchmark starts itself (``bench all``'s demo, ``flashsale up`` as its child process) is
    its own, not one beside it."""
    ours = (os.getpid(), os.getppid())
    benches = [bench for bench in running_benches(home) if bench["pid"] not in ours]
    if benches:
        bench = benches[0]
        raise Conflict(
            f"a benchmark runs on this stack (`flashsale bench {bench['bench']}`, pid "
            f"{bench['pid']}): an engine would take its sales up as its own (reservations "
            "relayed and charged, state written back); start the engine once it is done",
            code="bench_running",
        )
    url = running_simulator(home) if own_simulator else None
    if url is not None:
        raise Conflict(
            f"an engine is running on this stack: its payment simulator answers at {url} "
            f"({home / ENGINE_ENV_FILE}); a second engine would start a simulator of its own, "
            "and each would know only the payments its own workers made. Stop that engine "
            "first, or set FLASHSALE_PSP_URL to share its simulator",
            code="engine_running",
        )
