"""The fault suite's own arithmetic and interface: how recovery and grants during an outage are
measured, what makes a scenario clean, the JSON other scripts read, the catalogue, the document
block, and the command's refusals. (The suite itself runs against the real stack in
``make test`` as ``flashsale chaos --quick``, and in full as ``make chaos``.)"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from schemathesis.core.transport import Response

from flashsale.cli.devstack.stack import DevStack
from flashsale.clients import redis_client
from flashsale.settings import Settings, home_dir
from loadtest.bench_all import rewrite
from loadtest.chaos import report, suite
from loadtest.chaos import spike as chaos_spike
from loadtest.chaos.faults import Timing, Window
from loadtest.chaos.fuzz import has_retry_after, sale_for
from loadtest.chaos.report import Result
from loadtest.chaos.rig import FaultFailed, compact_aof
from loadtest.chaos.scenarios import SCENARIOS, Scenario
from loadtest.chaos.spike import during, recovery
from loadtest.chaos.suite import choose
from loadtest.fault_proxy import through
from tests.conftest import Cli


def test_recovery_is_the_longest_wait_from_a_fault_to_the_next_grant() -> None:
    windows = [Window(10.0, 12.0), Window(20.0, 20.0), Window(40.0, 41.0)]
    granted = [5.0, 11.0, 12.5, 20.25, 33.0]
    # 12.0 -> 12.5, 20.0 -> 20.25; nothing was granted after 41 (sold out): left out
    assert recovery(windows, granted) == 0.5
    assert recovery(windows, []) is None
    assert during(windows, granted) == 1  # 11.0, inside the first
    assert during([Window(0.0, 100.0)], granted) == 5


def test_a_schedule_spaces_its_faults() -> None:
    timing = Timing(first_at=100.0, period_s=4.0, times=3)
    assert [timing.at(i) for i in range(3)] == [100.0, 104.0, 108.0]
    assert timing.last_ends == 112.0


@pytest.mark.parametrize(
    "field", ["non_503_5xx", "no_retry_after", "unanswered", "violations", "lost_reservations"]
)
def test_any_count_that_must_be_zero_makes_a_scenario_fail(field: str) -> None:
    result = Result("s", "g", "w", faults=3, buyers=10)
    assert result.verdict() == "clean"
    setattr(result, field, 1)
    assert result.verdict() == "FAILED"


def test_a_problem_in_words_fails_it_too_and_a_skip_does_not() -> None:
    broken = Result("s", "g", "w", problems=["the fault could not be injected"])
    assert not broken.clean
    skipped = Result("s", "g", "w", skipped="redis is external")
    assert skipped.clean and skipped.verdict() == "skipped"


def test_the_json_has_the_fields_scripts_read() -> None:
    data = Result("pg", "postgres", "w", faults=2, buyers=9, requests=99,
                  recovery_seconds=0.4, granted_during_outage=7).as_json()  # fmt: skip
    assert {"name", "faults", "buyers", "requests", "non_503_5xx", "unanswered", "violations",
            "lost_reservations", "recovery_seconds"} <= set(data)  # fmt: skip
    assert (data["name"], data["faults"], data["granted_during_outage"]) == ("pg", 2, 7)


def test_the_table_and_the_document_block() -> None:
    results = [
        Result("a", "postgres", "w", faults=3, buyers=10, requests=100, recovery_seconds=0.5),
        Result("b", "abuse", "w", requests=5000, violations=1, problems=["accepted x"]),
        Result("c", "redis", "w", skipped="external"),
    ]
    table = report.table(results)
    assert "| a | 3 | 10 | 100 | 0 | 0 | 0 | 0 | 0 | 0.5 | - | clean |" in table
    assert "| b |" in table and "FAILED" in table and "skipped: external" in table
    assert "**2 scenarios** | **3**" in table and "**1/2 clean**" in table
    totals = report.totals(results)
    assert (totals["abuse_requests"], totals["faults"], totals["clean"]) == (5000, 3, 1)
    machine = {"when": "today", "cpu": "x", "cores": 2, "memory_gib": 24, "python": "3.11"}
    block = report.block(results, machine, "flashsale chaos")
    doc = "# R\n\n<!-- chaos: results -->\nold\n<!-- /chaos: results -->\nkept\n"
    new = rewrite(doc, {"results": block}, "chaos")
    assert "old" not in new and "Reproduce: `flashsale chaos`" in new and new.endswith("kept\n")
    assert "- **b**: accepted x" in new
    one = report.totals(results[:1])
    assert "| **1 scenario** |" in report.table(results[:1])
    said: list[str] = []
    suite._said(Result("d", "redis", "w", faults=1, requests=1), said.append)
    assert said[0].startswith("   clean: 1 fault, 1 request, 0 5xx"), said
    assert report.in_words(one) == (  # a quick cluster run said "in 1 scenarios"
        "3 faults injected, 0 racing reconcile passes and 0 abuse requests in 1 scenario"
    )


async def test_an_engine_that_does_not_start_fails_what_is_left_and_keeps_what_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxied engine exited at its start after five scenarios had run clean: the
    command ended in a traceback, with no table and no JSON of the five."""
    ran: list[str] = []

    async def clean(rig: Any, scenario: Scenario, **_: Any) -> Result:
        ran.append(scenario.name)
        return Result(scenario.name, scenario.group, scenario.what)

    @contextlib.asynccontextmanager
    async def rigged(*_: Any, proxied: bool, **__: Any) -> AsyncIterator[object]:
        if proxied:
            raise FaultFailed("the engine stopped (exit 1); see engine.log")
        yield object()

    monkeypatch.setattr(suite, "rigged", rigged)
    monkeypatch.setattr(chaos_spike, "run", clean)
    direct = next(s for s in SCENARIOS if not s.proxied)
    proxied = [s for s in SCENARIOS if s.proxied][:2]
    said: list[str] = []
    results = await suite.run(Settings.from_env({}), cast(Any, None), [direct, *proxied],
                              quick=True, progress=said.append)  # fmt: skip
    assert ran == [direct.name]
    assert [(r.name, r.clean) for r in results] == [
        (direct.name, True), *((s.name, False) for s in proxied)]  # fmt: skip
    assert results[1].problems == [
        "the engine did not start: the engine stopped (exit 1); see engine.log"
    ]
    assert any("the engine did not start" in line for line in said), said


def test_the_catalogue_meets_the_suite_it_promises() -> None:
    faulty = [s for s in SCENARIOS if s.inject is not None and s.group != "races"]
    assert len(SCENARIOS) >= 20
    assert sum(s.times for s in faulty) >= 200  # real faults, the races' passes not counted
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)
    quick = {s.name for s in choose(None, quick=True)}
    assert quick == {"postgres-restart-fast", "redis-kill-aof", "kill-workers", "kill-reservations",
                     "reconciler-race"}  # fmt: skip
    groups = {s.group for s in SCENARIOS}
    assert {"postgres", "redis", "broker", "processes", "payments", "network", "races",
            "abuse"} <= groups  # fmt: skip
    with pytest.raises(ValueError, match="no scenario nope"):
        choose(["nope"], quick=False)


def test_through_keeps_the_credentials() -> None:
    assert through("redis://:pw@127.0.0.1:6379/0", 7000) == "redis://:pw@127.0.0.1:7000/0"
    assert (through("postgresql://u:p@db.example:5432/x?sslmode=disable", 15)
            == "postgresql://u:p@127.0.0.1:15/x?sslmode=disable")  # fmt: skip


def test_the_command_lists_and_refuses_in_one_line(run_cli: Cli, tmp_path: Path) -> None:
    listed = run_cli("chaos", "--list")
    assert listed.code == 0 and all(s.name in listed.out for s in SCENARIOS)
    # With --quick or --scenario it lists what that run would be: it listed every scenario.
    quick = run_cli("chaos", "--list", "--quick").out.splitlines()
    assert [line.split()[0] for line in quick] == [s.name for s in SCENARIOS if s.quick_times]
    named = run_cli("chaos", "--list", "--scenario", SCENARIOS[-1].name).out.splitlines()
    assert [line.split()[0] for line in named] == [SCENARIOS[-1].name], named
    for args, field in (
        (["--scenario", "nope"], "scenario"),
        (["--quick", "--doc", str(tmp_path / "missing.md")], "doc"),
        (["--quick", "--json", str(tmp_path / "no" / "x.json")], "json"),
    ):
        result = run_cli("chaos", *args)
        assert result.code == 2, (args, result)
        assert field in result.err and len(result.err.strip().splitlines()) == 1, result.err


@pytest.mark.parametrize("sent", [True, False])
def test_the_fuzzer_sees_retry_after_as_schemathesis_hands_it_over(sent: bool) -> None:
    """schemathesis gives response headers with lowercase names: looking up "Retry-After"
    as written found none, and every 429 the fuzzer met counted as one without it."""
    headers = {"Retry-After": "1"} if sent else {}

    class Limited(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            self.send_response(429)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Limited)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        answer = requests.get(f"http://127.0.0.1:{server.server_port}/", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert has_retry_after(Response.from_requests(answer, verify=True).headers) is sent
    assert has_retry_after(answer.headers) is sent


def test_the_fuzzer_never_pauses_or_ends_the_spikes_sale() -> None:
    """A full chaos run failed abuse-fuzz with 52 buyers unanswered: the fuzzer holds the
    admin token, named the spike's sale in a generated pause or end, and its buyers were left
    waiting in a paused queue or told the sale had ended. An admin request that changes a sale
    names the decoy sale instead of the live one, half the time as the others do."""
    live, decoy = "sale-live", "sale-decoy"
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/admin/v1/sales/{sale}/pause", "/admin/v1/sales/{sale}/end",
                     "/admin/v1/sales/{sale}/skus/{sku}"):  # fmt: skip
            chosen = [sale_for(method, path, sent, live, decoy) for sent in range(4)]
            assert chosen == [decoy, None, decoy, None], (method, path)
    for method, path in (("GET", "/admin/v1/sales/{sale}"),
                         ("POST", "/v1/sales/{sale}/queue"),
                         ("POST", "/v1/sales/{sale}/reservations")):  # fmt: skip
        chosen = [sale_for(method, path, sent, live, decoy) for sent in range(4)]
        assert chosen == [live, None, live, None], (method, path)


def test_a_bloated_aof_is_rewritten_before_redis_is_restarted_from_it(stack: Settings) -> None:
    """A full chaos run on a dev stack that had been through a day of benchmarks failed
    redis-kill-aof: its AOF held 50 MB of writes for 12 MB of data and took 8 s to load, so
    each kill found Redis still loading from the one before. The suite now rewrites the AOF
    first: writes since deleted are gone from it."""
    dev = DevStack(home_dir())
    said: list[str] = []
    if stack.redis_cluster or dev.running_pid("redis") is None:
        # an external server or a cluster's nodes are left as they are
        asyncio.run(compact_aof(stack, dev, said.append))
        assert said == []
        return
    churn = 5_000_000

    async def bloat() -> None:
        client = redis_client(stack)
        try:
            for i in range(50):
                await client.set(f"chaos-test:bloat:{i}", b"x" * (churn // 50))
            await client.delete(*(f"chaos-test:bloat:{i}" for i in range(50)))
        finally:
            await client.aclose()

    asyncio.run(bloat())
    before = dev.aof_bytes("redis")  # one file up to Redis 6, several from Redis 7
    asyncio.run(compact_aof(stack, dev, said.append))
    after = dev.aof_bytes("redis")
    assert after < before - churn * 0.9, (before, after)
    assert len(said) == 1 and "AOF rewritten" in said[0]


# What runs without rewriting a document, by command.
QUICK = {"chaos": "--quick or --scenario NAME", "bench": "--quick"}


@pytest.mark.parametrize("command", [["chaos"], ["bench", "all"]])
def test_a_full_run_outside_the_project_says_where_its_results_go(
    run_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """A full run rewrites the results block of its document in the project's docs/. Run
    from elsewhere it said only "doc: no such file: docs/RELIABILITY.md", a flag not given."""
    monkeypatch.chdir(tmp_path)
    result = run_cli(*command)
    assert result.code == 2, result
    doc = "docs/RELIABILITY.md" if command == ["chaos"] else "docs/BENCHMARKS.md"
    assert result.err.strip() == (
        f"flashsale: error: doc: no {doc} here, whose results block a full run rewrites: run "
        f"it in the project's folder, name the document with --doc, or run {QUICK[command[0]]}"
    ), result.err
