"""``flashsale up``: every service starts, a crashed child is restarted, SIGTERM stops all."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from aiohttp import web

from flashsale.cli.checks import AFTER_PORT
from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.cli.serve import _cors_for, _reservation_listener
from flashsale.engine_record import (
    ENGINES_DIR,
    refuse_to_start_an_engine,
    running_benches,
    running_engines,
    running_simulator,
)
from flashsale.errors import ConfigError, Conflict
from flashsale.ops_endpoints import listen
from flashsale.settings import Settings
from loadtest.processes import engine
from tests.conftest import Cli
from tests.harness import flashsale_named_process, healthy, record_bench, record_engine


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


# A shop that never answers (nothing listens on port 9): `up` only says where they go.
WEBHOOKS = {
    "FLASHSALE_WEBHOOK_URL": "http://127.0.0.1:9/hooks?token=in-the-query",
    "FLASHSALE_WEBHOOK_SECRET": "whsec_" + base64.b64encode(bytes(range(32))).decode(),
    "FLASHSALE_WEBHOOK_GROUP": f"hooks-{uuid.uuid4().hex[:8]}",
}


def test_up_supervises_and_stops_cleanly(stack: Settings, cli: Cli, tmp_path: Path) -> None:
    port = free_ports(UP_PORTS)
    # The services' INFO lines go to a file: a pipe nobody reads until the end fills at 64 KiB,
    # and then the supervisor blocks on its own log line instead of restarting a child.
    written = (tmp_path / "up.log").open("wb")
    argv = ["up", "--port", str(port), "--workers", "2", "--hung-after", "2"]
    up = subprocess.Popen(
        [sys.executable, "-m", "flashsale", *argv],
        stdout=written,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FLASHSALE_LOG_LEVEL": "INFO", **WEBHOOKS},
    )
    try:
        healthy(f"http://127.0.0.1:{port}/healthz")
        healthy(f"http://127.0.0.1:{port + 1}/healthz")  # the allocator service
        healthy(f"http://127.0.0.1:{port + 2}/healthz")  # the order workers
        healthy(f"http://127.0.0.1:{port + 3}/healthz")  # the payment simulator
        healthy(f"http://127.0.0.1:{port + 4}/healthz")  # the reconciler
        healthy(f"http://127.0.0.1:{port + 5}/healthz")  # the reservations listener
        for service in (port, port + 1, port + 2, port + 4):  # its loop's lag, measured
            deadline = time.monotonic() + 10
            while True:  # a first timer is 0.25 s after the start of the loop
                text = requests.get(f"http://127.0.0.1:{service}/metrics", timeout=5).text
                found = re.search(r"^flashsale_event_loop_lag_seconds_count (\S+)$", text, re.M)
                assert found, (service, text[-1500:])
                if float(found.group(1)) > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert float(found.group(1)) > 0, (service, text[-1500:])
        # ... which serves reservations only: the waiting room is on the gateway port.
        queue = f"http://127.0.0.1:{port + 5}/v1/sales/any/queue"
        assert requests.post(queue, timeout=5).status_code == 404
        assert requests.post(queue.replace(f":{port + 5}/", f":{port}/"),
                             timeout=5).status_code == 401  # fmt: skip
        # A second engine on the same stack started a payment simulator of its own: the two
        # engines' workers share the consumer group, so each simulator knew only some of the
        # charges (a demo run beside `up` failed its audit: "confirmed orders without
        # capture"), and the second removed the first's record when it stopped.
        other = free_ports(UP_PORTS)
        second = subprocess.run(
            [sys.executable, "-m", "flashsale", "up", "--port", str(other)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert second.returncode == 1, second
        assert second.stderr.startswith(
            f"flashsale: error: an engine is running on this stack: its payment simulator "
            f"answers at http://127.0.0.1:{port + 3}"
        ), second.stderr
        with pytest.raises(Conflict), engine(stack, other, tmp_path / "demo-engine.log"):
            pass  # the demo, a spike --embedded and the fault suite start theirs with this
        # The audit, run from another shell as the README shows, finds the simulator `up`
        # started: it is recorded in the state folder.
        created = cli("sale", "create", "--name", "audited", "--sku", "A", "--stock", "1",
                      "--price", "100", "--currency", "EUR")  # fmt: skip
        audited = cli("audit", created.out.strip(), "--json")
        payments = json.loads(audited.out)["invariants"][3]
        assert payments["passed"] and "provider" not in payments["details"], payments
        # Where the engine runs, from another shell: `dev status` named the servers only,
        # and its address was in the terminal `up` ran in.
        base = f"http://127.0.0.1:{port}"
        shown = cli("dev", "status")
        [row] = [line for line in shown.out.splitlines() if f" {base} " in line]
        assert row.startswith("engine    running   "), shown.out
        assert f"pid {up.pid} " in row and f"live page {base}/admin/" in row, row
        assert f"reservations http://127.0.0.1:{port + 5}" in row, row
        assert f"allocator :{port + 1}" in row and f"payments :{port + 3}" in row, row
        # The gateway processes' shared metrics files, while they run...
        metrics = stack.home / "metrics" / f"gateway-{port}"
        assert any(metrics.iterdir())
        children = _children(up.pid)
        # two gateway processes, the reservations listener, allocator, workers, reconciler, psp
        assert len(children) == 7
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        now = children
        while time.monotonic() < deadline:
            now = _children(up.pid)
            if len(now) == 7 and children[0] not in now:
                break
            time.sleep(0.2)
        restarted = len(now) == 7 and children[0] not in now
        if restarted:
            healthy(f"http://127.0.0.1:{port}/healthz")
        # A child that hangs (here paused: its process lives, its loop answers nothing) was
        # left as it was, for good; it is killed and started again.
        paused = children[1]
        os.kill(paused, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _children(up.pid)
            if len(now) == 7 and paused not in now:
                break
            time.sleep(0.2)
        replaced = len(now) == 7 and paused not in now
        survivors = _children(up.pid)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(30)
        written.close()
    log = (tmp_path / "up.log").read_text()
    # Where the pages are, said at the start: an operator had to find /admin/ in the README.
    assert (
        f"pages: operators' live sale page {base}/admin/ (the admin token), a sale's "
        f"waiting room {base}/sales/SALE" in log
    ), log[:2000]
    # Where the order webhooks go, said too: without the token their URL's query may carry.
    assert "; order webhooks to http://127.0.0.1:9/hooks?token=***; pages:" in log, log[:2000]
    assert "in-the-query" not in log
    # Each gateway process, once its app is made and before it listens, keeps what it made
    # out of the garbage collector's walks (flashsale/heap.py): a full walk of them held a
    # gateway's loop 93 to 141 ms during a spike.
    settled = re.findall(r"gateway \(pid \d+\) settled its heap: [\d,]+ objects", log)
    assert len(settled) >= 3, log[:3000]  # two gateways and the reservations listener
    # the supervisor's own account, should it not have restarted the child
    assert restarted, f"the killed child {children[0]} was not restarted: {now}\n{log[-4000:]}"
    assert up.returncode == 0, log
    assert "killed by SIGKILL" in log and "restarting in" in log
    assert replaced, f"the paused child {paused} was not replaced: {now}\n{log[-4000:]}"
    assert f"(pid {paused}) has not answered for" in log, log[-4000:]
    for pid in survivors:
        assert not os.path.exists(f"/proc/{pid}"), f"child {pid} outlived the supervisor"
    assert f" {base} " not in cli("dev", "status").out  # its record goes with it
    # ... and not after: a folder left by every run on another port piled up (221 of them on
    # a dev stack that had served a day of demos and tests).
    assert not metrics.exists()


def test_the_services_stop_when_their_supervisor_is_killed(stack: Settings) -> None:
    """``kill -9`` of ``flashsale up`` (or the OOM killer) left all its services running,
    each in a session of its own, holding the ports the next ``up`` wanted and consuming
    its partitions, with nobody to restart or stop them."""
    port = free_ports(UP_PORTS)
    up = subprocess.Popen([sys.executable, "-m", "flashsale", "up", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    children: list[int] = []
    try:
        for offset in range(UP_PORTS):
            healthy(f"http://127.0.0.1:{port + offset}/healthz")
        children = _children(up.pid)
        assert len(children) == 7, children  # two gateways, and one of each other service
        up.kill()
        up.wait(10)
        deadline = time.monotonic() + 30  # their graceful stop included
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)], "services outlived their supervisor"
    finally:
        up.kill()
        for pid in children:  # a failed run leaves nothing behind (and kills only its own)
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if _alive(pid) and b"flashsale" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_an_audit_with_no_provider_says_what_to_set(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))  # no `flashsale up` recorded here
    monkeypatch.delenv("FLASHSALE_PSP_URL", raising=False)
    created = cli("sale", "create", "--name", "unaudited", "--sku", "A", "--stock", "1",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    audited = cli("audit", created.out.strip(), "--json")
    payments = json.loads(audited.out)["invariants"][3]
    assert not payments["passed"]
    assert "set FLASHSALE_PSP_URL" in payments["details"]["provider"]
    assert str(tmp_path / "engine.env") in payments["details"]["provider"]


@pytest.mark.parametrize(
    ("host", "workers", "url", "announced", "said"),
    [
        ("127.0.0.1", 1, None, "http://127.0.0.1:9005", "reservations x1 on http://127.0.0.1:9005"),
        ("0.0.0.0", 1, None, None, "not announced: set FLASHSALE_RESERVATIONS_URL"),  # noqa: S104
        ("::", 2, "https://r.example", None, "(announced as https://r.example)"),
        ("127.0.0.1", 0, None, None, "no reservations listener"),
        ("::1", 1, None, "http://[::1]:9005", "reservations x1 on http://[::1]:9005"),
    ],
)  # fmt: skip
def test_up_announces_its_reservations_listener_only_where_it_can_be_called(
    host: str, workers: int, url: str | None, announced: str | None, said: str
) -> None:
    """The gateways are told the listener's address unless the operator set a public one, or
    it listens on every interface (nobody's address), or there is none."""
    settings = dataclasses.replace(Settings(home=Path("/nonexistent")), reservations_url=url)
    line, env = _reservation_listener(host, 9005, workers, settings)
    assert said in line
    assert env.get("FLASHSALE_RESERVATIONS_URL") == announced
    cors = _cors_for(host, 9000, settings).get("FLASHSALE_CORS_ORIGINS")
    origin = f"http://[{host}]:9000" if ":" in host else f"http://{host}:9000"
    assert cors == (None if host in ("0.0.0.0", "::") else origin)  # noqa: S104


def test_up_on_an_ipv6_address_serves(stack: Settings) -> None:
    """``--host ::1``: the addresses `up` hands its services (the payment simulator's, the
    reservations listener's, the page's origin) put the address in brackets, as a URL must;
    without them every service refused its environment and was restarted in a loop."""
    port = free_ports(UP_PORTS)
    up = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "up", "--host", "::1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        for offset in (0, 1, 2, 3, 4, 5):  # every service, the workers' probe asking the psp
            healthy(f"http://[::1]:{port + offset}/readyz")
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=30)
    assert up.returncode == 0, output.decode()[-3000:]
    assert f"http://[::1]:{port}" in output.decode()


@contextlib.contextmanager
def _held(port: int, *, reuse_port: bool = False) -> Iterator[None]:
    """Another process's listener on ``port``. With SO_REUSEADDR, as a server binds: a port an
    earlier test left in TIME_WAIT (which free_ports counts as free) is bound all the same."""
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", port))
        busy.listen()
        yield


def _refused(*argv: str) -> tuple[int, str]:
    """Run ``flashsale ARGV`` that should refuse at once: (exit code, stderr). One that is
    still running after 20 s (it started serving) is stopped, with its whole group."""
    child = subprocess.Popen([sys.executable, "-m", "flashsale", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        _, err = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)
        child.communicate(timeout=30)
        raise AssertionError(f"flashsale {' '.join(argv)} started instead of refusing") from None
    return child.returncode, err


@pytest.mark.parametrize(
    ("taken", "field"),
    [(0, "--port"), (1, "allocator-port"), (4, "reconciler-port"), (5, "reservation-port")],
)
def test_up_refuses_a_port_another_process_listens_on(
    stack: Settings, taken: int, field: str
) -> None:
    """Every port `up` would listen on is checked before anything starts. A taken gateway port
    would otherwise be shared (the gateway binds with SO_REUSEPORT: a second engine answering
    on the first one's port), and a taken ops port made the allocator exit and be restarted
    forever, each time saying "a server is unavailable"."""
    port = free_ports(UP_PORTS)
    with _held(port + taken):
        code, err = _refused("up", "--port", str(port), "--workers", "1")
    assert code == 2, err
    assert err.strip() == (
        f"flashsale: error: {field}: 127.0.0.1:{port + taken} is in use by another process"
    ), err


def test_up_refuses_a_port_for_a_process_it_would_not_start(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port given for the reservations listener with none asked for, or for the payment
    simulator with FLASHSALE_PSP_URL naming the provider, was ignored without a word."""
    port = free_ports(UP_PORTS)
    code, err = _refused("up", "--port", str(port), "--reservation-workers", "0",
                         "--reservation-port", str(port + 5))  # fmt: skip
    assert (code, err.strip()) == (2, "flashsale: error: --reservation-port: goes with "
                                      "--reservation-workers of 1 or more"), err  # fmt: skip
    monkeypatch.setenv("FLASHSALE_PSP_URL", "http://127.0.0.1:9")
    code, err = _refused("up", "--port", str(port), "--psp-port", str(port + 3))
    said = "--psp-port: FLASHSALE_PSP_URL names the payment provider: no simulator is started"
    assert (code, err.strip()) == (2, f"flashsale: error: {said}"), err


def test_a_gateway_of_several_processes_refuses_a_taken_port(stack: Settings) -> None:
    port = free_ports(1)
    with _held(port, reuse_port=True):  # as another gateway binds
        code, err = _refused("gateway", "--port", str(port), "--workers", "2")
    assert code == 2, err
    assert err.strip() == f"flashsale: error: --port: 127.0.0.1:{port} is in use by another process"


@pytest.mark.parametrize(("argv", "flag"), [
    (("gateway", "--port"), "--port"), (("psp", "--port"), "--port"),
    (("allocator", "--ops-port"), "--ops-port"), (("workers", "--ops-port"), "--ops-port"),
    (("reconcile", "--ops-port"), "--ops-port"),
])  # fmt: skip
def test_a_service_refuses_a_taken_port_before_it_starts(
    stack: Settings, argv: tuple[str, ...], flag: str
) -> None:
    """`flashsale allocator --ops-port P` with P taken said "allocator service starting",
    then "cannot listen on 127.0.0.1:P: address already in use" with exit 1, as did the
    gateway of one process, the workers, the reconciler and the simulator: a flag's bad value,
    said late and not by the flag, where `up` and a gateway of several processes check their
    ports first."""
    port = free_ports(1)
    with _held(port):
        code, err = _refused(*argv, str(port))
    assert (code, err.strip()) == (
        2,
        f"flashsale: error: {flag}: 127.0.0.1:{port} is in use by another process",
    ), err


def test_the_simulators_journal_must_be_a_file(stack: Settings, tmp_path: Path) -> None:
    """`psp --journal /tmp` answered "/tmp: Is a directory", exit 1, naming no flag."""
    code, err = _refused("psp", "--port", str(free_ports(1)), "--journal", str(tmp_path))
    assert (code, err.strip()) == (2, f"flashsale: error: --journal: {tmp_path} is a folder"), err


def test_up_refuses_two_services_on_one_port(stack: Settings) -> None:
    port = free_ports(UP_PORTS)
    code, err = _refused("up", "--port", str(port), "--workers-port", str(port + 1))
    assert code == 2, err
    assert "workers-port" in err and "allocator-port" in err, err


@pytest.mark.parametrize("port", [65535, 65531])
def test_up_on_a_port_too_high_for_the_ports_after_it_names_the_flag_given(
    stack: Settings, port: int
) -> None:
    """The services' own ports default to PORT+1..PORT+5 (AFTER_PORT): a --port near the top
    used to be refused as "allocator-port: ... got '65536'", a flag and a value nobody typed."""
    code, err = _refused("up", "--port", str(port))
    assert code == 2, err
    assert err.strip() == (
        f"flashsale: error: --port: {port} leaves no room for the ports after it (PORT+1 to "
        f"PORT+5): give a port up to 65530, or each of "
        + ", ".join(f"--{flag}" for flag in AFTER_PORT[65535 - port :])
    ), err


async def test_a_port_taken_after_the_check_is_said_as_such() -> None:
    """Not "a server is unavailable": nothing the service depends on is down. (The flags'
    check comes first; a port taken between it and the listen is said here.)"""
    port = free_ports(1)
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        with _held(port), pytest.raises(ConfigError) as taken:
            await listen(runner, "127.0.0.1", port)
    finally:
        await runner.cleanup()
    assert str(taken.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"


def test_the_payment_simulator_says_where_it_listens_only_once_it_does() -> None:
    """It printed "psp simulator on http://127.0.0.1:PORT" before it tried the port, then
    that the port was taken."""
    port = free_ports(1)
    with _held(port):
        ran = subprocess.run([sys.executable, "-m", "flashsale", "psp", "--port", str(port)],
                             check=False, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert "is in use by another process" in ran.stderr, ran
    assert "psp simulator on" not in ran.stdout, ran


@pytest.mark.parametrize("command", [("reconcile", "--ops-port"), ("gateway", "--port"),
                                     ("up", "--port")])  # fmt: skip
def test_a_host_that_is_no_address_is_named(stack: Settings, command: tuple[str, str]) -> None:
    """``--host 999.1.1.1`` (a typo) was "a server is unavailable: gaierror": nothing the
    service depends on is down, the address it was given names nothing."""
    port = free_ports(UP_PORTS)
    code, err = _refused(command[0], "--host", "999.1.1.1", command[1], str(port))
    # checked before anything starts, as the ports are
    assert (code, err.strip()) == (2, "flashsale: error: --host: cannot listen on 999.1.1.1: "
                                      "no such address"), err  # fmt: skip


def test_a_record_left_by_a_killed_engine_refuses_no_new_one(tmp_path: Path) -> None:
    """``kill -9`` of ``up`` leaves its record behind; its simulator died with it. So does one
    of a benchmark that makes sales."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens there once the socket is closed
    (tmp_path / "engine.env").write_text(f"export FLASHSALE_PSP_URL=http://127.0.0.1:{closed}\n")
    assert running_simulator(tmp_path) is None
    # Nor is it shown as running: its pid is gone, or another program's since.
    no_pid = int(Path("/proc/sys/kernel/pid_max").read_text())  # pids stay below it
    with subprocess.Popen(["sleep", "30"]) as other, contextlib.ExitStack() as stack:
        try:
            for port, pid in ((8000, other.pid), (8100, no_pid)):
                record_engine(tmp_path, port, pid, f"http://127.0.0.1:{port}")
                record_bench(tmp_path, pid, "gateway")
            (tmp_path / ENGINES_DIR / "8200.json").write_text('{"pid": ')  # a full disk's
            # After a reboot (or pids wrapping around) the pid is another flashsale process's
            # now: taken for the engine, it refused every benchmark and was shown as running.
            reused = stack.enter_context(flashsale_named_process())
            record_engine(tmp_path, 8300, reused, "http://127.0.0.1:8300", "another-boot:1")
            record_bench(tmp_path, reused, "gateway", "another-boot:1")
            assert running_engines(tmp_path) == running_benches(tmp_path) == []
            refuse_to_start_an_engine(tmp_path, own_simulator=True)  # no Conflict
            shown = subprocess.run(
                [sys.executable, "-m", "flashsale", "dev", "status"], capture_output=True,
                text=True, timeout=30, check=False,
                env={**os.environ, "FLASHSALE_HOME": str(tmp_path)},
            )  # fmt: skip
        finally:
            other.kill()
    assert "no engine runs on this stack: `flashsale up` starts one" in shown.stdout, shown
