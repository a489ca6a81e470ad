"""``flashsale bench`` (allocate, gateway, pipeline, reconcile, all), ``flashsale demo``,
``flashsale loadtest spike`` and ``flashsale chaos``: the load tools of :mod:`loadtest`,
imported when a command runs so the other commands start light."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flashsale import event_loop
from flashsale.cli.checks import fraction, non_negative, positive, service_settings, within
from flashsale.cli.dev import apply_migrations
from flashsale.cli.devstack.redis_cluster import Layout
from flashsale.cli.devstack.stack import DevStack
from flashsale.cli.output import fail, out
from flashsale.errors import ConfigError, InvalidInput
from flashsale.keys import MAX_BUCKETS
from flashsale.salespec import MAX_ADMISSION_RATE
from flashsale.settings import Settings, read_env_file

if TYPE_CHECKING:
    from loadtest.bench import Report


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import demo  # noqa: PLC0415

    scenario = demo.Scenario(
        buyers=positive(int, "buyers", args.buyers), stock=positive(int, "stock", args.stock),
        pre_queue=fraction("pre-queue", args.pre_queue),
        arrival_s=non_negative("arrival-seconds", args.arrival_seconds),
        admission_rate=within("admission-rate", args.admission_rate, 1, MAX_ADMISSION_RATE),
        rate_change=_rate_change(args.rate_change),
        decline=fraction("decline", args.decline), no_show=fraction("no-show", args.no_show),
        abandon=fraction("abandon", args.abandon),
        window_s=within("window-seconds", args.window_seconds, 5, 3600),
    )  # fmt: skip
    if scenario.no_show + scenario.abandon > 1:
        raise InvalidInput("abandon", "--abandon and --no-show add up to more than 1")
    out("== starting the embedded stack (servers given by env vars are used as they are)")
    seconds = DevStack(settings.home).up()
    out(f"   ready in {seconds:.1f}s")
    settings = Settings.from_env()  # pick up the freshly written dev.env
    code = event_loop.run(demo.run(settings, scenario=scenario, progress=out, json_path=args.json))
    out("\nThe stack keeps running; stop it with `.venv/bin/flashsale dev down`.")
    return code


def _rate_change(value: str | None) -> tuple[float, int] | None:
    """``--rate-change SECONDS:RATE``."""
    if value is None:
        return None
    at, sep, rate = value.partition(":")
    if not sep:
        raise InvalidInput("rate-change", f"must be SECONDS:RATE (e.g. 5:250), got {value!r}")
    return (non_negative("rate-change", at),
            within("rate-change", rate, 1, MAX_ADMISSION_RATE))  # fmt: skip


def cmd_loadtest(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import spike  # noqa: PLC0415

    options = spike.Options(
        buyers=positive(int, "buyers", args.buyers), stock=positive(int, "stock", args.stock),
        ramp=positive(float, "ramp", args.ramp), hold=non_negative("hold", args.hold),
        host=args.host, out=Path(args.out), embedded=args.embedded,
        buckets=within("buckets", args.buckets, 1, MAX_BUCKETS),
    )  # fmt: skip
    if not options.host.startswith(("http://", "https://")):
        raise InvalidInput("host", f"must be an http(s) URL, got {options.host!r}")
    if args.embedded:
        out("== starting the embedded stack (servers given by env vars are used as they are)")
        DevStack(settings.home).up()
        settings = Settings.from_env()
        event_loop.run(apply_migrations(settings, progress=lambda _line: None))
    if not settings.admin_token.reveal() or not settings.buyer_token_secret.reveal():
        raise ConfigError("FLASHSALE_ADMIN_TOKEN and FLASHSALE_BUYER_TOKEN_SECRET must be set "
                          "(the spike makes its sale and signs its buyers' tokens)")  # fmt: skip
    return int(event_loop.run(spike.run(settings, options, out)))


def cmd_chaos(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.chaos import suite  # noqa: PLC0415
    from loadtest.chaos.scenarios import SCENARIOS  # noqa: PLC0415

    if args.list:
        for scenario in SCENARIOS:
            count = f"{scenario.times} faults" if scenario.inject else "abuse"
            quick = f", --quick: {scenario.quick_times}" if scenario.quick_times else ""
            out(f"{scenario.name:26} {scenario.group:9} {count}{quick}. {scenario.what}")
        return 0
    dev = DevStack(settings.home)
    try:
        chosen = suite.choose(args.scenario, quick=args.quick,
                              cluster=settings.redis_cluster or dev.layout is not None)  # fmt: skip
    except ValueError as exc:
        raise InvalidInput("scenario", str(exc)) from exc
    full = not args.scenario and not args.quick
    doc = Path(args.doc) if args.doc else (Path("docs/RELIABILITY.md") if full else None)
    if doc is not None and not doc.is_file():
        raise InvalidInput("doc", f"no such file: {doc}")
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise InvalidInput("json", f"no folder {json_path.parent} to write it in")
    was_stopped = all(row.state == "stopped" for row in dev.status())
    out("== starting the embedded stack (servers given by env vars are used as they are; the "
        "suite kills, pauses and flushes those it started itself)")  # fmt: skip
    dev.up()
    settings = Settings.from_env()
    command = " ".join(["flashsale chaos", *(["--quick"] if args.quick else []),
                        *(f"--scenario {n}" for n in args.scenario or [])])  # fmt: skip
    try:
        event_loop.run(apply_migrations(settings, progress=lambda _line: None))
        return int(event_loop.run(suite.main(
            settings, dev, chosen, quick=args.quick, command=command, json_path=json_path,
            doc=doc, progress=out,
        )))  # fmt: skip
    finally:
        if was_stopped:
            out("== stopping the embedded stack this run started")
            dev.down(progress=lambda _line: None)


async def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    run = {"allocate": _allocate, "gateway": _gateway, "pipeline": _pipeline,
           "reconcile": _reconcile, "all": _bench_all}[args.bench_command]  # fmt: skip
    return await run(args, settings)


async def _allocate(args: argparse.Namespace, settings: Settings) -> int:
    from allocator.hold_scripts import MAX_RESERVE_BATCH  # noqa: PLC0415
    from loadtest import bench_allocate as bench  # noqa: PLC0415

    options = bench.Options(
        seconds=positive(float, "seconds", args.seconds),
        concurrency=positive(int, "concurrency", args.concurrency),
        max_batch=positive(int, "max-batch", args.max_batch),
    )
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
    return _report(report, bench.render, args.json, bench.failed(report), bench.FAILURE)


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
        seconds=positive(float, "seconds", args.seconds),
        rounds=positive(int, "rounds", args.rounds),
        concurrency=positive(int, "concurrency", args.concurrency),
        workers=positive(int, "workers", args.workers),
    )
    service_settings(settings)
    if not settings.admin_token:
        raise ConfigError("FLASHSALE_ADMIN_TOKEN is not set: run `flashsale dev up` or export it")
    report = await bench.run(settings, options, out, options.command())
    return _report(report, bench.render, args.json, bench.failed(report), bench.FAILURE)


async def _pipeline(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import bench_pipeline as bench  # noqa: PLC0415

    options = bench.Options(
        reservations=positive(int, "reservations", args.reservations),
        latencies=_latencies(args.latencies),
        concurrency=positive(int, "concurrency", args.concurrency),
        paced_seconds=positive(float, "paced-seconds", args.paced_seconds),
    )
    settings.require_redis()
    settings.require_database()
    settings.require_kafka()
    report = await bench.run(settings, options, out, options.command())
    return _report(report, bench.render, args.json, bench.failed(report), bench.FAILURE)


async def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import bench_reconcile as bench  # noqa: PLC0415

    options = bench.Options(
        skus=positive(int, "skus", args.skus), passes=positive(int, "passes", args.passes)
    )
    settings.require_redis()
    settings.require_database()
    report = await bench.run(settings, options, out, options.command())
    return _report(report, bench.render, args.json, bench.failed(report), bench.FAILURE)


def _latencies(text: str) -> tuple[float, ...]:
    try:
        latencies = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InvalidInput("latencies", f"must be comma-separated numbers, got {text!r}"
                           ) from None  # fmt: skip
    if not latencies or any(x < 0 for x in latencies):
        raise InvalidInput("latencies", "must be numbers >= 0")
    return latencies


def _report(report: Report, render: Callable[[Report], str], json_path: str | None,
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

    service_settings(settings)
    settings.require_kafka()
    folder = Path(args.json_dir)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    doc = Path(args.doc) if args.doc else (None if args.quick else Path("docs/BENCHMARKS.md"))
    if doc is not None and not await asyncio.to_thread(doc.is_file):
        raise InvalidInput("doc", f"no such file: {doc}")
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
    demo = commands.add_parser(
        "demo",
        help="the whole engine on the embedded stack, with buyers going through it",
        description="Starts the embedded stack and every service (flashsale up), creates a "
        "sale, sends a spike of buyers through the real journey when it opens (one in ten "
        "with a declined card), shows reservations becoming confirmed orders, and ends with "
        "the post-sale audit and a report (seconds until every buyer had an answer, against "
        "10 s; sold, oversold, p50/p99 per route, the reservations' against 100/500 ms), then "
        "ends the sale. Exit 1 if a buyer got an error, an order did not reach a final state, "
        "or the audit failed (not for a missed target).",
    )
    demo.set_defaults(handler=cmd_demo)
    demo.add_argument("--buyers", default="50000", help="buyers (default 50000)")
    demo.add_argument("--stock", default="100", help="units of the SKU (default 100)")
    demo.add_argument("--pre-queue", default="0.2", metavar="SHARE",
                      help="share of the buyers joining before the opening, whose places are "
                           "drawn at random (default 0.2)")  # fmt: skip
    demo.add_argument("--arrival-seconds", default="5", metavar="S",
                      help="the other buyers arrive evenly over this long after the opening "
                           "(default 5)")  # fmt: skip
    demo.add_argument(
        "--admission-rate",
        default="500",
        metavar="N",
        help="buyers admitted per second (default 500)",
    )
    demo.add_argument("--rate-change", metavar="SECONDS:RATE",
                      help="change the admission rate this long after the opening, as an "
                           "operator would (flashsale sale set-rate)")  # fmt: skip
    demo.add_argument(
        "--decline",
        default="0.1",
        metavar="SHARE",
        help="share paying with a card that is declined (default 0.1)",
    )
    demo.add_argument(
        "--no-show",
        default="0",
        metavar="SHARE",
        help="share who never use their admission (default 0)",
    )
    demo.add_argument(
        "--abandon",
        default="0",
        metavar="SHARE",
        help="share who close the tab while waiting, without leaving (default 0)",
    )
    demo.add_argument(
        "--window-seconds",
        default="60",
        metavar="S",
        help="the sale's admission window (default 60)",
    )
    demo.add_argument("--json", metavar="PATH", help="also write the final report as JSON")

    loadtest = commands.add_parser("loadtest", help="spike tests with locust")
    loadtest.set_defaults(handler=cmd_loadtest)
    loadtest_sub = loadtest.add_subparsers(dest="loadtest_command", required=True,
                                           metavar="KIND")  # fmt: skip
    spike = loadtest_sub.add_parser(
        "spike",
        help="a locust spike (headless) against the engine, judged by the post-sale audit",
        description="Run loadtest/locustfile.py headless: make and preload a sale, ramp 0 -> "
        "--buyers in --ramp seconds, hold, let every buyer finish, then audit. Writes CSV and "
        "HTML reports to --out. Exit non-zero on any failed invariant. With --embedded, start "
        "the embedded stack and flashsale up first; otherwise --host names a running gateway "
        "(and FLASHSALE_ADMIN_TOKEN, FLASHSALE_BUYER_TOKEN_SECRET must be its secrets).",
    )
    spike.add_argument("--buyers", default="1000", help="buyers in the spike (default 1000)")
    spike.add_argument("--stock", default="100", help="units of the SKU (default 100)")
    spike.add_argument(
        "--buckets",
        default="1",
        help=f"stock buckets of the spike's SKU, 1..{MAX_BUCKETS} (default 1)",
    )
    spike.add_argument("--ramp", default="10", help="seconds to bring every buyer in (default 10)")
    spike.add_argument("--hold", default="5", help="seconds held after the ramp (default 5)")
    spike.add_argument("--host", default="http://127.0.0.1:8080",
                       help="the gateway (default http://127.0.0.1:8080)")  # fmt: skip
    spike.add_argument("--out", default=".flashsale/spike", help="report folder")
    spike.add_argument("--embedded", action="store_true",
                       help="start the embedded stack and the engine for the run")  # fmt: skip

    chaos = commands.add_parser(
        "chaos",
        help="the fault-injection suite: spikes of buyers while servers and processes fail",
        description="Run named scenarios against the embedded stack (started if needed, and "
        "stopped again if this run started it) and the engine (flashsale up, started for the "
        "run). Each scenario is a spike of buyers with one kind of fault injected several "
        "times (Postgres, Redis and broker restarts, kills and stalls; SIGKILL of engine "
        "processes; payment provider storms; network faults through a TCP proxy; the "
        "reconciler racing live confirms) or hostile requests sent beside it. Afterwards it "
        "drains, makes a reconcile pass, runs the audit and judges: 0 HTTP 5xx other than 503, "
        "a Retry-After on every 503, 0 buyers without an answer, 0 invariant violations, 0 "
        "acknowledged reservations lost. DESTRUCTIVE: it kills, flushes and restarts the "
        "stack's servers; run it on a stack whose data you can lose. A full run (no --quick, "
        "no --scenario) rewrites the '<!-- chaos: results -->' block of docs/RELIABILITY.md. "
        "Exit 0 only when every scenario is clean.",
    )
    chaos.set_defaults(handler=cmd_chaos)
    chaos.add_argument(
        "--quick",
        action="store_true",
        help="the short set (a Postgres restart, a Redis SIGKILL with AOF "
        "restart, a worker SIGKILL, the reconciler race), few faults each",
    )
    chaos.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeatable; see --list)",
    )
    chaos.add_argument("--list", action="store_true", help="list the scenarios and exit")
    chaos.add_argument("--json", metavar="PATH", help="write the results as JSON")
    chaos.add_argument("--doc", help="the document whose results block to rewrite "
                       "(default: docs/RELIABILITY.md after a full run)")  # fmt: skip

    bench = commands.add_parser("bench", help="benchmarks (need a running stack)")
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
    allocate.add_argument("--seconds", default="3", help="seconds per row (default 3)")
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
        help="queue join and status req/s against a bare aiohttp endpoint",
        description="Starts the gateway and a trivial aiohttp endpoint with --workers processes "
        "each, drives each row with the same closed-loop client for --seconds, and prints "
        "req/s, p50 and p99 and the ratio to the bare endpoint (targets: status >= 70%%, "
        "join >= 40%%). Exit 1 only if a request failed.",
    )
    gw_bench.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    gw_bench.add_argument("--seconds", default="10", help="seconds per row (default 10)")
    gw_bench.add_argument(
        "--rounds", default="5", help="interleaved rounds the seconds are split into (default 5)"
    )
    gw_bench.add_argument("--concurrency", default="64", help="requests in flight (default 64)")
    gw_bench.add_argument("--workers", default="2", help="processes per server (default 2)")

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
                          help="length of the latency run (default 5)")  # fmt: skip

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
        "rebuilding 1 %% of the SKUs after corrupting them. Medians of --passes. Exit 1 if "
        "the drift pass repairs anything but the corrupted SKUs.",
    )
    rc_bench.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    rc_bench.add_argument("--skus", default="10000", help="SKUs in the sale (default 10000)")
    rc_bench.add_argument("--passes", default="5", help="passes per row (default 5)")
