"""The allocation benchmark runs end to end on the real stack and reports every row honestly."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from allocator.pump import quantile
from flashsale.clients import pg_pool, redis_client
from flashsale.engine_record import running_benches
from flashsale.kafka import client_options, ensure_topics
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.settings import Settings
from loadtest import bench_all
from tests.conftest import REPO, Cli
from tests.harness import flashsale_named_process, record_bench, record_engine
from tests.pipeline import end_offsets

ROWS = [
    "pg_for_update",
    "pg_optimistic",
    "pg_conditional_update",
    "redis_decr_restore",
    "lua_per_request",
    "lua_batched_allocator",
    "redis_pipelined_decr_ceiling",
]


def test_bench_allocate_reports_all_rows(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    result = cli(
        "bench", "allocate", "--seconds", "0.3", "--concurrency", "32", "--json", str(path)
    )
    assert result.code == 0, result.err
    report = json.loads(path.read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        assert row["per_second"] > 0, name
        assert row["decisions"] > 0, name
        if "consistent" in row:
            # The stock moved by exactly the decisions made: nothing lost, nothing oversold.
            assert row["consistent"] is True, row
            assert row["stock_moved"] == row["decisions"], row
    for name in ("lua_per_request", "lua_batched_allocator"):
        assert rows[name]["server_us_per_decision"] > 0
    assert rows["lua_batched_allocator"]["mean_batch"] > 1  # calls really were coalesced
    # Every row is reported against the ceiling measured in the same run.
    ceiling = rows["redis_pipelined_decr_ceiling"]["per_second"]
    for row in rows.values():
        assert row["ratio_to_ceiling"] == pytest.approx(row["per_second"] / ceiling, abs=2e-4)
    # Each target's verdict is what its figures say.
    targets = {t["name"]: t for t in report["targets"]}
    best_pg = max((n for n in ROWS if n.startswith("pg_")), key=lambda n: rows[n]["per_second"])
    batched = rows["lua_batched_allocator"]["per_second"]
    assert sorted(targets) == sorted([
        "batched decisions/s from one process", "Redis server us per batched decision",
        f"batched vs best Postgres row ({best_pg})", "batched vs lua_per_request",
        "batched vs the pipelined DECR ceiling",
    ])  # fmt: skip
    assert targets["batched decisions/s from one process"]["met"] == (batched >= 250_000)
    vs_lua = batched / rows["lua_per_request"]["per_second"]
    assert targets["batched vs lua_per_request"]["met"] == (vs_lua >= 3)
    vs_ceiling = batched / ceiling
    assert targets["batched vs the pipelined DECR ceiling"]["met"] == (vs_ceiling >= 0.15)
    assert {"cpu", "cores", "python", "redis", "postgres"} <= set(report["machine"])
    for name in ROWS:
        assert name in result.out  # the printed table names every row


@pytest.mark.parametrize("bench", ["gateway", "pipeline", "reconcile", "all"])
def test_a_bench_that_makes_sales_refuses_to_run_beside_an_engine(
    bench: str, run_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flashsale up` ran on the stack: the benchmark's sales were live sales to it. Its relay
    published the reserve row's reservations to its own topic, its workers charged and
    ordered them, its reconciler wrote a discarded sale back; and it shared the two cores
    being measured. The benchmark says so and what to do, before it makes anything."""
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))
    gateway = "http://127.0.0.1:8280"
    with flashsale_named_process() as pid:
        record_engine(tmp_path, 8280, pid, gateway)
        result = run_cli("bench", bench)
    assert result.code == 1, result
    assert result.err == (
        f"flashsale: error: an engine runs on this stack (`flashsale up`, gateway {gateway}): "
        "it would take the benchmark's sales up as its own (reservations relayed and charged, "
        "state written back), and share the cores the benchmark measures; stop it first\n"
    ), result.err


@pytest.mark.parametrize("starts", ["up", "demo", "loadtest spike --embedded", "chaos --quick"])
def test_an_engine_refuses_to_start_beside_a_bench_that_makes_sales(
    starts: str, run_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: `flashsale bench gateway` ran, and an engine was started on its stack
    (`up`, or a command that starts one). The benchmark's sales were live sales to it, as
    above: the command says so before it starts anything, the stack included."""
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))
    monkeypatch.delenv("FLASHSALE_PSP_URL", raising=False)
    with flashsale_named_process() as pid:
        record_bench(tmp_path, pid, "gateway")
        result = run_cli(*starts.split())
    assert result.code == 1, result
    assert result.err == (
        f"flashsale: error: a benchmark runs on this stack (`flashsale bench gateway`, pid "
        f"{pid}): an engine would take its sales up as its own (reservations relayed and "
        "charged, state written back); start the engine once it is done\n"
    ), result.err
    started = {"stack.json", "dev.env", "redis", "postgres", "kafka"}  # what `dev up` makes
    assert not started & {path.name for path in tmp_path.iterdir()}


def test_bench_all_starts_the_engine_of_its_own_demo(tmp_path: Path) -> None:
    """`bench all` runs the demo, which starts `flashsale up` as a child process of the run
    that is recorded: that engine is the run's own, not one beside it. Both the recorded
    process and its child may start one."""
    check = (
        "import sys, pathlib; from flashsale.engine_record import "
        "refuse_to_start_an_engine; "
        "refuse_to_start_an_engine(pathlib.Path(sys.argv[1]), own_simulator=True)"
    )
    run = (  # in a process named flashsale, as a live record's must be
        "import os, subprocess, sys, pathlib; from flashsale.engine_record import "
        "BENCHES_DIR, running_benches; home = pathlib.Path(sys.argv[1]); "
        "(home / BENCHES_DIR).mkdir(); (home / BENCHES_DIR / 'own.json').write_text("
        "'{\"pid\": %d, \"bench\": \"all\"}' % os.getpid()); "
        "print([r['bench'] for r in running_benches(home)]); "
        f"exec({check!r}); "
        f"sys.exit(subprocess.run([sys.executable, '-c', {check!r}, str(home)]).returncode)"
    )  # fmt: skip
    shown = subprocess.run([sys.executable, "-c", run, str(tmp_path), "flashsale"],
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert (shown.returncode, shown.stdout) == (0, "['all']\n"), shown.stderr


def test_a_bench_that_makes_sales_is_recorded_on_its_stack_while_it_runs(stack: Settings) -> None:
    """What the engine's refusal above reads: the record is there while the benchmark runs,
    names it, and is gone when it ends."""
    argv = [sys.executable, "-m", "flashsale", "bench", "reconcile", "--skus", "2000",
            "--passes", "3"]  # fmt: skip
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as bench:
        try:
            deadline = time.monotonic() + 30
            while not (seen := running_benches(stack.home)) and bench.poll() is None:
                assert time.monotonic() < deadline, "no record of the running benchmark"
                time.sleep(0.05)
            assert [(r["pid"], r["bench"]) for r in seen] == [(bench.pid, "reconcile")]
            _, err = bench.communicate(timeout=120)
            assert bench.returncode == 0, err
        finally:
            bench.kill()
    assert running_benches(stack.home) == []


def test_bench_rejects_bad_options(run_cli: Cli) -> None:
    for flag, value in (("--seconds", "0"), ("--concurrency", "x"), ("--max-batch", "5000")):
        result = run_cli("bench", "allocate", flag, value)
        assert result.code == 2, (flag, result)
        assert flag.lstrip("-") in result.err


@pytest.mark.heavy
def test_bench_gateway_smoke(cli: Cli, stack: Settings, tmp_path: Path) -> None:
    """A short run: real gateway and bare processes, every row served, JSON written; and
    nothing left for the engine afterwards."""
    path = tmp_path / "gateway.json"
    asyncio.run(ensure_topics(stack))  # the engine's topic exists, to see nothing reach it
    published = asyncio.run(end_offsets(stack, stack.topics.reservations))
    result = cli("bench", "gateway", "--seconds", "0.6", "--rounds", "2", "--workers", "1",
                 "--concurrency", "8", "--json", str(path))  # fmt: skip
    assert result.code == 0, result.err
    # Its reservations went to topics of its own, and its sales are gone, from Redis and from
    # Postgres: the next engine's workers, relay, sweeper and pumps have nothing of it to do
    # (a demo right after it once spent its first seconds making 27,000 orders of it).
    assert asyncio.run(end_offsets(stack, stack.topics.reservations)) == published
    report = json.loads(path.read_text())
    made = report["config"]["sales"]
    assert len(made) == 2 and asyncio.run(_left_of_bench_sales(stack, made)) == {}, made
    rows = {row["name"]: row for row in report["results"]}
    assert set(rows) == {"bare_aiohttp", "queue_status", "queue_join", "queue_join_jwt",
                         "queue_join_challenge", "reserve", "reserve_listener"}  # fmt: skip
    # Every answer was the row's success (201 for a reservation).
    assert all(row["per_second"] > 0 and row["non_200"] == 0 for row in rows.values())
    assert all(len(row["round_ratios"]) == 2 for row in rows.values())
    # A row's ratio is the median of its rounds, and each verdict is what that ratio says.
    for row in rows.values():
        assert row["ratio_to_bare"] == quantile(row["round_ratios"], 0.5)
        assert row["cpu_ratio_to_bare"] == round(quantile(row["round_cpu_ratios"], 0.5), 2)
    # Server CPU is measured per round: the gateway's rows cost more than the bare endpoint.
    assert all(r > 1.0 for name in ("reserve", "reserve_listener")
               for r in rows[name]["round_cpu_ratios"])  # fmt: skip
    # Redis is measured per row too: a join's script and a reservation's cost its server more
    # than the bare endpoint's requests, which send it nothing.
    bare = rows["bare_aiohttp"]
    for name in ("queue_join", "reserve", "reserve_listener"):
        assert rows[name]["redis_us_per_request"] > bare["redis_us_per_request"], name
        assert rows[name]["redis_cpu_us_per_request"] > bare["redis_cpu_us_per_request"], name
    targets = {t["name"]: t["met"] for t in report["targets"]}
    assert targets == {
        "queue_status vs bare": rows["queue_status"]["ratio_to_bare"] >= 0.70,
        "queue_join vs bare": rows["queue_join"]["ratio_to_bare"] >= 0.40,
        "queue_status server CPU vs bare": rows["queue_status"]["cpu_ratio_to_bare"] <= 1.2,
        "queue_join server CPU vs bare": rows["queue_join"]["cpu_ratio_to_bare"] <= 1.5,
        "reserve server CPU vs bare": rows["reserve"]["cpu_ratio_to_bare"] <= 2.0,
        "reserve_listener server CPU vs bare": rows["reserve_listener"]["cpu_ratio_to_bare"] <= 2.0,
    }


@pytest.mark.heavy
def test_bench_pipeline_smoke(cli: Cli, stack: Settings, tmp_path: Path) -> None:
    """A short run: psp and worker processes, relay, broker; every hold confirmed once; its
    sale ended, its Redis state deleted and its topics too afterwards. Its sale stayed ended
    with its Redis state: a day later the archive tried it again and again, its audit unable
    to pass (no admission, the captures at the run's own provider). Kept for its orders, it is
    recorded as cleared, which no service and no archive takes up."""
    path = tmp_path / "pipeline.json"
    began = datetime.now(UTC)
    topics = asyncio.run(_topics(stack, "bench"))
    result = cli("bench", "pipeline", "--reservations", "300", "--latencies", "0",
                 "--paced-seconds", "1", "--concurrency", "100", "--json", str(path))  # fmt: skip
    assert result.code == 0, result.err
    # The relay it runs in-process said each reservation it relayed: 40,000 lines of a default
    # run between its progress lines (its worker and provider processes log warnings only).
    assert "relayed reservation" not in result.err, result.err[-2000:]
    assert asyncio.run(_live_sales(stack, began, "bench pipeline%")) == []
    assert asyncio.run(_topics(stack, "bench")) <= topics
    report = json.loads(path.read_text())
    rows = {row["name"]: row for row in report["results"]}
    assert set(rows) == {"broker_ceiling", "pipeline_0ms"}
    run = rows["pipeline_0ms"]
    assert run["per_second"] > 0 and run["consistent"] is True and run["oversold"] == 0
    assert run["paced_orders"] > 0 and run["p50_ms"] > 0
    assert [t["name"] for t in report["targets"]] == ["orders/s at 0 ms"]
    kept, orders, _, keys = asyncio.run(_left_of(stack, run["sale_id"]))
    # kept for its orders: the warm-up's 100, the burst's and the paced ones
    assert (kept, keys, orders) == (1, 0, 100 + run["decisions"] + run["paced_orders"]), run
    assert asyncio.run(_cleared(stack, run["sale_id"]))


def test_bench_reconcile_smoke(cli: Cli, stack: Settings, tmp_path: Path) -> None:
    """A small run: every row, and the drift pass repairs exactly the corrupted SKUs. Its sale
    is gone afterwards: it stayed in `sale list` and on the live page, its repairs in
    `flashsale repairs`, and the state of 10,000 SKUs in Redis until archived a day later."""
    path = tmp_path / "reconcile.json"
    result = cli("bench", "reconcile", "--skus", "300", "--passes", "1", "--json", str(path))
    assert result.code == 0, result.err
    report = json.loads(path.read_text())
    assert asyncio.run(_left_of(stack, report["config"]["sale_id"])) == (0, 0, 0, 0)
    rows = {row["name"]: row for row in report["results"]}
    assert set(rows) == {"ceiling", "clean", "full", "status", "drift"}
    drift = rows["drift"]
    assert drift["consistent"] is True and drift["repaired"] == drift["corrupted"] == 3
    assert drift["next_pass_changed"] == 0
    assert [t["name"] for t in report["targets"]] == ["clean pass over 10,000 SKUs",
                                                      "status read vs the ceiling"]  # fmt: skip
    assert run_skus_ok(rows)


async def _left_of(settings: Settings, sale_id: str) -> tuple[int, int, int, int]:
    """What a stack keeps of a sale: its rows, its orders, its repairs and its Redis keys."""
    pool, client = await pg_pool(settings, max_size=1), redis_client(settings)
    try:
        rows = await pool.fetchval("SELECT count(*) FROM sales WHERE id = $1", sale_id)
        orders = await pool.fetchval("SELECT count(*) FROM orders WHERE sale_id = $1", sale_id)
        repairs = await pool.fetchval(
            "SELECT count(*) FROM reconcile_events WHERE sale_id = $1", sale_id
        )
        keys = [k async for k in client.scan_iter(match=f"*{sale_id}*", count=1000)]
        return rows, orders, repairs, len(keys)
    finally:
        await client.aclose()
        await pool.close()


async def _cleared(settings: Settings, sale_id: str) -> bool:
    pool = await pg_pool(settings, max_size=1)
    try:
        return bool(await pool.fetchval(
            "SELECT redis_cleared_at IS NOT NULL FROM sales WHERE id = $1", sale_id))  # fmt: skip
    finally:
        await pool.close()


def run_skus_ok(rows: dict[str, dict[str, object]]) -> bool:
    return all(isinstance(r["ms_per_pass"], float | int) and r["decisions"] == 300
               for r in rows.values())  # fmt: skip


def test_bench_all_rewrites_only_the_marked_blocks(tmp_path: Path) -> None:
    from loadtest.bench_all import rewrite

    doc = ("# B\nkept\n<!-- bench all: gateway -->\nold\n<!-- /bench all: gateway -->\nkept too\n"
           "<!-- bench all: demo -->\nold demo\n<!-- /bench all: demo -->\n")  # fmt: skip
    new = rewrite(doc, {"gateway": "new table\n"})
    assert new == doc.replace(
        "old\n<!-- /bench all: gateway", "new table\n<!-- /bench all: gateway"
    )
    with pytest.raises(ValueError, match="reconcile"):
        rewrite(doc, {"reconcile": "x"})


@pytest.mark.heavy
def test_bench_all_quick_runs_every_benchmark_and_fills_the_document(
    cli: Cli, tmp_path: Path
) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text((REPO / "docs" / "BENCHMARKS.md").read_text())
    result = cli("bench", "all", "--quick", "--json-dir", str(tmp_path), "--doc", str(doc))
    assert result.code == 0, result.err
    text = doc.read_text()
    for name in ("allocate", "gateway", "pipeline", "reconcile", "demo"):
        assert (tmp_path / f"bench-{name}.json").is_file()
        block = text.split(f"<!-- bench all: {name} -->")[1].split("<!-- /bench all:")[0]
        assert "Latest `flashsale bench all` run" in block, (name, block)
    assert re.search(r"\| 2,000 \| [\d,]+ \| 100 \|", text)  # the quick demo's row


@pytest.mark.heavy
def test_bench_allocate_cluster_rows_spread_over_the_primaries(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    result = cli("bench", "allocate", "--seconds", "0.3", "--concurrency", "32", "--cluster", "3",
                 "--json", str(path))  # fmt: skip
    assert result.code == 0, result.err
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"]}
    assert list(rows)[-2:] == ["cluster3_one_hot_sku", "cluster3_sku_per_primary"]
    one, spread = rows["cluster3_one_hot_sku"], rows["cluster3_sku_per_primary"]
    for row in (one, spread):
        assert row["consistent"] is True and row["stock_moved"] == row["decisions"], row
        assert len(row["nodes"]) == 3
    # One hot SKU: one primary does all the work. One per primary: each does a third.
    assert sorted(n["share"] for n in one["nodes"].values()) == [0.0, 0.0, 1.0]
    assert all(abs(n["share"] - 1 / 3) < 0.01 for n in spread["nodes"].values()), spread
    assert all(n["server_cpu_us_per_decision"] > 0 for n in spread["nodes"].values())
    assert "share of decisions" in result.out
    bad = cli("bench", "allocate", "--cluster", "2")
    assert bad.code == 2 and "cluster" in bad.err


def _demo_json(**changes: Any) -> dict[str, Any]:
    """A demo report as ``flashsale demo --json`` writes it: every target met."""
    report: dict[str, Any] = {
        "buyers": 50_000, "stock": 100, "pre_queue_joins": 9_000, "sold": 100, "oversold": 0,
        "seconds_to_answer_all": 8.0, "target_seconds": 10.0, "admission_kendall_tau": 1.0,
        "eta_p50_abs_pct_error": 5.0, "eta_p90_coverage": 0.9, "eta_buyers": 100,
        "eta_buyers_pre_queue": 100, "audit_passed": True,
        "routes": {"join": {"requests": 60_000, "p50_ms": 40.0, "p99_ms": 300.0},
                   "reserve": {"requests": 130, "p50_ms": 90.0, "p99_ms": 300.0},
                   "status": {"requests": 20_000, "p50_ms": 80.0, "p99_ms": 400.0}},
    }  # fmt: skip
    return {**report, **changes}


@pytest.mark.parametrize("missed", [
    {"seconds_to_answer_all": 12.0},
    {"eta_p50_abs_pct_error": 30.0},
    {"eta_p90_coverage": 0.99},
    {"routes": {**_demo_json()["routes"],
                "reserve": {"requests": 130, "p50_ms": 300.0, "p99_ms": 300.0}}},
    {"routes": {**_demo_json()["routes"],
                "reserve": {"requests": 130, "p50_ms": 90.0, "p99_ms": 800.0}}},
], ids=["time", "eta p50", "eta p90", "reserve p50", "reserve p99"])  # fmt: skip
def test_bench_all_says_a_demo_target_was_missed_whichever_it_was(missed: dict[str, Any]) -> None:
    """`bench all` once printed "demo targets all met" for a run whose own report said the
    reservations' p50 and the ETAs' p90 coverage were MISSED: only the 10 s counted."""
    met = bench_all.demo_outcome(_demo_json(), {}, 0)
    assert met.targets_met and "MISSED" not in met.block
    # Everyone admitted within a step of their p50: no p90 could have covered fewer.
    one_step = bench_all.demo_outcome(_demo_json(eta_p90_coverage=1.0, eta_past_p50=0.01), {}, 0)
    assert one_step.targets_met and "MISSED" not in one_step.block
    outcome = bench_all.demo_outcome(_demo_json(**missed), {}, 0)
    assert not outcome.targets_met
    assert outcome.block.count("MISSED") == 1


async def _left_of_bench_sales(settings: Settings, sales: list[str]) -> dict[str, Any]:
    """Per sale of ``sales`` that a bench gateway run made: its row's status while it has one,
    and which of its Redis keys still exist."""
    pool = await pg_pool(settings, max_size=1)
    client = redis_client(settings)
    try:
        rows = await pool.fetch("SELECT id, status FROM sales WHERE id = ANY($1)", sales)
        statuses = {row["id"]: row["status"] for row in rows}
        left: dict[str, Any] = {}
        for sale in sales:
            keys = [*SaleKeys(sale).all(), *SkuKeys(sale, "B1").all()]
            present = [key for key in keys if await client.exists(key)]
            if sale in statuses or present:
                left[sale] = {"status": statuses.get(sale), "keys": present}
        return left
    finally:
        await client.aclose()
        await pool.close()


async def _live_sales(settings: Settings, since: datetime, name: str) -> list[str]:
    pool = await pg_pool(settings, max_size=1)
    try:
        rows = await pool.fetch("SELECT id FROM sales WHERE created_at >= $1 AND name LIKE $2 "
                                "AND status <> 'ended'", since, name)  # fmt: skip
        return [row["id"] for row in rows]
    finally:
        await pool.close()


async def _topics(settings: Settings, prefix: str) -> set[str]:
    consumer = AIOKafkaConsumer(**client_options(settings))
    await consumer.start()
    try:
        return {topic for topic in await consumer.topics() if topic.startswith(prefix)}
    finally:
        await consumer.stop()
