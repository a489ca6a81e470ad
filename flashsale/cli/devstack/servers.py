"""Starting each server of the embedded stack: redis-server, PostgreSQL and the tansu broker,
detached, on a given loopback port, with their data under the stack's home."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from flashsale.cli.devstack.binaries import find_postgres, find_redis, find_tansu
from flashsale.cli.devstack.errors import StackError
from flashsale.cli.devstack.processes import (
    chown,
    grant_traversal,
    pid_alive,
    run_as,
    spawn_detached,
)
from flashsale.engine_record import process_identity

DATABASE = "flashsale"
# Postgres refuses to run as root; a root caller runs it as this unprivileged user instead.
UNPRIVILEGED_USER = "nobody"


@dataclass
class ServerState:
    pid: int
    port: int
    binary: str
    version: str
    log: str
    started_at: float = field(default_factory=time.time)
    # the process started (process_identity): None in a record made before records had it
    identity: str | None = None

    def running(self) -> bool:
        """The recorded server's process runs: this pid, running this binary, and the same
        process (not another that took its pid since, after a reboot say)."""
        return pid_alive(self.pid, self.binary, self.identity)


def spawned(argv: list[str], log: Path, *, port: int, version: str,
            user: str | None = None) -> ServerState:  # fmt: skip
    """The server ``argv`` started detached (as ``user``), its output in ``log``, recorded."""
    pid = spawn_detached(argv, log, user=user)
    return ServerState(pid=pid, port=port, binary=argv[0], version=version, log=str(log),
                       identity=process_identity(pid))  # fmt: skip


def start_redis(data: Path, port: int, password: str, cluster: str) -> ServerState:
    """A redis-server on ``port`` with its data in ``data``; ``cluster``: the node's cluster
    configuration lines, or empty."""
    binary, version = find_redis()
    data.mkdir(parents=True, exist_ok=True)
    conf = data / "redis.conf"
    # The password lives in a 0600 file, not on the command line where `ps` shows it.
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(
            f"port {port}\nbind 127.0.0.1\ndir {data}\ndaemonize no\n"
            'appendonly yes\nappendfsync everysec\nsave ""\n'
            f"requirepass {password}\n"
            "maxmemory-policy noeviction\n" + cluster
        )
    log = data / "redis.log"
    return spawned([binary, str(conf)], log, port=port, version=version)


def aof_bytes(data: Path) -> int:
    """The size of the AOF of the Redis whose data is in ``data``: one ``appendonly.aof`` up to
    Redis 6, a base and increments in ``appendonlydir/`` from Redis 7 (0 when it has none)."""
    files = [data / "appendonly.aof", *(data / "appendonlydir").glob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def start_postgres(root: Path, port: int, password: str) -> ServerState:
    """A PostgreSQL server on ``port``, its cluster initialised under ``root`` on first use
    (as an unprivileged user when run as root: Postgres refuses root)."""
    bindir, version = find_postgres()
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    user = UNPRIVILEGED_USER if os.geteuid() == 0 else None
    if user:
        grant_traversal(root, user)
    log = root / "postgres.log"
    log.touch()
    if user:
        chown(log, user)
    if not (data / "PG_VERSION").is_file():
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if user:
            chown(pwfile, user)
        try:
            run_as(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                user=user,
                log=log,
            )
        finally:
            pwfile.unlink(missing_ok=True)
    made_by = (data / "PG_VERSION").read_text().strip()
    if made_by != version.split(".")[0]:
        raise StackError(
            f"{data} was created by PostgreSQL {made_by} but the server found is {version}; "
            "run `flashsale dev down --purge` to start afresh"
        )
    argv = [
        str(bindir / "postgres"), "-D", str(data), "-p", str(port),
        "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
        "-c", "max_connections=300", "-c", "shared_buffers=256MB",
    ]  # fmt: skip
    return spawned(argv, log, port=port, version=version, user=user)


def start_kafka(root: Path, port: int) -> ServerState:
    """The tansu broker on ``port``, its storage in memory."""
    binary, version = find_tansu()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "tansu.log"
    listener = f"tcp://127.0.0.1:{port}"
    argv = [
        binary, "broker", "--listener-url", listener,
        "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/",
    ]  # fmt: skip
    return spawned(argv, log, port=port, version=version)


async def ensure_database(port: int, password: str) -> None:
    """The engine's database exists on the local server on ``port``."""
    conn = await asyncpg.connect(
        f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres", timeout=2
    )
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await conn.close()
