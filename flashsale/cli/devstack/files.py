"""The stack's own files (its state, secrets, cluster layout and the env files other shells
read): written whole, read back with an error that names a damaged one and the way out.

A file is written to a temporary file, flushed to disk and renamed over the old one, so a kill
or a full disk mid-write leaves the old file or the new one, never half of one. A file that
cannot be read back (cut short by hand, or by a disk that lied) stops the command with one line
naming it: nothing is generated afresh over it (new passwords would lock the stack out of its
own data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from flashsale.cli.devstack.errors import StackError
from flashsale.cli.devstack.servers import ServerState

T = TypeVar("T")

PURGE = "start afresh with `flashsale dev down --purge` (deletes the stack's data)"
STATE_WAY_OUT = "stop the servers it names by their PID (see `ps`), then delete it"
SECRET_NAMES = ("FLASHSALE_ADMIN_TOKEN", "FLASHSALE_SECRET", "FLASHSALE_BUYER_TOKEN_SECRET",
                "redis_password", "postgres_password")  # fmt: skip


def read_json(path: Path, parse: Callable[[Any], T], way_out: str = PURGE) -> T | None:
    """``parse`` of the JSON in ``path``; None when there is no such file. StackError naming
    the file and ``way_out`` when it is not JSON or ``parse`` finds it the wrong shape."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return parse(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise StackError(f"{path} is damaged ({exc}): {way_out}") from None


def write_whole(path: Path, text: str, mode: int = 0o644) -> None:
    """``text`` in ``path``, whole or not at all (a reader never sees half of it); the file
    gets ``mode``."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """``data`` as JSON in ``path``, whole or not at all; the file gets ``mode``."""
    write_whole(path, json.dumps(data, indent=2) + "\n", mode)


def parse_state(raw: Any) -> dict[str, ServerState]:
    """``stack.json``: each server's pid, port, binary and process identity, by name."""
    return {str(name): ServerState(**value) for name, value in raw.items()}


def parse_secrets(raw: Any) -> dict[str, str]:
    """``secrets.json``: the home's generated secrets and passwords, each a non-empty string."""
    values = {name: raw[name] for name in SECRET_NAMES}
    if not all(isinstance(value, str) and value for value in values.values()):
        raise ValueError("a secret is not a non-empty string")
    return values
