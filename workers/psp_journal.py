"""The payment simulator's journal: its charges and refunds as JSON lines, read back at start.

A line is ``{"key", "params", "charge", "at"}``: a charge made under an idempotency key, or a
later state of it (a refund), ``at`` being when it was written (seconds since the epoch). A
rewritten journal starts with ``{"next_id": N}``: charge numbers go on from there, never
reusing one of a charge it forgot.

At start (``load``) the journal keeps what a provider keeps: charges first made less than
``keep_days`` ago. When it has anything to drop (older charges, a refund to fold into its
charge, a line cut short by a kill) it is rewritten with one line per charge, to a temporary
file renamed over it: a kill during the rewrite leaves the old journal whole. A line cut
short is never followed by an appended one (the next charge would be glued to it and lost at
the following start). Lines written before they carried a time count as written when the
file was last changed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

log = logging.getLogger("flashsale.psp")

KEEP_DAYS = 7.0  # how long a charge is remembered, as a provider keeps its idempotency keys
DAY_S = 86400.0

Params = tuple[int, str, str]  # amount, currency, payment token


@dataclass
class Entry:
    params: Params
    charge: dict[str, Any]  # as it stands now (a refund replaces the captured state)
    at: float  # when the charge was made


@dataclass
class Loaded:
    entries: dict[str, Entry] = field(default_factory=dict)  # in the order they were made
    next_id: int = 1
    forgotten: int = 0


def _line(key: str, entry: Entry) -> bytes:
    return orjson.dumps({"key": key, "params": list(entry.params), "charge": entry.charge,
                         "at": entry.at}) + b"\n"  # fmt: skip


def _read(data: bytes, file_time: float) -> tuple[Loaded, int]:
    """Every charge the lines name, and how many lines are no longer needed."""
    loaded = Loaded()
    spare = 0
    for raw in data.splitlines():
        try:
            line = orjson.loads(raw)
            if "next_id" in line:
                loaded.next_id = max(loaded.next_id, int(line["next_id"]))
                continue
            key, charge = str(line["key"]), dict(line["charge"])
            p = line["params"]
            params = (int(p[0]), str(p[1]), str(p[2]))
            number = int(str(charge["id"]).removeprefix("ch_"))
            at = float(line.get("at", file_time))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
            spare += 1  # cut short by a kill, or not a journal line
            continue
        loaded.next_id = max(loaded.next_id, number + 1)
        known = loaded.entries.get(key)
        if known is None:
            loaded.entries[key] = Entry(params, charge, at)
        else:
            known.charge = charge
            spare += 1
    return loaded, spare


def load(path: Path, keep_days: float = KEEP_DAYS) -> Loaded:
    """The charges of the journal at ``path`` made within ``keep_days``, the journal rewritten
    to hold only those when it held more."""
    if not path.is_file():
        return Loaded()
    data = path.read_bytes()
    loaded, spare = _read(data, path.stat().st_mtime)
    cutoff = time.time() - keep_days * DAY_S
    kept = {key: entry for key, entry in loaded.entries.items() if entry.at >= cutoff}
    loaded.forgotten = len(loaded.entries) - len(kept)
    loaded.entries = kept
    if loaded.forgotten or spare or (data and not data.endswith(b"\n")):
        temporary = path.with_name(path.name + ".tmp")
        with temporary.open("wb") as out:
            out.write(orjson.dumps({"next_id": loaded.next_id}) + b"\n")
            out.writelines(_line(key, entry) for key, entry in kept.items())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        log.info("psp journal %s: %d charges kept, %d older than %g days forgotten "
                 "(%.1f MB -> %.1f MB)", path, len(kept), loaded.forgotten, keep_days,
                 len(data) / 1e6, path.stat().st_size / 1e6)  # fmt: skip
    return loaded


class Journal:
    """Appends charges to the journal at ``path`` (``load`` it first)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] | None = path.open("ab")

    def append(self, key: str, params: Params, charge: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(_line(key, Entry(params, charge, time.time())))
            self._file.flush()  # in the OS's hands: it survives this process being killed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
