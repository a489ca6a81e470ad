"""``flashsale bench`` (allocate, gateway, pipeline, reconcile, all): the benchmarks of
:mod:`loadtest`, imported when a command runs so the other commands start light. Each prints a
table, can write its report as JSON, and exits 1 when a consistency check failed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from flashsale.cli.checks import (
    MAX_PROCESSES,
    output_file,
    output_folder,
    positive,
    results_doc,
    seconds,
    service_settings,
    within,
)
from flashsale.cli.dev import apply_migrations
from flashsale.cli.devstack.redis_cluster import Layout
from flashsale.cli.devstack.stack import DevStack
from flashsale.cli.output import fail, out
from flashsale.cli.runners import recorded
from flashsale.engine_record import BENCHES_DIR, running_engines, this_process
from flashsale.errors import ConfigError, Conflict, InvalidInput, shown
from flashsale.keys import MAX_BUCKETS
from flashsale.settings import Settings, read_env_file

if TYPE_CHECKING:
    from loadtest.bench import Report


async def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    run = {"allocate": _allocate, "gateway": _gateway, "pipeline": _pipeline,
           "reconcile": _reconcile, "all": _bench_all}[args.bench_command]  # fmt: skip
    if args.bench_command == "allocate":  # its SKUs are Redis's alone: no engine sees them
        return await run(args, settings)
    _alone_on_the_stack(settings)
    with _recorded_bench(settings.home, args.bench_command):
        return await run(args, settings)


def _alone_on_the_stack(settings: Settings) -> None:
    """Raise Conflict when an engine runs on the stack: to it, the sales a benchmark makes are
    live sales like any other (its relay publishes their reservations to its own topic and
    its workers charge them; its reconciler writes back the state the run discards)."""
    engines = running_engines(settings.home)
    if engines:
        gateways = ", ".join(engine["gateway"] for engine in engines)
        raise Conflict(
            f"an engine runs on this stack (`flashsale up`, gateway {gateways}): it would take "
            "the benchmark's sales up as its own (reservations relayed and charged, state "
            "written back), and share the cores the benchmark measures; stop it first",
            code="engine_running",
        )


def _recorded_bench(home: Path, bench: str) -> contextlib.AbstractContextManager[None]:
    """Record this benchmark in the state folder while it runs: an engine asked to start on
    the stack meanwhile refuses (flashsale.engine_record), as this one refused beside it."""
    text = orjson.dumps({**this_process(), "bench": bench}).decode()
    return recorded(home / BENCHES_DIR / f"{os.getpid()}.json", text)


async def _allocate(args: argparse.Namespace, settings: Settings) -> int:
    from allocator.hold_scripts import MAX_RESERVE_BATCH  # noqa: PLC0415
    from loadtest import bench_allocate as bench  # noqa: PLC0415

    options = bench.Options(
        seconds=seconds("seconds", args.seconds),
        concurrency=positive(int, "concurrency", args.concurrency),
        max_batch=positive(int, "max-batch", args.max_batch),
    )
    json_path = output_file("json", args.json) if args.json else None
    if options.max_batch > MAX_RESERVE_BATCH:
        raise InvalidInput("max-batch", f"must be at most {MAX_RESERVE_BATCH}")
    primaries = within("cluster", args.cluster, 3, 16) if args.cluster else None
    buckets = within("buckets", args.buckets, 1, MAX_BUCKETS) if args.buckets else 1
    if buckets > 1 and primaries is None:
        raise InvalidInput("buckets", "needs --cluster N: the bucket rows run on a cluster")
    settings.require_redis()
    settings.require_database()
    command = options.command() + (f" --cluster {primaries}" if primaries else "")
    command += f" --buckets {buckets}" if buckets > 1 else ""
    if primaries is None:
        report = await bench.run(settings, options, out, command)
    else:
        async with _bench_cluster(settings, primaries) as cluster:
            report = await bench.run(settings, options, out, command, cluster=cluster,
                                     buckets=buckets)  # fmt: skip
    return _report(report, bench.render, json_path, bench.failed(report), bench.FAILURE)


@contextlib.asynccontextmanager
async def _bench_cluster(settings: Settings, primaries: int) -> AsyncIterator[Settings]:
    """A Redis Cluster of ``primaries`` nodes for one benchmark run, beside the stack (in
    ``<home>/bench-cluster``), deleted afterwards."""
    stack = DevStack(settings.home / "bench-cluster", environ={
        "DATABASE_URL": settings.require_database(), "KAFKA_BOOTSTRAP": settings.require_kafka(),
    })  # fmt: skip
    out(f"== a Redis Cluster of {primaries} primaries for the cluster rows")
    quiet: Callable[[str], None] = lambda _line: None  # noqa: E731
    await asyncio.to_thread(stack.up, progress=quiet, cluster=Layout(primaries))
    try:
        url = read_env_file(stack.env_file)["REDIS_URL"]
        yield dataclasses.replace(settings, redis_url=url, redis_cluster=True)
    finally:
        await asyncio.to_thread(stack.down, purge=True, progress=quiet)


async def _gateway(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import bench_gateway as bench  # noqa: PLC0415

    options = bench.Options(
        seconds=seconds("seconds", args.seconds),
        rounds=positive(int, "rounds", args.rounds),
        concurrency=positive(int, "concurrency", args.concurrency),
        workers=within("workers", args.workers, 1, MAX_PROCESSES),
    )
    json_path = output_file("json", args.json) if args.json else None
    service_settings(settings)
    if not settings.admin_token:
        raise ConfigError("FLASHSALE_ADMIN_TOKEN is not set: run `flashsale dev up` or export it")
    await _migrated(settings)
    report = await bench.run(settings, options, out, options.command())
    return _report(report, bench.render, json_path, bench.failed(report), bench.FAILURE)


async def _migrated(settings: Settings) -> None:
    """The schema brought up to date first, as ``flashsale demo`` does: a benchmark's
    documented start is ``flashsale dev up``, on a database nothing has migrated yet."""
    await apply_migrations(settings, progress=lambda _line: None)


async def _pipeline(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import bench_pipeline as bench  # noqa: PLC0415

    options = bench.Options(
        reservations=positive(int, "reservations", args.reservations),
        latencies=_latencies(args.latencies),
        concurrency=positive(int, "concurrency", args.concurrency),
        paced_seconds=seconds("paced-seconds", args.paced_seconds),
    )
    json_path = output_file("json", args.json) if args.json else None
    settings.require_redis()
    settings.require_database()
    settings.require_kafka()
    await _migrated(settings)
    report = await bench.run(settings, options, out, options.command())
    return _report(report, bench.render, json_path, bench.failed(report), bench.FAILURE)


async def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import bench_reconcile as bench  # noqa: PLC0415

    options = bench.Options(
        skus=positive(int, "skus", args.skus), passes=positive(int, "passes", args.passes)
    )
    json_path = output_file("json", args.json) if args.json else None
    settings.require_redis()
    settings.require_database()
    await _migrated(settings)
    report = await bench.run(settings, options, out, options.command())
    return _report(report, bench.render, json_path, bench.failed(report), bench.FAILURE)


def _latencies(text: str) -> tuple[float, ...]:
    try:
        latencies = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InvalidInput("latencies", f"must be comma-separated numbers, got {shown(text)}"
                           ) from None  # fmt: skip
    if not latencies or any(x < 0 for x in latencies):
        raise InvalidInput("latencies", "must be numbers >= 0")
    return latencies


def _report(report: Report, render: Callable[[Report], str], json_path: Path | None,
            failed: list[str], failure: str) -> int:  # fmt: skip
    """Print a benchmark's tables, write its JSON, and exit 1 naming the rows that failed."""
    out()
    out(render(report))
    if json_path:
        report.write_json(json_path)
        out(f"\nwrote {json_path}")
    if failed:
        fail(f"{failure} {failed}")
        return 1
    return 0


async def _bench_all(args: argparse.Namespace, settings: Settings) -> int:
    """Every benchmark, then the tables of docs/BENCHMARKS.md rewritten (see bench_all)."""
    from loadtest import bench_all  # noqa: PLC0415

    doc = results_doc(args.doc, None if args.quick else "docs/BENCHMARKS.md", "--quick")
    folder = output_folder("json-dir", args.json_dir)
    service_settings(settings)
    settings.require_kafka()
    await _migrated(settings)
    outcomes = await bench_all.run(settings, quick=args.quick, folder=folder, doc=doc,
                                   progress=out)  # fmt: skip
    out("\n" + "\n".join(
        f"{o.name:10} checks {'ok' if o.ok else 'FAILED'}, targets "
        f"{'all met' if o.targets_met else 'not all met'}" for o in outcomes
    ))  # fmt: skip
    failed = [o.name for o in outcomes if not o.ok]
    if failed:
        fail(f"consistency checks failed in {failed}")
        return 1
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench", help="benchmarks (need a running stack, and no engine on it but for allocate)"
    )
    bench.set_defaults(handler=cmd_bench)
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    allocate = bench_sub.add_parser(
        "allocate",
        help="Postgres vs Redis vs Lua vs the batched allocator on one hot SKU",
        description="Seven ways to decide a reservation on one hot SKU with 1,000,000 units, "
        "each driven by the same number of concurrent callers for --seconds. Prints a table "
        "(decisions/s, Redis server us per decision, ratio to the raw pipelined DECR ceiling) "
        "and the targets met or missed. Exit 1 only if a row's stock moved by a different "
        "amount than the decisions it made.",
    )
    allocate.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    allocate.add_argument(
        "--seconds", default="3", help="seconds per row, or a duration as 1m (default 3)"
    )
    allocate.add_argument("--concurrency", default="512", help="concurrent callers (default 512)")
    allocate.add_argument("--max-batch", default="256", help="SkuAllocator max batch (default 256)")
    allocate.add_argument(
        "--cluster", metavar="N",
        help="also start a Redis Cluster of N primaries (3..16) beside the stack and add rows "
        "for the batched allocator on it: one hot SKU, then one hot SKU per primary, with each "
        "primary's share of the decisions and its server CPU per decision",
    )  # fmt: skip
    allocate.add_argument(
        "--buckets", metavar="B",
        help="with --cluster: also one hot SKU split into B stock buckets (2..64), and two "
        "sell-outs of 3,000 units in B buckets (buyers spread, and all in one bucket) that "
        "report the units left unsold (must be 0)",
    )  # fmt: skip
    gw_bench = bench_sub.add_parser(
        "gateway",
        help="queue status, join and reserve against a bare aiohttp endpoint",
        description="Starts the gateway, the reservations listener and a trivial aiohttp "
        "endpoint with --workers processes each, drives each row with the same closed-loop "
        "client for --seconds in --rounds interleaved rounds, and prints req/s, p50 and p99, "
        "the servers' CPU per request, the Redis server's CPU per request (what a join or a "
        "reservation costs the sale's node) and the ratios to the bare endpoint (targets: "
        "status >= 70% and join >= 40% of its req/s; server CPU per request at most 1.2x "
        "its own for a status poll, 1.5x for a join, 2x for a reservation at the gateway and "
        "at the listener). Exit 1 only if a request failed.",
    )
    gw_bench.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    gw_bench.add_argument(
        "--seconds", default="10", help="seconds per row, or a duration as 1m (default 10)"
    )
    gw_bench.add_argument(
        "--rounds", default="5", help="interleaved rounds the seconds are split into (default 5)"
    )
    gw_bench.add_argument("--concurrency", default="64", help="requests in flight (default 64)")
    gw_bench.add_argument(
        "--workers", default="2", help=f"processes per server, 1..{MAX_PROCESSES} (default 2)"
    )

    pl_bench = bench_sub.add_parser(
        "pipeline",
        help="reservations -> CONFIRMED orders per second through relay, Kafka, workers, Postgres",
        description="For each provider latency: a payment simulator and one worker process on "
        "fresh topics; N holds at once (capacity), then holds at half that rate (reserve -> "
        "confirmed p50/p99). The broker alone is the ceiling. Exit 1 if confirmed orders "
        "disagree with the holds granted.",
    )
    pl_bench.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    pl_bench.add_argument("--reservations", default="20000",
                          help="holds per capacity run (default 20000)")  # fmt: skip
    pl_bench.add_argument("--latencies", default="0,50",
                          help="provider latencies in ms (default 0,50)")  # fmt: skip
    pl_bench.add_argument("--concurrency", default="1000",
                          help="worker charges in flight (default 1000)")  # fmt: skip
    pl_bench.add_argument("--paced-seconds", default="5",
                          help="length of the latency run, seconds or a duration as 1m "
                               "(default 5)")  # fmt: skip

    all_bench = bench_sub.add_parser(
        "all",
        help="run every benchmark and rewrite the tables of docs/BENCHMARKS.md",
        description="Run bench allocate, gateway, pipeline, reconcile and the 50,000-buyer "
        "demo with their defaults, write bench-NAME.json to --json-dir, and rewrite each "
        "benchmark's '<!-- bench all: NAME -->' block in --doc (docs/BENCHMARKS.md). --quick "
        "runs each small (a check that every one works; the document is left alone unless "
        "--doc is given). Exit 1 if a benchmark's consistency check failed.",
    )
    all_bench.add_argument("--quick", action="store_true", help="small runs, as a check")
    all_bench.add_argument("--json-dir", default=".", help="where bench-NAME.json go (default .)")
    all_bench.add_argument("--doc", help="the document to rewrite (default docs/BENCHMARKS.md)")

    rc_bench = bench_sub.add_parser(
        "reconcile",
        help="seconds per reconcile pass over many SKUs (target: 10,000 SKUs in <= 1 s)",
        description="Create and preload a sale of --skus SKUs, then time reconcile passes: "
        "the bare reads (ceiling), a clean service pass, a full --once pass, and a pass "
        "rebuilding 1 % of the SKUs after corrupting them. Medians of --passes. The sale is "
        "deleted afterwards, with its repairs and its Redis state. Exit 1 if the drift pass "
        "repairs anything but the corrupted SKUs.",
    )
    rc_bench.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    rc_bench.add_argument("--skus", default="10000", help="SKUs in the sale (default 10000)")
    rc_bench.add_argument("--passes", default="5", help="passes per row (default 5)")
