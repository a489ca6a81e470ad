"""Spike tests for SREs: the locust spike headless (through ``flashsale loadtest spike
--embedded``) and distributed (a master and a worker on loopback), each judged by the audit;
and the verdict's judgement on its own."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.settings import Settings
from loadtest.processes import engine
from loadtest.spike_sale import copy_sale
from loadtest.verdict import judge
from tests.conftest import Cli, Db
from tests.harness import (
    ADMIN,
    create_live_sale,
    flashsale_named_process,
    live_gateway,
    record_engine,
    run_bounded,
    sale_spec,
)
from tests.tls_authority import make_authority

# Not imported here: locust patches the interpreter with gevent, which the asyncio tests of
# this process must not run under.
LOCUSTFILE = str(Path(__file__).resolve().parent.parent / "loadtest" / "locustfile.py")


@pytest.mark.heavy
def test_headless_spike_through_the_cli(stack: Settings, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flashsale", "loadtest", "spike", "--embedded", "--buyers", "300",
         "--stock", "30", "--ramp", "2", "--hold", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(), check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "buyers answered: 300/300" in out and "sold 30/30, oversold 0" in out, out
    # 150 buyers a second, as a spike means to: locust's warning that it ramps "very high"
    # read as a fault of the run.
    assert "spawn rate is very high" not in out + result.stderr, out + result.stderr
    assert "audit: PASSED" in out
    # The engine stops with the run, the stack does not: said, as the demo says it (three
    # servers were left running unsaid).
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("The stack keeps running; stop it with `"), out
    assert last.endswith("flashsale dev down`."), out
    with (tmp_path / "spike_stats.csv").open() as stats:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(stats)}
    answered = int(rows["ANSWER", "reserved"]["Request Count"]) + int(
        rows["ANSWER", "sold_out"]["Request Count"])  # fmt: skip
    assert answered == 300 and int(rows["POST", "join"]["Request Count"]) == 300
    assert (tmp_path / "spike.html").stat().st_size > 0


@pytest.mark.heavy
def test_distributed_spike_master_and_worker(stack: Settings, tmp_path: Path) -> None:
    # One run of free ports for the engine and the locust master's two, so they cannot overlap.
    port = free_ports(UP_PORTS + 2)
    master_port = port + UP_PORTS
    env = {**os.environ, "FLASHSALE_ADMIN_TOKEN": stack.admin_token.current(),
           "FLASHSALE_BUYER_TOKEN_SECRET": stack.buyer_token_secret.reveal()}  # fmt: skip
    common = ["-f", LOCUSTFILE, "--buyers", "200", "--stock", "20", "--ramp", "2", "--hold", "1"]
    with engine(stack, port, tmp_path / "engine.log"):
        for offset in range(UP_PORTS):
            _healthy(f"http://127.0.0.1:{port + offset}/healthz")
        master = subprocess.Popen(
            [sys.executable, "-m", "locust", *common, "--master", "--headless",
             "--expect-workers", "1", "--master-bind-port", str(master_port),
             "--host", f"http://127.0.0.1:{port}", "--only-summary"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        worker = subprocess.Popen(
            [sys.executable, "-m", "locust", *common, "--worker", "--master-host", "127.0.0.1",
             "--master-port", str(master_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        try:
            out, _ = master.communicate(timeout=240)
        finally:
            worker.wait(30)
    text = out.decode()
    assert master.returncode == 0, text
    assert "buyers answered: 200/200" in text and "audit: PASSED" in text, text


def test_a_spike_rehearses_a_sale_made_for_the_day_through_the_engines_rate_limits(
    stack: Settings, cli: Cli, tmp_path: Path
) -> None:
    """`--sale ID` rehearses a copy of an existing sale made for the run, as the sale will
    run: on an engine run as in production, its per-IP limit on. It rehearsed the sale itself,
    leaving its buyers and orders in it (run against the day's real sale, it would sell the
    stock to the load machines): the sale is now left as it was, and `--in-place` rehearses
    it. Its buyers reserved the spike's own SKU, SPIKE-1, which such a sale lacks (every
    reservation refused 404), and met its proof of work unsolved (every join refused 403
    challenge_required); the verdict counted one of its products. Every buyer of one load
    machine comes from one address, so joins and reservations meet 429: a buyer retries them
    at the Retry-After, as the waiting-room page does, and the spike still passes, saying what
    it waited out."""
    products = [{"sku": sku, "stock": 10, "price": 12900, "currency": "EUR"}
                for sku in ("SNK-41", "SNK-42")]  # fmt: skip
    path = tmp_path / "sale.json"
    path.write_text(json.dumps({"name": "Rehearsal", "join_challenge": 4, "skus": products}))
    sale_id = cli("sale", "create", "--file", str(path)).out.strip()
    assert cli("sale", "preload", sale_id).code == 0
    port = free_ports(UP_PORTS)
    with engine(stack, port, tmp_path / "engine.log", env={"FLASHSALE_RATE_PER_IP": "10,10"}):
        for offset in range(UP_PORTS):
            _healthy(f"http://127.0.0.1:{port + offset}/healthz")
        assert cli("sale", "pause", sale_id).code == 0  # its buyers would wait out the drain
        paused = subprocess.run(
            [sys.executable, "-m", "flashsale", "loadtest", "spike", "--sale", sale_id,
             "--in-place", "--host", f"http://127.0.0.1:{port}", "--out", str(tmp_path)],
            capture_output=True, text=True, timeout=60, env=os.environ.copy(), check=False,
        )  # fmt: skip
        said = f"--sale {sale_id}: the sale is paused: `flashsale sale resume {sale_id}` first"
        assert (paused.returncode, paused.stderr.strip()) == (1, f"flashsale: error: {said}")
        assert cli("sale", "resume", sale_id).code == 0
        result = subprocess.run(
            [sys.executable, "-m", "flashsale", "loadtest", "spike", "--sale", sale_id,
             "--buyers", "60", "--ramp", "1", "--hold", "0", "--host", f"http://127.0.0.1:{port}",
             "--out", str(tmp_path)],
            capture_output=True, text=True, timeout=240, env=os.environ.copy(), check=False,
        )  # fmt: skip
    text = result.stdout + result.stderr
    with (tmp_path / "spike_stats.csv").open() as stats:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(stats)}
    failed = {row: int(r["Failure Count"]) for row, r in rows.items() if int(r["Failure Count"])}
    assert not failed, (failed, (tmp_path / "spike_failures.csv").read_text())
    assert int(rows["GET", "challenge"]["Request Count"]) >= 60, rows.keys()
    assert int(rows["POST", "join"]["Request Count"]) > 60, "the limit never bit: no test"
    assert result.returncode == 0, text
    assert "buyers answered: 60/60" in text and "sold 20/20, oversold 0" in text, text
    assert "audit: PASSED" in text, text
    [copy] = re.findall(r"^== rehearsing (sale-\w+), a copy of " + sale_id, text, re.M)
    assert f"spike verdict for sale {copy}" in text, text
    original = cli("sale", "status", sale_id, "--json")
    status = json.loads(original.out)
    assert status["queue"]["joined"] == 0 and status["revenue"] == {}, status
    assert [(s["available"], s["held"], s["sold"]) for s in status["skus"]] == [(10, 0, 0)] * 2
    [run] = [line for line in text.splitlines() if line.startswith("== -m locust")]
    assert "--stock" not in run and "--buckets" not in run, run  # shown as the run it was
    # A spike slowed by the limit says so: locust counts a 429 waited out as a success, and
    # the verdict's "every answer within 20 s" did not say why.
    waited = int(rows["WAITED", "429"]["Request Count"])
    assert f"waited out at their Retry-After: {waited:,} answers 429 (rate limited)" in text
    assert "FLASHSALE_RATE_PER_IP=off" in text, text


def _healthy(url: str, patience: float = 60) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + patience
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} never became healthy"
        time.sleep(0.2)


def test_the_verdict_says_what_the_buyers_waited_out_and_why() -> None:
    audit = {"passed": True, "invariants": []}
    quiet = judge("sale-x", audit, 20, 20, answered=100, buyers=100, slowest_s=3.0)
    assert not any("waited" in line for line in quiet.lines), quiet.lines
    busy = judge("sale-x", audit, 20, 20, answered=100, buyers=100, slowest_s=3.0,
                 waited={503: 7})  # fmt: skip
    assert busy.ok and busy.lines[-1].endswith(
        "0 answers 429 (rate limited), 7 answers 503 (at capacity, or a server down)"
    ), busy.lines
    limited = judge("sale-x", audit, 20, 20, answered=100, buyers=100, slowest_s=3.0,
                    waited={429: 1234})  # fmt: skip
    assert "1,234 answers 429" in limited.lines[-2], limited.lines
    assert "FLASHSALE_RATE_PER_IP=off" in limited.lines[-1], limited.lines


@pytest.mark.parametrize(("audit", "sold", "answered", "ok", "says"), [
    ({"passed": True, "invariants": []}, 20, 100, True, "audit: PASSED"),
    ({"passed": False, "invariants": [{"name": "1. no oversell", "passed": False}]}, 20, 100,
     False, "FAILED: 1. no oversell"),
    ({"passed": False, "invariants": [{"name": "2. conservation", "passed": False, "details": {
        "cannot_compare": "pipeline not drained: 3 open orders"}}]}, 20, 100, False,
     "FAILED: 2. conservation; cannot compare: pipeline not drained: 3 open orders"),
    ({"passed": True, "invariants": []}, 21, 100, False, "oversold 1"),
    ({"passed": True, "invariants": []}, 20, 99, False, "1 buyer got no definitive answer"),
    ({}, 20, 100, False, "audit: FAILED"),  # no audit at all is no pass
    # A spike leaves its sale running: the audit holds as of now, and the verdict says so.
    ({"passed": True, "invariants": [], "facts": {"sale_state": "live"}}, 20, 100, True,
     "audit: PASSED (the sale is live: this holds as of now; audit it again after its end)"),
])  # fmt: skip
def test_the_verdict_fails_the_run_on_any_violation(
    audit: dict[str, Any], sold: int, answered: int, ok: bool, says: str
) -> None:
    verdict = judge("sale-x", audit, sold, 20, answered=answered, buyers=100, slowest_s=3.0)
    assert verdict.ok is ok
    assert any(says in line for line in verdict.lines), verdict.lines


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once it is closed


def _spike(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """(exit code, stderr) of a spike told to ramp for 1 s, hold none and drain for 60 s at
    most: one that cannot start must say so and stop, not wait for buyers who never come."""
    code, _out, err = run_bounded(
        [sys.executable, "-m", *argv, "--buyers", "5", "--ramp", "1", "--hold", "0"],
        {**env, "FLASHSALE_SPIKE_DRAIN": "60"},
        50,
    )
    return code, err


def _env(admin: str, buyer_secret: str) -> dict[str, str]:
    return {**os.environ, "FLASHSALE_ADMIN_TOKEN": admin,
            "FLASHSALE_BUYER_TOKEN_SECRET": buyer_secret}  # fmt: skip


def test_a_spike_at_an_engine_that_is_not_there_stops_at_once_saying_so(
    stack: Settings, tmp_path: Path
) -> None:
    """It waited out the ramp, the hold and the drain (135 s by default) behind two
    tracebacks, with no buyer ever sent."""
    host = f"http://127.0.0.1:{_closed_port()}"
    env = _env(stack.admin_token.current(), stack.buyer_token_secret.reveal())
    code, err = _spike(["flashsale", "loadtest", "spike", "--host", host, "--out", str(tmp_path)],
                       env)  # fmt: skip
    assert code == 1, err
    assert err.strip().splitlines() == [
        f"flashsale: error: --host: nothing answers at {host}: start the engine (flashsale up) "
        "or run the spike with --embedded"
    ], err
    code, err = _spike(["locust", "-f", LOCUSTFILE, "--headless", "--host", host], env)
    assert code == 1, err
    assert f"the spike cannot start: nothing answers at {host}" in err, err
    assert "Traceback" not in err, err


def test_a_spike_without_host_goes_to_the_engine_running_on_the_stack(
    stack: Settings, tmp_path: Path
) -> None:
    """`flashsale up --port 8280` ran on the stack, and a spike without --host said "nothing
    answers at http://127.0.0.1:8080: start the engine": the engine the stack records is the
    default (here one whose gateway has just gone: its address is the one named)."""
    host = f"http://127.0.0.1:{_closed_port()}"
    env = {**_env(stack.admin_token.current(), stack.buyer_token_secret.reveal()),
           "FLASHSALE_HOME": str(tmp_path)}  # fmt: skip
    with flashsale_named_process() as pid:
        record_engine(tmp_path, 8280, pid, host)
        code, err = _spike(["flashsale", "loadtest", "spike", "--out", str(tmp_path)], env)
        assert (code, err.strip().splitlines()[-1]) == (1, (
            f"flashsale: error: --host: nothing answers at {host}: start the engine "
            "(flashsale up) or run the spike with --embedded")), err  # fmt: skip
        record_engine(tmp_path, 8380, pid, host + "0")
        code, err = _spike(["flashsale", "loadtest", "spike", "--out", str(tmp_path)], env)
    assert (code, err.strip().splitlines()[-1]) == (2, (
        f"flashsale: error: --host: 2 engines run on this stack ({host}, {host}0): "
        "name one")), err  # fmt: skip


def test_a_spike_at_an_engine_whose_certificate_is_not_trusted_says_so(
    stack: Settings, tmp_path: Path
) -> None:
    """A staging gateway on https with its own CA: "nothing answers at https://…", where the
    TLS handshake had failed; the spike's own calls (requests) trust certifi's CAs, not the
    system's, so the line says which bundle to give."""
    authority = make_authority(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.socket = authority.server.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"https://127.0.0.1:{server.server_address[1]}"
    env = _env(stack.admin_token.current(), stack.buyer_token_secret.reveal())
    try:
        code, err = _spike(["flashsale", "loadtest", "spike", "--host", host, "--out",
                            str(tmp_path)], env)  # fmt: skip
        assert (code, err.strip().splitlines()) == (1, [
            f"flashsale: error: {host}: its certificate is not trusted: unable to get local "
            "issuer certificate; the spike's own calls trust certifi's CAs, or those of the "
            "bundle REQUESTS_CA_BUNDLE names"]), err  # fmt: skip
        code, err = _spike(
            ["flashsale", "loadtest", "spike", "--host", host, "--out", str(tmp_path)],
            {**env, "REQUESTS_CA_BUNDLE": str(authority.ca_file)},
        )
        assert code == 1 and "certificate" not in err, err  # past TLS: not the engine's gateway
    finally:
        server.shutdown()
        server.server_close()


def test_locust_run_without_a_host_says_so_in_one_line(stack: Settings) -> None:
    """Buyers were spawned anyway and each failed in locust's own code: a traceback under the
    one line that said what was wrong."""
    env = _env(stack.admin_token.current(), stack.buyer_token_secret.reveal())
    code, err = _spike(["locust", "-f", LOCUSTFILE, "--headless"], env)
    assert code == 1, err
    assert "the spike cannot start: --host is not given" in err, err
    assert "Traceback" not in err and "StopTest" not in err, err


def test_a_rehearsal_of_a_sale_that_opens_days_later_is_refused_at_once(
    stack: Settings, tmp_path: Path
) -> None:
    """`--sale` of a sale opening in three days: its buyers registered in its pre-queue and
    polled it for as long as the spike ran, which printed nothing after its command line (the
    answers are timed from the opening). A copy made as the README said (`sale create --file`
    of the sale's template) kept its dates, and so its opening."""
    spec = sale_spec("Later drop", "S1", 3, starts_in=3 * 86400)
    spec["ends_at"] = (datetime.now(UTC) + timedelta(days=3, hours=1)).isoformat()
    env = _env(ADMIN, stack.buyer_token_secret.reveal())
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, spec=spec)
        cli = _spike(["flashsale", "loadtest", "spike", "--sale", sale, "--in-place",
                      "--host", gw.base_url, "--out", str(tmp_path)], env)  # fmt: skip
        direct = _spike(["locust", "-f", LOCUSTFILE, "--headless", "--host", gw.base_url,
                         "--sale", sale], env)  # fmt: skip
        status = requests.get(f"{gw.base_url}/admin/v1/sales/{sale}", timeout=10,
                              headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
        # Without --in-place the rehearsal is of a copy that opens when asked, now by default
        copy = copy_sale(gw.base_url, ADMIN, sale, opens_in_s=0)
        copied = requests.get(f"{gw.base_url}/admin/v1/sales/{copy}", timeout=10,
                              headers={"Authorization": f"Bearer {ADMIN}"}).json()  # fmt: skip
    assert copy != sale and copied["sale"]["name"] == "rehearsal of Later drop", copied
    assert copied["sale"]["state"] == "live" and copied["sale"]["preloaded_at"], copied
    assert [(s["sku"], s["stock_total"], s["available"]) for s in copied["skus"]] == [
        ("S1", 3, 3)], copied  # fmt: skip
    starts = datetime.fromisoformat(spec["starts_at"]).astimezone(UTC)
    says = (
        f"--sale {sale}: it opens in 3 days ({starts:%Y-%m-%d %H:%M} UTC), and its buyers "
        "would wait in its pre-queue until then: rehearse a copy that opens sooner "
        f"(`flashsale loadtest spike --sale {sale}`, without --in-place, makes one)"
    )
    assert cli[0] == 1, cli[1]
    assert cli[1].strip().splitlines() == [f"flashsale: error: {says}"], cli[1]
    assert direct[0] == 1, direct[1]
    assert f"the spike cannot start: {says}" in direct[1], direct[1]
    assert status.json()["queue"]["pre_queue"] == 0  # nobody registered in the sale's draw


def test_a_rehearsal_says_that_its_buyers_wait_for_the_opening(stack: Settings) -> None:
    """A sale opening in five minutes: the run waited for it without a word after locust's
    command line, its answers being timed from the opening."""
    from loadtest.spike import _check

    said: list[str] = []
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, starts_in=300)
        _check(gw.base_url, ADMIN, sale, said.append)
    assert said == [f"== {sale} opens in 5 min: its buyers wait in its pre-queue until then, "
                    "and their answers are timed from the opening"], said  # fmt: skip


def test_a_spike_without_the_buyer_token_secret_stops_before_making_a_sale(
    stack: Settings, db: Db
) -> None:
    env = {k: v for k, v in _env(stack.admin_token.current(), "").items()
           if k != "FLASHSALE_BUYER_TOKEN_SECRET"}  # fmt: skip
    before = db.val("SELECT count(*) FROM sales")
    with live_gateway(stack) as gw:
        code, err = _spike(["locust", "-f", LOCUSTFILE, "--headless", "--host", gw.base_url], env)
    assert code == 1, err
    assert "the spike cannot start: FLASHSALE_BUYER_TOKEN_SECRET is not set" in err, err
    assert "Traceback" not in err, err
    assert db.val("SELECT count(*) FROM sales") == before  # no sale nobody can buy from


def test_a_spike_with_an_admin_token_the_engine_refuses_stops_at_once_saying_so(
    stack: Settings, tmp_path: Path
) -> None:
    wrong = _env("not-the-engine-admin-token", stack.buyer_token_secret.reveal())
    with live_gateway(stack) as gw:
        cli = _spike(["flashsale", "loadtest", "spike", "--host", gw.base_url,
                      "--out", str(tmp_path)], wrong)  # fmt: skip
        direct = _spike(["locust", "-f", LOCUSTFILE, "--headless", "--host", gw.base_url], wrong)
    says = f"the engine at {gw.base_url} refuses FLASHSALE_ADMIN_TOKEN (401)"
    assert cli[0] == 1, cli[1]
    assert cli[1].strip().splitlines() == [f"flashsale: error: {says}"], cli[1]
    assert direct[0] == 1, direct[1]
    assert f"the spike cannot start: {says}" in direct[1], direct[1]
    assert "Traceback" not in direct[1], direct[1]


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "http://127.0.0.1:99999",
                                  "http://127.0.0.1:²", "http://:8080", "http://[::1"])  # fmt: skip
def test_a_host_that_is_no_url_is_refused_before_anything_runs(run_cli: Cli, host: str) -> None:
    """A port beyond 65535 or not a number passed the check (it looked only at the scheme)
    and reached requests, whose parse error was the run's only message."""
    result = run_cli("loadtest", "spike", "--host", host, "--buyers", "5")
    assert result.code == 2, result
    assert result.err.strip() == (
        f"flashsale: error: --host: must be an http(s)://host[:port] URL, got {host!r}"
    ), result.err


def test_a_rehearsal_takes_the_sales_own_stock(run_cli: Cli) -> None:
    """`--stock` and `--buckets` shape the sale a spike makes; beside `--sale` they would be
    ignored unsaid."""
    for flag in ("--stock", "--buckets"):
        result = run_cli("loadtest", "spike", "--sale", "sale-abc", flag, "5")
        assert (result.code, result.err.strip()) == (2, f"flashsale: error: {flag}: goes "
            "without --sale, whose sale is rehearsed with its own products"), result  # fmt: skip
    refused = run_cli("loadtest", "spike", "--sale", "not a sale id")
    assert refused.code == 2 and refused.err.startswith("flashsale: error: --sale: "), refused
    for argv, said in (
        (("--in-place",), "--in-place: goes with --sale (the sale to rehearse itself)"),
        (("--opens-in", "2m"), "--opens-in: goes with --sale (when the copy it rehearses "
                               "opens)"),
        (("--sale", "sale-abc", "--in-place", "--opens-in", "2m"),
         "--opens-in: goes without --in-place: the sale opens when it was made to"),
        (("--sale", "sale-abc", "--opens-in", "16m"),
         "--opens-in: must be at most 15 min (its buyers wait in the copy's pre-queue until "
         "then), got '16m'"),
    ):  # fmt: skip
        result = run_cli("loadtest", "spike", *argv)
        assert (result.code, result.err.strip()) == (2, f"flashsale: error: {said}"), result


def test_a_spikes_report_goes_to_the_stacks_folder_by_default(
    run_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its default folder was `.flashsale/spike` under wherever the command was run, whatever
    FLASHSALE_HOME said: a `.flashsale` made in a folder that holds no stack."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("FLASHSALE_HOME", str(home))
    monkeypatch.setenv("FLASHSALE_ADMIN_TOKEN", "a" * 20)
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", "b" * 20)
    result = run_cli("loadtest", "spike", "--host", f"http://127.0.0.1:{_closed_port()}")
    assert result.code == 1 and "nothing answers" in result.err, result
    assert (home / "spike").is_dir() and not (elsewhere / ".flashsale").exists()
