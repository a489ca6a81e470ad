"""Processes on loopback: free ports, servers started detached (their own session,
re-parented away from the command that started them), liveness by pid and executable,
stopping with a grace, and the files of a server that runs as another user."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from flashsale.cli.devstack.errors import StackError
from flashsale.engine_record import is_recorded_process

# Ports handed out for servers: below the kernel's ephemeral range, which outgoing connections
# draw from. A server on an ephemeral port can find it taken when it restarts (any connection
# may have been given it meanwhile) and would come back on another port, with every service
# still calling the old one.
_FIRST_PORT = 10_000
_FALLBACK_EPHEMERAL = (32_768, 60_999)


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL


def _candidates() -> list[int]:
    """Ports outside the ephemeral range, in random order (empty if there are none)."""
    low, high = _ephemeral()
    ports = [p for p in range(_FIRST_PORT, 65_536) if not low <= p <= high]
    random.shuffle(ports)
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(preferred: int | None = None, *, patience: float = 0.0, partner: int = 0) -> int:
    """A free loopback TCP port outside the ephemeral range; ``preferred`` when it is free, or
    becomes free within ``patience`` seconds (a restart keeps its port, and dev.env stays
    true). With ``partner``, the port ``partner`` above it is free and outside that range
    too (a Redis Cluster node's bus listens 10,000 above its port)."""

    def usable(port: int) -> bool:
        if not partner:
            return _bindable(port)
        low, high = _ephemeral()
        other = port + partner
        return other <= 65_535 and not low <= other <= high and _bindable(port) and \
            _bindable(other)  # fmt: skip

    if preferred:
        deadline = time.monotonic() + patience
        while True:
            if usable(preferred):
                return preferred
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    for port in _candidates():
        if usable(port):
            return port
    if partner:
        raise StackError(f"no free loopback port P with P+{partner} free too")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found


# `flashsale up --port P` takes P..P+5 by default: the gateway, the allocator's, the workers'
# and the reconciler's ops endpoints, the payment simulator and the reservations listener.
UP_PORTS = 6


def free_ports(count: int) -> int:
    """A loopback port P with P..P+count-1 all free (a service and its neighbours), outside
    the ephemeral range."""
    for port in _candidates():
        if port + count <= 65_536 and all(_bindable(port + i) for i in range(count)):
            low, high = _ephemeral()
            if not any(low <= port + i <= high for i in range(count)):
                return port
    raise OSError(f"no {count} consecutive free ports outside the ephemeral range")


def pid_alive(pid: int, binary: str | None = None, identity: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, runs ``binary`` and is the
    process of that ``identity`` (flashsale.engine_record.process_identity), not another
    that took its pid since."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat_line.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return False
    if not is_recorded_process(pid, identity):
        return False
    if binary is None:
        return True
    try:
        # exe, not cmdline: redis-server rewrites its process title.
        exe = os.readlink(f"/proc/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # The name, not the path: a binary replaced while it runs reads "name (deleted)". Both
    # names of a link: Debian's redis-server is a link to redis-check-rdb, which runs.
    ran = Path(exe.removesuffix(" (deleted)")).name
    return ran in (Path(binary).name, Path(os.path.realpath(binary)).name)


def spawn_detached(argv: list[str], log: Path, *, user: str | None = None) -> int:
    """Start ``argv`` in its own session, stdout/stderr appended to ``log``; return its pid.

    A throwaway ``sh`` starts the server in the background and exits, so the server is
    re-parented away from this process: it outlives the CLI and leaves no zombie behind.
    """
    script = '"$@" </dev/null >>"$FLASHSALE_SPAWN_LOG" 2>&1 & echo $!'
    env = {**os.environ, "FLASHSALE_SPAWN_LOG": str(log)}
    out = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *argv],
        capture_output=True,
        text=True,
        env=env,
        user=user,
        start_new_session=True,
        timeout=30,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip().isdigit():
        raise StackError(f"could not start {argv[0]}: {out.stderr.strip()}")
    return int(out.stdout.strip())


def run_as(argv: list[str], *, user: str | None, log: Path) -> None:
    with log.open("ab") as sink:
        result = subprocess.run(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            user=user,
            timeout=120,
            check=False,
            start_new_session=True,
        )
    if result.returncode != 0:
        raise StackError(f"{Path(argv[0]).name} failed (exit {result.returncode})\n{tail(log)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(f"    {line}" for line in content[-lines:])


def stop_pid(pid: int, sig: signal.Signals, timeout: float = 20.0) -> bool:
    """Signal ``pid`` and wait for it to exit; SIGKILL after ``timeout``. True if it had run."""
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)
    return True


def chown(path: Path, user: str) -> None:
    """Give ``path`` to ``user`` (and that user's group)."""
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def grant_traversal(path: Path, user: str) -> None:
    """Let ``user`` reach ``path``: own it, and o+x on its ancestors."""
    chown(path, user)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
