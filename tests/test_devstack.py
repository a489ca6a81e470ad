"""The embedded stack: up, reuse, status, env, down, and a failed start, on real servers."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from flashsale.cli.devstack.binaries import find_redis
from flashsale.cli.devstack.pings import ping_kafka
from flashsale.cli.devstack.processes import free_port, free_ports, pid_alive
from flashsale.cli.devstack.stack import EXTERNAL_VAR, DevStack
from flashsale.settings import Settings, home_dir, read_env_file
from tests.harness import flashsale_named_process, record_bench, record_engine

from .conftest import REPO, Cli

SECRET_VARS = ("FLASHSALE_ADMIN_TOKEN", "FLASHSALE_SECRET", "FLASHSALE_BUYER_TOKEN_SECRET")


@pytest.fixture
def scratch_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A second, private embedded stack: no external servers, its own home."""
    # Under the repo (not /tmp/pytest-*, which is 0700): a root run hands Postgres to `nobody`.
    home = REPO / ".flashsale" / f"test-{uuid.uuid4().hex[:8]}"
    for var in (*EXTERNAL_VAR.values(), *SECRET_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLASHSALE_HOME", str(home))
    yield home
    DevStack(home, environ={}).down(purge=True, progress=lambda _l: None)
    shutil.rmtree(home, ignore_errors=True)


def test_up_reuse_env_status_down(scratch_home: Path, run_cli: Cli) -> None:
    run = run_cli
    first = run("dev", "up")
    assert first.code == 0, first.err
    assert "stack ready" in first.out
    assert "run `flashsale migrate`" in first.out  # a new database has no schema yet
    stack = DevStack(scratch_home, environ={})
    pids = {row.name: row.pid for row in stack.status()}
    assert all(pids.values()), pids
    assert all(row.detail == "ping ok" for row in stack.status())
    shown = run("dev", "status")
    assert shown.code == 0, shown.err
    # In columns: Postgres's URL, longer than the column was, pushed its row's pid out of line.
    *servers, engine = shown.out.splitlines()
    assert len({line.index(" pid ") for line in servers}) == 1, shown.out
    assert engine == "no engine runs on this stack: `flashsale up` starts one", shown.out

    assert run("migrate").code == 0
    again = run("dev", "up")
    assert again.code == 0
    assert again.out.count("reusing") == 3
    assert "migrate" not in again.out
    assert {row.name: row.pid for row in stack.status()} == pids

    env = run("dev", "env")
    values = read_env_file(scratch_home / "dev.env")
    for var in (*EXTERNAL_VAR.values(), *SECRET_VARS):
        assert f"export {var}=" in env.out
        assert values[var]
    # The shell that takes these lines runs later commands against this stack's folder from
    # any directory: `dev down` stopped the default stack, and `audit` missed the payment
    # provider `flashsale up` had written beside this one.
    exported = dict(line.removeprefix("export ").split("=", 1) for line in env.out.splitlines())
    assert shlex.split(exported["FLASHSALE_HOME"]) == [str(scratch_home.resolve())]
    assert values["REDIS_URL"].startswith("redis://default:")
    unnamed = values["REDIS_URL"].replace("redis://default:", "redis://:")
    unnamed_env = {**values, "REDIS_URL": unnamed}  # still this stack's own server
    assert DevStack(scratch_home, environ=unnamed_env).external("redis") is None
    assert values["DATABASE_URL"].startswith("postgresql://")

    # A shell (or a test session) that exported these URLs and runs `up` again is using the
    # stack's own servers, not external ones: dev.env keeps them.
    own = DevStack(scratch_home, environ=values)
    own.up(progress=lambda _line: None)
    assert read_env_file(scratch_home / "dev.env") == values
    assert all(row.state == "running" for row in own.status())
    # One given another Redis (or another user of this one: `flashsale demo` as the engine's
    # least-privileged user) while the stack runs: dev.env lost the stack's REDIS_URL, and a
    # shell taking it later had no Redis at all.
    elsewhere = {**values, "REDIS_URL": "redis://flashsale_app:pw@127.0.0.1:1/0"}
    DevStack(scratch_home, environ=elsewhere).up(progress=lambda _line: None)
    assert read_env_file(scratch_home / "dev.env") == values

    status = run("dev", "status")
    assert status.code == 0
    assert status.out.count("running") == 3
    assert values["FLASHSALE_ADMIN_TOKEN"] not in status.out  # passwords masked
    assert "***" in status.out
    # A server whose process runs and which does not answer is down too: it was exit 0.
    redis_pid = pids["redis"]
    assert redis_pid is not None
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        hung = run("dev", "status")
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert hung.code == 3, hung.out
    assert "redis     no answer" in hung.out and "ping failed" in hung.out, hung.out

    # An engine running on the stack loses its servers: `dev down` stopped them without a
    # word of it, and the engine's services went on failing in another terminal.
    # So does a benchmark; and while one runs, `dev status` says so: an engine is refused
    # until it ends, and that refusal named a benchmark that nothing else showed.
    with flashsale_named_process() as up_pid, flashsale_named_process() as bench_pid:
        record_bench(scratch_home, bench_pid, "gateway")
        busy = run("dev", "status")
        record_engine(scratch_home, 9999, up_pid, "http://127.0.0.1:9999")
        down = run("dev", "down")
    bench_row = [line.split() for line in busy.out.splitlines() if line.startswith("bench ")]
    assert busy.out.endswith("no engine runs on this stack: `flashsale up` starts one once the "
                             "benchmark ends\n"), busy.out  # fmt: skip
    assert bench_row == [
        [
            "bench",
            "running",
            "-",
            "pid",
            str(bench_pid),
            "flashsale",
            "bench",
            "gateway:",
            "an",
            "engine",
            "starts",
            "here",
            "once",
            "it",
            "ends",
        ]
    ]
    assert down.code == 0
    assert (
        f"flashsale: warning: an engine runs on this stack (flashsale up, pid {up_pid}, "
        "http://127.0.0.1:9999): its services lose their servers now; stop it (Ctrl-C in its "
        f"terminal, or kill -TERM {up_pid})"
    ) in down.err, down.err
    assert (
        f"flashsale: warning: a benchmark runs on this stack (flashsale bench gateway, pid "
        f"{bench_pid}): it loses its servers now and fails"
    ) in down.err, down.err
    assert not any(pid_alive(pid) for pid in pids.values() if pid)
    # Run again, it printed nothing: had it stopped anything, was this the right folder?
    twice = run("dev", "down")
    assert (twice.code, twice.out.strip()) == (
        0,
        f"no embedded stack is running in {scratch_home}: nothing to stop",
    ), twice.out
    after = run("dev", "status")
    assert after.code == 3
    assert after.out.count("stopped") == 3
    # Its env asked for then said "no embedded stack here", of a folder holding one, stopped.
    stopped = run("dev", "env")
    assert stopped.code == 1 and stopped.err.strip() == (
        f"flashsale: error: the embedded stack in {scratch_home} is stopped: start it with "
        "`flashsale dev up`"
    ), stopped.err


def test_failed_start_prints_log_tail_and_stops_the_rest(scratch_home: Path, run_cli: Cli) -> None:
    run = run_cli
    assert run("dev", "up").code == 0
    assert run("dev", "down").code == 0
    conf = scratch_home / "postgres" / "data" / "postgresql.conf"
    conf.write_text(conf.read_text() + "\nbogus_setting_for_test = 1\n")

    failed = run("dev", "up", "--timeout", "20")
    assert failed.code == 1
    assert "postgres" in failed.err
    assert "log tail" in failed.err
    assert "bogus_setting_for_test" in failed.err
    # The servers this failed call started were stopped again.
    assert all(row.state == "stopped" for row in DevStack(scratch_home, environ={}).status())


def test_external_servers_are_used_as_given(scratch_home: Path) -> None:
    stack = DevStack(scratch_home, environ={"REDIS_URL": "redis://example.invalid:6379/0"})
    rows = {row.name: row for row in stack.status()}
    assert rows["redis"].state == "external"
    assert rows["redis"].url == "redis://example.invalid:6379/0"
    assert rows["postgres"].state == "stopped"
    # As the engine takes it: without the line end a file gave it; blank, as unset.
    given = DevStack(scratch_home, environ={"REDIS_URL": "redis://example.invalid:6379/0\n",
                                            "DATABASE_URL": " \n"})  # fmt: skip
    assert given.external("redis") == "redis://example.invalid:6379/0"
    assert given.external("postgres") is None


def _ephemeral_range() -> range:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


def test_fresh_ports_are_outside_the_ephemeral_range() -> None:
    """A server on an ephemeral port can find it taken when it restarts: any outgoing
    connection may have been given that port meanwhile (a Redis killed mid-spike came back
    on another port, and every service kept calling the old one)."""
    ephemeral = _ephemeral_range()
    assert all(free_port() not in ephemeral for _ in range(200))
    first = free_ports(5)
    assert not set(range(first, first + 5)) & set(ephemeral)


def test_a_preferred_port_taken_for_a_moment_is_waited_for() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    threading.Timer(0.5, taken.close).start()
    assert free_port(port, patience=5) == port
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    try:
        other = free_port(held.getsockname()[1], patience=0.2)  # still taken: another port
        assert other != held.getsockname()[1]
    finally:
        held.close()


def test_a_cluster_stack_forms_comes_back_whole_and_keeps_its_layout(
    scratch_home: Path, run_cli: Cli
) -> None:
    run = run_cli
    too_small = run("dev", "up", "--redis-cluster", "2")
    assert too_small.code == 2 and "redis-cluster" in too_small.err
    alone = run("dev", "up", "--replicas", "1")
    assert alone.code == 2 and "replicas" in alone.err
    assert not (scratch_home / "stack.json").exists()  # nothing was started

    first = run("dev", "up", "--redis-cluster", "3")
    assert first.code == 0, first.err
    assert "formed a cluster of 3 primaries" in first.out
    assert read_env_file(scratch_home / "dev.env")["FLASHSALE_REDIS_CLUSTER"] == "1"
    stack = DevStack(scratch_home, environ={})
    nodes = {row.name: row for row in stack.status() if row.name.startswith("redis")}
    assert sorted(nodes) == ["redis", "redis-2", "redis-3"]
    assert all("primary, slots" in row.detail for row in nodes.values()), nodes
    urls = {name: row.url for name, row in nodes.items()}

    assert run("dev", "down").code == 0
    assert all(row.state == "stopped" for row in stack.status())
    again = run("dev", "up")  # the layout is the home's: no flag needed
    assert again.code == 0, again.err
    assert "formed" not in again.out  # it formed again by itself, on the same ports
    nodes = {row.name: row for row in stack.status() if row.name.startswith("redis")}
    assert {name: row.url for name, row in nodes.items()} == urls
    assert all("primary, slots" in row.detail for row in nodes.values()), nodes

    other = run("dev", "up", "--redis-cluster", "4")
    assert other.code != 0
    assert "already runs a Redis Cluster of 3 primaries" in other.err


def test_a_redis_loading_a_long_aof_is_waited_for_not_given_up_on(scratch_home: Path) -> None:
    """`dev up` gave up on a Redis still reading its AOF (`LOADING`) once its 30 s were over,
    as if it had failed. A dev stack's 50 MB AOF of small writes took 7-8 s to load, so about
    200 MB of them would outlast the 30 s. Loading is waited out, and said."""
    others = {"DATABASE_URL": "postgresql://u:p@127.0.0.1:1/x", "KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    stack = DevStack(scratch_home, environ=others)
    data = stack.data_dir("redis")
    data.mkdir(parents=True)
    # An AOF of many small writes: slower to load than the start's timeout below.
    command = b"*3\r\n$4\r\nSADD\r\n$1\r\ns\r\n$9\r\n%09d\r\n"
    with (data / "appendonly.aof").open("wb") as aof:
        for chunk in range(40):
            aof.write(b"".join(command % (chunk * 50_000 + i) for i in range(50_000)))
    said: list[str] = []
    try:
        stack.up(timeout=0.3, progress=said.append)
        assert any("loading its data from disk" in line for line in said), said
        rows = {row.name: row for row in stack.status()}
        assert rows["redis"].state == "running"
    finally:
        stack.down(progress=lambda _l: None)


@pytest.mark.parametrize(
    ("name", "damaged", "way_out"),
    [
        ("secrets.json", b'{"FLASHSALE_ADM', "dev down --purge"),
        ("secrets.json", b'{"FLASHSALE_ADMIN_TOKEN": 1}', "dev down --purge"),
        ("redis-cluster.json", b'{"primaries": 3, "rep', "dev down --purge"),
        ("stack.json", b"", "by their PID"),
    ],
)
def test_a_damaged_file_of_the_stack_is_named_not_a_traceback(
    scratch_home: Path, run_cli: Cli, name: str, damaged: bytes, way_out: str
) -> None:
    """A stack's own file cut short (by hand, or a disk that lied) stops ``dev up`` with one
    line naming the file and the way out, and starts no server. Nothing is generated afresh
    over it: new passwords would lock the stack out of its own data. The way out works."""
    scratch_home.mkdir(parents=True)
    (scratch_home / name).write_bytes(damaged)
    result = run_cli("dev", "up")
    assert result.code == 1, result.err
    assert result.err.startswith(f"flashsale: error: {scratch_home / name} is damaged"), \
        result.err  # fmt: skip
    assert way_out in result.err and "Traceback" not in result.err
    assert (scratch_home / name).read_bytes() == damaged
    assert not (scratch_home / "redis").exists() and not (scratch_home / "postgres").exists()
    if name == "stack.json":
        (scratch_home / name).unlink()  # no server was started by this home
    else:
        assert run_cli("dev", "down", "--purge").code == 0
        assert not (scratch_home / name).exists()


def test_the_stacks_files_are_written_whole(scratch_home: Path) -> None:
    """Secrets, state and cluster layout are written to a temporary file and renamed over the
    old one, so a kill mid-write leaves the old file or the new one, never half of one; the
    secrets stay readable by their owner only."""
    scratch_home.mkdir(parents=True)
    stack = DevStack(scratch_home, environ={})
    secrets = stack._secrets()
    assert stack._secrets() == secrets
    assert (scratch_home / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert not list(scratch_home.glob("*.tmp"))


def test_a_redis_server_that_is_a_link_to_another_name_is_known_as_ours(
    scratch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian installs ``redis-server`` as a link to ``redis-check-rdb`` (one binary that acts
    by the name it was called by), so the running server's executable is named
    ``redis-check-rdb``. The stack took it for another program: `status` said stopped, and
    `down` left it running."""
    binary, _version = find_redis()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy2(binary, bin_dir / "redis-check-rdb")
    (bin_dir / "redis-server").symlink_to("redis-check-rdb")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    others = {"DATABASE_URL": "postgresql://u:p@127.0.0.1:1/x", "KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    stack = DevStack(scratch_home, environ=others)
    try:
        stack.up(progress=lambda _l: None)
        [redis] = [row for row in stack.status() if row.name == "redis"]
        assert redis.binary == str(bin_dir / "redis-server"), redis
        assert redis.state == "running" and redis.detail == "ping ok", redis
        assert redis.pid is not None
    finally:
        stack.down(progress=lambda _l: None)
    assert not pid_alive(redis.pid)


def test_a_recorded_pid_another_server_took_since_is_not_the_stacks(
    scratch_home: Path, tmp_path: Path
) -> None:
    """After a reboot (or pids wrapping around), a recorded server's pid can be another
    process of the same program: another stack's redis-server or postgres. The stack took
    it for its own: `dev status` said it ran, `dev up` reused it, and `dev down` stopped it."""
    binary, version = find_redis()
    port = free_port()
    other = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        scratch_home.mkdir(parents=True)
        record = {"pid": other.pid, "port": port, "binary": binary, "version": version,
                  "log": str(tmp_path / "redis.log"), "identity": "another-boot:1"}  # fmt: skip
        (scratch_home / "stack.json").write_text(json.dumps({"redis": record}))
        stack = DevStack(scratch_home, environ={})
        [redis] = [row for row in stack.status() if row.name == "redis"]
        assert (redis.state, redis.pid) == ("stopped", None), redis
        stack.down(progress=lambda _l: None)
        assert other.poll() is None, "dev down stopped another program's server"
    finally:
        other.kill()
        other.wait()


def test_a_server_whose_binary_was_replaced_while_it_runs_is_still_known(tmp_path: Path) -> None:
    """A reinstall replaces the binary under a running server: its executable then reads
    "name (deleted)", and it is still the stack's to stop."""
    binary = tmp_path / "napper"
    shutil.copy2("/bin/sleep", binary)
    nap = subprocess.Popen([str(binary), "30"])
    try:
        binary.unlink()
        assert pid_alive(nap.pid, str(binary))
        assert not pid_alive(nap.pid, str(tmp_path / "other"))
    finally:
        nap.kill()
        nap.wait()


def test_the_stacks_redis_url_works_with_redis_cli(stack: Settings) -> None:
    """The RUNBOOK's first check, ``redis-cli -u "$REDIS_URL" ping``, with the redis-cli
    beside the stack's redis-server. Redis 7's redis-cli sends no AUTH for a URL with a
    password and no user name (``redis://:pw@...``), and the stack's URL was written so: it
    answered NOAUTH."""
    if DevStack(home_dir()).external("redis"):
        pytest.skip("an external Redis: its URL is the operator's")
    redis_cli = Path(find_redis()[0]).parent / "redis-cli"
    if not redis_cli.is_file():
        pytest.skip(f"no redis-cli beside the stack's redis-server ({redis_cli})")
    argv = [str(redis_cli), "-u", stack.require_redis(), "--no-auth-warning", "PING"]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    assert done.stdout.strip() == "PONG", (done.stdout, done.stderr)


async def test_a_broker_still_starting_is_waited_for_without_an_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`dev up` pings the broker until it answers; a ping before it listens is expected. It
    printed aiokafka's ERROR "Unable connect to ..." into every start that met one."""
    port = free_port()  # nothing listens there
    with caplog.at_level(logging.DEBUG), pytest.raises(KafkaConnectionError):
        await ping_kafka(f"127.0.0.1:{port}", timeout_s=0.5)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_new_cluster_is_ready_only_once_every_node_knows_every_slot() -> None:
    """A node says ``cluster_state:ok`` as soon as the slots it knows of are served
    (``cluster-require-full-coverage no``), before gossip has told it another primary's
    slots: a client that read the slot map from it then had no node for those slots (the
    clean-clone run's cluster tests failed so: "Slot 12398 is not covered by the cluster")."""
    from flashsale.cli.devstack import redis_cluster

    class Node:
        def __init__(self, info: str) -> None:
            self.info = info

        async def cluster(self, command: str) -> str:
            assert command == "INFO"
            return self.info

    whole = "cluster_state:ok\ncluster_slots_assigned:16384\n"
    partial = "cluster_state:ok\ncluster_slots_assigned:10923\n"
    nodes: Any = [Node(whole), Node(partial), Node(whole)]
    assert not await redis_cluster._all_ok(nodes)
    nodes[1].info = whole
    assert await redis_cluster._all_ok(nodes)
