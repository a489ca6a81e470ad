"""The embedded development stack: Redis, PostgreSQL and a Kafka-protocol broker, rootless.

``flashsale dev up`` starts whichever of the three is not given from outside (``REDIS_URL``,
``DATABASE_URL``, ``KAFKA_BOOTSTRAP``), each on a free loopback port with its data under
``<home>`` (``./.flashsale``), and declares the stack ready only after a real ping of each
(:mod:`flashsale.cli.devstack.pings`). It then writes ``<home>/dev.env``. Running it again
reuses what is already running.

Binaries come from :mod:`flashsale.cli.devstack.binaries`. Servers are started detached
(:mod:`flashsale.cli.devstack.processes`) so they outlive the command that started them;
``stack.json`` records each one's pid, port, binary and process (a pid reused is not it).

``dev up --redis-cluster N [--replicas R]`` makes Redis a Redis Cluster of N primaries with R
replicas each (:mod:`flashsale.cli.devstack.redis_cluster`); the layout is kept in the home, so
later commands (``up`` again, ``status``, ``down``) cover every node. A stack lives in its
home (``FLASHSALE_HOME``), so a cluster stack and a single-server one can run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis.exceptions

from flashsale.cli.devstack import redis_cluster
from flashsale.cli.devstack.errors import StackError
from flashsale.cli.devstack.files import (
    SECRET_NAMES,
    STATE_WAY_OUT,
    parse_secrets,
    parse_state,
    read_json,
    write_json,
    write_whole,
)
from flashsale.cli.devstack.pings import PINGS
from flashsale.cli.devstack.processes import (
    free_port,
    pid_alive,
    stop_pid,
    tail,
)
from flashsale.cli.devstack.servers import (
    DATABASE,
    ServerState,
    aof_bytes,
    ensure_database,
    start_kafka,
    start_postgres,
    start_redis,
)
from flashsale.env_values import trimmed
from flashsale.settings import DEV_ENV_FILE, mask_url

SERVERS = ("redis", "postgres", "kafka")
EXTERNAL_VAR = {"redis": "REDIS_URL", "postgres": "DATABASE_URL", "kafka": "KAFKA_BOOTSTRAP"}
# A Redis that answers LOADING is reading its AOF: waited out this long, whatever the start's
# timeout (a dev stack's 50 MB AOF of small writes took 7-8 s to load).
LOADING_S = 600.0
FORM_S = 10.0  # a Redis Cluster's forming, after nodes that loaded for longer than the timeout


@dataclass
class ServerStatus:
    name: str
    state: str  # running | no answer (its process runs, its ping failed) | stopped | external
    url: str | None
    pid: int | None = None
    binary: str | None = None
    version: str | None = None
    detail: str = ""


class DevStack:
    """The embedded stack rooted at ``home``. Every public method is safe to call repeatedly."""

    def __init__(self, home: Path, environ: dict[str, str] | None = None) -> None:
        self.home = home
        self.environ = trimmed(os.environ if environ is None else environ)  # as Settings
        self.state_file = home / "stack.json"
        self.secrets_file = home / "secrets.json"
        self.env_file = home / DEV_ENV_FILE
        self.layout_file = home / "redis-cluster.json"

    @property
    def layout(self) -> redis_cluster.Layout | None:
        """The Redis Cluster layout of this stack; None for a single Redis server."""
        return redis_cluster.Layout.load(self.layout_file)

    def names(self) -> list[str]:
        """The stack's servers: ``redis`` (or every node of its cluster), postgres, kafka."""
        layout = self.layout
        return [*(layout.names() if layout else ["redis"]), "postgres", "kafka"]

    # -- state ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with (self.home / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _load(self) -> dict[str, ServerState]:
        state = read_json(self.state_file, parse_state, STATE_WAY_OUT)
        return state or {}

    def _save(self, state: dict[str, ServerState]) -> None:
        write_json(self.state_file, {k: asdict(v) for k, v in state.items()})

    def _secrets(self) -> dict[str, str]:
        """Generated once per home and kept, so tokens stay valid across restarts."""
        loaded = read_json(self.secrets_file, parse_secrets)
        if loaded is not None:
            return loaded
        values = {name: secrets.token_urlsafe(32) for name in SECRET_NAMES}
        write_json(self.secrets_file, values, mode=0o600)
        return values

    def external(self, name: str) -> str | None:
        """The server's URL from the environment, unless it is this stack's own: a shell or a
        test session that took dev.env's URLs must not make ``up`` rewrite it without them."""
        value = self.environ.get(EXTERNAL_VAR[_kind(name)]) or None
        if value is not None:
            name = _kind(name)  # REDIS_URL names the first node of a cluster
            own = self._load().get(name)
            named = value.replace("redis://:", "redis://default:", 1)  # the user left out
            if own is not None and named == self.url(name, own.port):
                return None
        return value

    def url(self, name: str, port: int) -> str:
        keys = self._secrets()
        if _kind(name) == "redis":
            # The user named: Redis 7's redis-cli sends no AUTH for "redis://:password@".
            return f"redis://default:{keys['redis_password']}@127.0.0.1:{port}/0"
        if name == "postgres":
            return f"postgresql://postgres:{keys['postgres_password']}@127.0.0.1:{port}/{DATABASE}"
        return f"127.0.0.1:{port}"

    # -- up ------------------------------------------------------------------------------

    def up(
        self,
        timeout: float = 30.0,
        progress: Callable[[str], None] = print,
        *,
        cluster: redis_cluster.Layout | None = None,
    ) -> float:
        """Start (or reuse) every embedded server and wait until each answers a real ping;
        with ``cluster``, Redis is a Redis Cluster of that layout (formed on first start).

        Returns the seconds it took. Raises :class:`StackError` with the failing server's log
        tail; servers this call started are stopped again on failure.
        """
        began = time.monotonic()
        with self._locked():
            self._secrets()
            state = self._load()
            self._settle_layout(cluster, state)
            started: list[str] = []
            try:
                for name in self.names():
                    if self.external(name):
                        progress(f"{name:9} external ({EXTERNAL_VAR[_kind(name)]})")
                        continue
                    current = state.get(name)
                    if current and current.running():
                        progress(f"{name:9} reusing pid {current.pid} on port {current.port}")
                        continue
                    state[name] = self._start(name, current.port if current else None)
                    started.append(name)
                    self._save(state)
                asyncio.run(self._wait_ready(state, began + timeout, progress))
                layout = self.layout
                if layout is not None and not self.external("redis"):
                    ports = [state[n].port for n in layout.names()]
                    password = self._secrets()["redis_password"]
                    # a node that loaded its data for longer than ``timeout`` still gets time
                    until = max(began + timeout, time.monotonic() + FORM_S)
                    if asyncio.run(redis_cluster.form(layout, ports, password, until)):
                        progress(f"redis     formed a cluster of {layout.primaries} primaries "
                                 f"with {layout.replicas} replica(s) each")  # fmt: skip
            except BaseException:
                for name in started:
                    stop_pid(state[name].pid, _STOP_SIGNAL[_kind(name)])
                    state.pop(name, None)
                self._save(state)
                raise
            self._write_env(state)
        elapsed = time.monotonic() - began
        for name in started:
            progress(f"{name:9} started pid {state[name].pid} on port {state[name].port}")
        return elapsed

    def _settle_layout(
        self, cluster: redis_cluster.Layout | None, state: dict[str, ServerState]
    ) -> None:
        """Record ``cluster`` for a stack that has no Redis yet; refuse a change of layout on
        one that has (its data belongs to the other layout)."""
        current = self.layout
        if cluster is None or cluster == current:
            return
        has_redis = any(_kind(name) == "redis" for name in state) or (self.home / "redis").exists()
        if has_redis:
            now = (f"a Redis Cluster of {current.primaries} primaries" if current
                   else "a single Redis server")  # fmt: skip
            raise StackError(
                f"the stack in {self.home} already runs {now}; stop it with "
                "`flashsale dev down --purge`, or give the other layout its own FLASHSALE_HOME"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        cluster.save(self.layout_file)

    def _start(self, name: str, preferred_port: int | None) -> ServerState:
        node = self.layout is not None and _kind(name) == "redis"
        if node and preferred_port is None:
            # A cluster's nodes know each other by port (nodes.conf): a node comes back on
            # the port it had, which its configuration file remembers.
            preferred_port = redis_cluster.configured_port(self.data_dir(name))
        bus = redis_cluster.BUS_OFFSET if node else 0
        port = free_port(preferred_port, patience=10.0, partner=bus)
        if node and preferred_port is not None and port != preferred_port:
            raise StackError(
                f"{name} must come back on port {preferred_port} (and {preferred_port + bus}), "
                "where the other nodes of the cluster know it, but it is taken; free it, or "
                "start afresh with `flashsale dev down --purge`"
            )
        if _kind(name) == "redis":
            data, password = self.data_dir(name), self._secrets()["redis_password"]
            cluster = redis_cluster.node_config(port, data, password) if self.layout else ""
            return start_redis(data, port, password, cluster)
        if name == "postgres":
            return start_postgres(
                self.home / "postgres", port, self._secrets()["postgres_password"]
            )
        return start_kafka(self.home / "kafka", port)

    async def _wait_ready(
        self, state: dict[str, ServerState], deadline: float, progress: Callable[[str], None]
    ) -> None:
        async def ready(name: str, server: ServerState) -> None:
            url = self.url(name, server.port)
            last: BaseException | None = None
            until = deadline
            while time.monotonic() < until:
                if not pid_alive(server.pid):
                    raise StackError(
                        f"{name} exited during start; log tail:\n{tail(Path(server.log))}"
                    )
                try:
                    if name == "postgres":
                        await ensure_database(server.port, self._secrets()["postgres_password"])
                    await PINGS[_kind(name)](url)
                    return
                except redis.exceptions.BusyLoadingError as exc:
                    # Loading its data is progress, however long the AOF takes: waited out
                    # up to LOADING_S from the first answer that said so.
                    if not isinstance(last, redis.exceptions.BusyLoadingError):
                        until = max(until, time.monotonic() + LOADING_S)
                        mb = self.aof_bytes(name) / 1e6
                        progress(f"{name:9} loading its data from disk ({mb:,.0f} MB of AOF); "
                                 f"waiting up to {LOADING_S:g}s")  # fmt: skip
                    last = exc
                    await asyncio.sleep(0.1)
                except Exception as exc:  # noqa: BLE001 - not ready yet: retry until the deadline
                    last = exc
                    await asyncio.sleep(0.1)
            raise StackError(
                f"{name} not ready in time (last error: {last!r}); "
                f"log tail:\n{tail(Path(server.log))}"
            )

        names = self.names()
        await asyncio.gather(*(ready(n, s) for n, s in state.items()
                               if n in names and not self.external(n)))  # fmt: skip

    def _write_env(self, state: dict[str, ServerState]) -> None:
        """dev.env: each server this stack runs (also while given another's URL), the secrets."""
        keys = self._secrets()
        runs = {name for name, server in state.items()
                if not self.external(name) or server.running()}  # fmt: skip
        lines = [f"export {EXTERNAL_VAR[name]}={self.url(name, state[name].port)}"
                 for name in SERVERS if name in runs]  # fmt: skip
        if self.layout is not None and "redis" in runs:
            lines.append("export FLASHSALE_REDIS_CLUSTER=1")
        for var in ("FLASHSALE_ADMIN_TOKEN", "FLASHSALE_SECRET", "FLASHSALE_BUYER_TOKEN_SECRET"):
            lines.append(f"export {var}={keys[var]}")
        write_whole(self.env_file, "\n".join(lines) + "\n", mode=0o600)

    # -- what the fault suite acts on ----------------------------------------------------

    def running_pid(self, name: str) -> int | None:
        """The pid of the embedded ``name`` server while it runs; None when the server is
        external or stopped."""
        if self.external(name):
            return None
        server = self._load().get(name)
        return server.pid if server and server.running() else None

    def redis_pid_on(self, port: int) -> int | None:
        """The pid of the embedded Redis server or cluster node on ``port`` while it runs."""
        for name, server in self._load().items():
            if _kind(name) == "redis" and server.port == port:
                return server.pid if server.running() else None
        return None

    def start_stopped(self) -> None:
        """Start every embedded server that is not running (same port, same data) and wait
        until each answers; quietly."""
        self.up(progress=lambda _line: None)

    def data_dir(self, name: str) -> Path:
        """Where the embedded ``name`` server keeps its data (``redis/node-K`` for the K-th
        node of a cluster)."""
        if _kind(name) == "redis" and self.layout is not None:
            number = 1 if name == "redis" else int(name.rsplit("-", 1)[1])
            return self.home / "redis" / f"node-{number}"
        return self.home / {"redis": "redis", "postgres": "postgres/data", "kafka": "kafka"}[name]

    def aof_bytes(self, name: str) -> int:
        """The size of the embedded Redis ``name``'s AOF (what a restart loads)."""
        return aof_bytes(self.data_dir(name))

    # -- env / status / down -------------------------------------------------------------

    def env_lines(self) -> str:
        if not self.env_file.is_file():  # stopped (its data kept), or none here
            raise StackError.no_env(self.home, stopped=self.data_dir("postgres").is_dir())
        return self.env_file.read_text()

    def status(self) -> list[ServerStatus]:
        state = self._load()
        layout = self.layout
        rows: list[ServerStatus] = []
        for name in self.names():
            if external := self.external(name):
                if _kind(name) == "redis" and name != "redis":
                    continue
                rows.append(ServerStatus(name, "external", mask_url(external)))
                continue
            server = state.get(name)
            if server is None:
                rows.append(ServerStatus(name, "stopped", None))
                continue
            alive = server.running()
            detail, shown = "", "running" if alive else "stopped"
            if alive:
                try:
                    asyncio.run(PINGS[_kind(name)](self.url(name, server.port)))
                    detail = "ping ok"
                    if layout is not None and _kind(name) == "redis":
                        role = asyncio.run(redis_cluster.describe(
                            server.port, self._secrets()["redis_password"]))  # fmt: skip
                        detail += f"; {role}"
                except Exception as exc:  # noqa: BLE001 - reported, not raised: this is status
                    detail, shown = f"ping failed: {exc!r}", "no answer"
            rows.append(
                ServerStatus(
                    name,
                    shown,
                    mask_url(self.url(name, server.port)),
                    server.pid if alive else None,
                    server.binary,
                    server.version,
                    detail,
                )
            )
        return rows

    def down(self, *, purge: bool = False, progress: Callable[[str], None] = print) -> None:
        """Stop every embedded server cleanly (Redis flushes its AOF, Postgres fast shutdown)."""
        with self._locked():
            state = self._load()
            if not state:
                progress(f"no embedded stack is running in {self.home}: nothing to stop")
            try:
                names = self.names()
            except StackError:  # a damaged cluster layout: the state names every server started
                names = []
            for name in reversed([*names, *(n for n in state if n not in names)]):
                server = state.pop(name, None)
                if server is None:
                    continue
                if server.running():
                    stop_pid(server.pid, _STOP_SIGNAL[_kind(name)])
                    progress(f"{name:9} stopped (pid {server.pid})")
                else:
                    progress(f"{name:9} was not running")
                self._save(state)
            self.state_file.unlink(missing_ok=True)
            self.env_file.unlink(missing_ok=True)
            if purge:
                for sub in ("redis", "postgres", "kafka"):
                    shutil.rmtree(self.home / sub, ignore_errors=True)
                self.secrets_file.unlink(missing_ok=True)
                self.layout_file.unlink(missing_ok=True)
                progress("data purged")


# Redis SIGTERM = SHUTDOWN (AOF flushed); Postgres SIGINT = fast shutdown; tansu SIGTERM.
_STOP_SIGNAL = {"redis": signal.SIGTERM, "postgres": signal.SIGINT, "kafka": signal.SIGTERM}


def _kind(name: str) -> str:
    """``redis`` for every node of a cluster (``redis-2``…), else the name itself."""
    return "redis" if name.startswith("redis") else name
