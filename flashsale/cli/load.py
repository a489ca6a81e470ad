"""``flashsale demo``, ``flashsale loadtest spike`` and ``flashsale chaos``: the load tools of
:mod:`loadtest`, imported when a command runs so the other commands start light. The
benchmarks are :mod:`flashsale.cli.bench`."""

from __future__ import annotations

import argparse
import os

from flashsale import event_loop
from flashsale.cli.checks import (
    fraction,
    http_url,
    output_file,
    output_folder,
    positive,
    results_doc,
    sale_id,
    seconds,
    within,
)
from flashsale.cli.dev import apply_migrations
from flashsale.cli.devstack.stack import DevStack
from flashsale.cli.output import out
from flashsale.engine_record import refuse_to_start_an_engine, running_engines
from flashsale.errors import ConfigError, InvalidInput, shown
from flashsale.keys import MAX_BUCKETS
from flashsale.salespec import MAX_ADMISSION_RATE
from flashsale.settings import Settings
from flashsale.wording import counted, rerun, span

SPIKE_HOST = "http://127.0.0.1:8080"  # `flashsale up`'s gateway at its defaults


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import demo  # noqa: PLC0415

    scenario = demo.Scenario(
        buyers=positive(int, "buyers", args.buyers), stock=positive(int, "stock", args.stock),
        pre_queue=fraction("pre-queue", args.pre_queue),
        arrival_s=seconds("arrival-seconds", args.arrival_seconds, zero=True),
        admission_rate=within("admission-rate", args.admission_rate, 1, MAX_ADMISSION_RATE),
        rate_change=_rate_change(args.rate_change),
        decline=fraction("decline", args.decline), no_show=fraction("no-show", args.no_show),
        abandon=fraction("abandon", args.abandon),
        window_s=int(seconds("window-seconds", args.window_seconds, 5, 3600, whole=True)),
    )  # fmt: skip
    if scenario.no_show + scenario.abandon > 1:
        raise InvalidInput("abandon", "--abandon and --no-show add up to more than 1")
    json_path = str(output_file("json", args.json)) if args.json else None
    _engine_may_start(settings)
    out("== starting the embedded stack (servers given by env vars are used as they are)")
    took = DevStack(settings.home).up()
    out(f"   ready in {took:.1f}s")
    settings = Settings.from_env()  # pick up the freshly written dev.env
    code = event_loop.run(demo.run(settings, scenario=scenario, progress=out, json_path=json_path))
    out(f"\nThe stack keeps running; stop it with `{rerun('dev', 'down')}`.")
    return code


def _engine_may_start(settings: Settings) -> None:
    """Refuse before the stack starts what the engine the run starts (loadtest.processes'
    ``engine``) would refuse once it had: a benchmark that makes sales runs on the stack, or
    another engine's payment simulator where this one would start its own."""
    refuse_to_start_an_engine(settings.home, own_simulator=not os.environ.get("FLASHSALE_PSP_URL"))


def _rate_change(value: str | None) -> tuple[float, int] | None:
    """``--rate-change SECONDS:RATE``."""
    if value is None:
        return None
    at, sep, rate = value.partition(":")
    if not sep:
        raise InvalidInput("rate-change", f"must be SECONDS:RATE (e.g. 5:250), got {shown(value)}")
    return (seconds("rate-change", at, zero=True),
            within("rate-change", rate, 1, MAX_ADMISSION_RATE))  # fmt: skip


def _running_gateway(settings: Settings) -> str:
    """The gateway of the engine running on the stack (``flashsale up`` records it), else
    ``up``'s at its defaults; refused when several run, as which one is meant is not known."""
    running = [engine["gateway"] for engine in running_engines(settings.home)]
    if len(running) > 1:
        raise InvalidInput("--host", f"{len(running)} engines run on this stack "
                                   f"({', '.join(running)}): name one")  # fmt: skip
    return running[0] if running else SPIKE_HOST


def _opens_in(args: argparse.Namespace) -> float:
    """``--opens-in``: when the copy a rehearsal makes opens (0, at once, when not given)."""
    from loadtest.spike_sale import MAX_WAIT_FOR_OPENING_S  # noqa: PLC0415 - a light CLI start

    if args.in_place and not args.sale:
        raise InvalidInput("in-place", "goes with --sale (the sale to rehearse itself)")
    if args.opens_in is None:
        return 0.0
    if not args.sale:
        raise InvalidInput("opens-in", "goes with --sale (when the copy it rehearses opens)")
    if args.in_place:
        raise InvalidInput("opens-in", "goes without --in-place: the sale opens when it was "
                                       "made to")  # fmt: skip
    wait = seconds("opens-in", args.opens_in, zero=True)
    if wait > MAX_WAIT_FOR_OPENING_S:
        raise InvalidInput("opens-in", f"must be at most {span(MAX_WAIT_FOR_OPENING_S)} (its "
                           "buyers wait in the copy's pre-queue until then), got "
                           f"{shown(args.opens_in)}")  # fmt: skip
    return wait


def cmd_loadtest(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import spike  # noqa: PLC0415

    if args.embedded and args.host:
        raise InvalidInput("host", "goes without --embedded, which starts an engine of its own")
    if args.sale and (args.stock or args.buckets):
        raise InvalidInput(
            "stock" if args.stock else "buckets",
            "goes without --sale, whose sale is rehearsed with its own products",
        )
    opens_in = _opens_in(args)
    options = spike.Options(
        buyers=positive(int, "buyers", args.buyers),
        stock=positive(int, "stock", args.stock or "100"),
        sale=sale_id("sale", args.sale) if args.sale else "", in_place=args.in_place,
        opens_in=opens_in,
        ramp=seconds("ramp", args.ramp), hold=seconds("hold", args.hold, zero=True),
        host=http_url("host", args.host or _running_gateway(settings)), embedded=args.embedded,
        out=output_folder("out", args.out or str(settings.home / "spike")),
        buckets=within("buckets", args.buckets or "1", 1, MAX_BUCKETS),
    )  # fmt: skip
    if args.embedded:
        _engine_may_start(settings)
        out("== starting the embedded stack (servers given by env vars are used as they are)")
        DevStack(settings.home).up()
        settings = Settings.from_env()
        event_loop.run(apply_migrations(settings, progress=lambda _line: None))
    if not settings.admin_token.current() or not settings.buyer_token_secret.reveal():
        raise ConfigError("FLASHSALE_ADMIN_TOKEN and FLASHSALE_BUYER_TOKEN_SECRET must be set "
                          "(the spike makes its sale and signs its buyers' tokens)")  # fmt: skip
    code = int(event_loop.run(spike.run(settings, options, out)))
    if args.embedded:  # the engine stopped with the run; the sale's data stays to audit
        out(f"\nThe stack keeps running; stop it with `{rerun('dev', 'down')}`.")
    return code


def cmd_chaos(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.chaos import suite  # noqa: PLC0415

    dev = DevStack(settings.home)
    try:  # --list: what a run would choose, those for a Redis Cluster too
        chosen = suite.choose(args.scenario, quick=args.quick, cluster=args.list
                              or settings.redis_cluster or dev.layout is not None)  # fmt: skip
    except ValueError as exc:
        raise InvalidInput("scenario", str(exc)) from exc
    if args.list:
        for scenario in chosen:
            count = counted(scenario.times, "fault") if scenario.inject else "abuse"
            quick = f", --quick: {scenario.quick_times}" if scenario.quick_times else ""
            out(f"{scenario.name:26} {scenario.group:9} {count}{quick}. {scenario.what}")
        return 0
    full = not args.scenario and not args.quick
    doc = results_doc(args.doc, "docs/RELIABILITY.md" if full else None,
                      "--quick or --scenario NAME")  # fmt: skip
    json_path = output_file("json", args.json) if args.json else None
    _engine_may_start(settings)
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


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole engine on the embedded stack, with buyers going through it",
        description="Starts the embedded stack and every service (flashsale up), waits until "
        "the order workers consume, creates a sale, sends a spike of buyers through the real "
        "journey when it opens (one in ten with a declined card), shows reservations "
        "becoming confirmed orders, and ends with the post-sale audit and a report (seconds "
        "until every buyer had an answer, against 10 s; sold, oversold, p50/p99 per route, "
        "the reservations' against 100/500 ms), then ends and archives the sale. Exit 1 if a "
        "buyer got an "
        "error, an order did not reach a final state, or the audit failed (not for a missed "
        "target).",
    )
    demo.set_defaults(handler=cmd_demo)
    demo.add_argument("--buyers", default="50000", help="buyers (default 50000)")
    demo.add_argument("--stock", default="100", help="units of the SKU (default 100)")
    demo.add_argument("--pre-queue", default="0.2", metavar="SHARE",
                      help="share of the buyers joining before the opening, whose places are "
                           "drawn at random (default 0.2)")  # fmt: skip
    demo.add_argument("--arrival-seconds", default="5", metavar="S",
                      help="the other buyers arrive evenly over this long after the opening, "
                           "seconds or a duration as 1m (default 5)")  # fmt: skip
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
        help="the sale's admission window, 5..3600 seconds or a duration as 2m (default 60)",
    )
    demo.add_argument("--json", metavar="PATH", help="also write the final report as JSON")

    loadtest = commands.add_parser("loadtest", help="spike tests with locust")
    loadtest.set_defaults(handler=cmd_loadtest)
    loadtest_sub = loadtest.add_subparsers(dest="loadtest_command", required=True,
                                           metavar="KIND")  # fmt: skip
    spike = loadtest_sub.add_parser(
        "spike",
        help="a locust spike (headless) against the engine, judged by the post-sale audit",
        description="Run loadtest/locustfile.py headless: make and preload a sale (or a copy of "
        "the one --sale names, to rehearse it), ramp 0 -> "
        "--buyers in --ramp seconds, hold, let every buyer finish, then audit. Writes CSV and "
        "HTML reports to --out. Exit non-zero on any failed invariant. With --embedded, start "
        "the embedded stack and flashsale up first (the engine stops at the end, the stack "
        "keeps running with the sale: `flashsale dev down` stops it); otherwise --host names "
        "a running gateway "
        "(and FLASHSALE_ADMIN_TOKEN, FLASHSALE_BUYER_TOKEN_SECRET must be its secrets).",
    )
    spike.add_argument("--buyers", default="1000", help="buyers in the spike (default 1000)")
    spike.add_argument("--stock", help="units of the SKU of the sale the spike makes "
                                       "(default 100)")  # fmt: skip
    spike.add_argument("--buckets", help=f"stock buckets of that SKU, 1..{MAX_BUCKETS} "
                                         "(default 1)")  # fmt: skip
    spike.add_argument("--sale", help="rehearse this sale instead, as its buyers will meet "
                                      "it, on a copy made for the run: its products, stock, "
                                      "limits and proof of work (the sale itself is only "
                                      "read)")  # fmt: skip
    spike.add_argument("--opens-in", metavar="DURATION",
                       help="with --sale, when the copy opens: 0 (default) at once, or up to "
                       "15m later, its buyers waiting in its pre-queue for the draw")  # fmt: skip
    spike.add_argument("--in-place", action="store_true",
                       help="with --sale, rehearse the sale itself (a copy made by hand, a "
                       "staging engine's): preloaded, opening at most 15 min away; its buyers "
                       "and orders stay in it")  # fmt: skip
    spike.add_argument("--ramp", default="10", help="seconds (or a duration as 1m) to bring "
                       "every buyer in (default 10)")  # fmt: skip
    spike.add_argument("--hold", default="5", help="seconds (or a duration as 1m) held after "
                       "the ramp (default 5)")  # fmt: skip
    spike.add_argument("--host", help="the gateway (default: that of the flashsale up running "
                                      f"on the stack, else {SPIKE_HOST}; not with --embedded, "
                                      "whose engine is its own)")  # fmt: skip
    spike.add_argument("--out", help="report folder (default: spike in the stack's folder, "
                                     "FLASHSALE_HOME or ./.flashsale)")  # fmt: skip
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
        help="the short set (a Postgres restart, a Redis SIGKILL with AOF restart, SIGKILLs "
        "of the reservations listener and of a worker, the reconciler race; on a Redis Cluster "
        "also a primary's failover), few faults each: --list --quick names them",
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
