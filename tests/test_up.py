"""``flashsale up``: every service starts, a crashed child is restarted, SIGTERM stops all."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.cli.serve import _cors_for, _reservation_listener
from flashsale.settings import Settings
from tests.conftest import Cli
from tests.harness import healthy


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def test_up_supervises_and_stops_cleanly(stack: Settings, cli: Cli) -> None:
    port = free_ports(UP_PORTS)
    up = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "up", "--port", str(port), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FLASHSALE_LOG_LEVEL": "INFO"},
    )
    try:
        healthy(f"http://127.0.0.1:{port}/healthz")
        healthy(f"http://127.0.0.1:{port + 1}/healthz")  # the allocator service
        healthy(f"http://127.0.0.1:{port + 2}/healthz")  # the order workers
        healthy(f"http://127.0.0.1:{port + 3}/healthz")  # the payment simulator
        healthy(f"http://127.0.0.1:{port + 4}/healthz")  # the reconciler
        healthy(f"http://127.0.0.1:{port + 5}/healthz")  # the reservations listener
        # ... which serves reservations only: the waiting room is on the gateway port.
        queue = f"http://127.0.0.1:{port + 5}/v1/sales/any/queue"
        assert requests.post(queue, timeout=5).status_code == 404
        assert requests.post(queue.replace(f":{port + 5}/", f":{port}/"),
                             timeout=5).status_code == 401  # fmt: skip
        # The audit, run from another shell as the README shows, finds the simulator `up`
        # started: it is recorded in the state folder.
        created = cli("sale", "create", "--name", "audited", "--sku", "A", "--stock", "1",
                      "--price", "100", "--currency", "EUR")  # fmt: skip
        audited = cli("audit", created.out.strip(), "--json")
        payments = json.loads(audited.out)["invariants"][3]
        assert payments["passed"] and "provider" not in payments["details"], payments
        # The gateway processes' shared metrics files, while they run...
        metrics = stack.home / "metrics" / f"gateway-{port}"
        assert any(metrics.iterdir())
        children = _children(up.pid)
        # two gateway processes, the reservations listener, allocator, workers, reconciler, psp
        assert len(children) == 7
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            now = _children(up.pid)
            if len(now) == 7 and children[0] not in now:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the killed child was not restarted")
        healthy(f"http://127.0.0.1:{port}/healthz")
        survivors = _children(up.pid)
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=30)
    log = output.decode()
    assert up.returncode == 0, log
    assert "killed by SIGKILL" in log and "restarting in" in log
    for pid in survivors:
        assert not os.path.exists(f"/proc/{pid}"), f"child {pid} outlived the supervisor"
    # ... and not after: a folder left by every run on another port piled up (221 of them on
    # a dev stack that had served a day of demos and tests).
    assert not metrics.exists()


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
    assert cors == (None if host in ("0.0.0.0", "::") else f"http://{host}:9000")  # noqa: S104
