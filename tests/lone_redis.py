"""A Redis server of the test's own, beside the stack's: for what cannot be done to a shared
server (demoting it to a replica, a failover behind one endpoint)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from flashsale.cli.devstack.binaries import find_redis
from flashsale.cli.devstack.processes import free_port


@contextlib.contextmanager
def lone_redis(folder: Path) -> Iterator[str]:
    """A redis-server (the stack's binary, no persistence, data in ``folder``) while the block
    runs: its URL. Killed after."""
    binary, _version = find_redis()
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait()
