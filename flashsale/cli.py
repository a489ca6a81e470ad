"""The ``flashsale`` command line. Every command reads Settings once, here, and passes them down.

Errors are one line on stderr (``flashsale: error: skus[0].stock: must be a positive integer``)
with a non-zero exit: 2 for bad input, 1 for anything else. Nothing is written on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.exceptions
import uvloop

from allocator.scripts import MAX_RESERVE_BATCH
from flashsale import __version__
from flashsale.clients import pg_pool, redis_client
from flashsale.devstack import DevStack
from flashsale.errors import ConfigError, FlashsaleError, InvalidInput, Unavailable
from flashsale.keys import ID_PATTERN
from flashsale.migrate import migrate
from flashsale.sales import SaleAdmin
from flashsale.salespec import parse_csv, parse_sale
from flashsale.settings import Settings, configure_logging
from flashsale.tokens import Signer
from loadtest.bench import Report


def out(line: str = "") -> None:
    print(line, flush=True)


def dump_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


@contextlib.asynccontextmanager
async def admin(settings: Settings) -> AsyncIterator[SaleAdmin]:
    """A SaleAdmin over fresh clients, closed on exit."""
    pool = await pg_pool(settings, max_size=4)
    client = redis_client(settings)
    try:
        yield SaleAdmin.build(pool, client)
    finally:
        await client.aclose()
        await pool.close()


# -- dev stack ------------------------------------------------------------------------------


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    stack = DevStack(settings.home)
    if args.dev_command == "up":
        seconds = stack.up(timeout=args.timeout)
        out(f"stack ready in {seconds:.1f}s; env in {stack.env_file}")
        out('use it from a shell with: eval "$(flashsale dev env)"')
        return 0
    if args.dev_command == "down":
        stack.down(purge=args.purge)
        return 0
    if args.dev_command == "env":
        sys.stdout.write(stack.env_lines())
        return 0
    rows = stack.status()
    for row in rows:
        where = row.url or "-"
        pid = f"pid {row.pid}" if row.pid else ""
        version = f"v{row.version}" if row.version else ""
        out(f"{row.name:9} {row.state:8} {where:48} {pid:10} {version:8} {row.detail}")
    return 0 if all(r.state in ("running", "external") for r in rows) else 3


# -- migrations -----------------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    dsn = settings.require_database()
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach Postgres: {exc}") from exc
    try:
        await migrate(conn, progress=out)
    finally:
        await conn.close()
    return 0


# -- sales ----------------------------------------------------------------------------------


def read_input(path: str) -> str:
    """The text of ``path`` ('-' is stdin); an unreadable file is bad input."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise InvalidInput("file", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput("file", f"{path} is not UTF-8 text") from None


def read_json_file(path: str) -> Any:
    raw = read_input(path)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            "file", f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


SKU_FLAGS = {
    "title": "title",
    "stock": "stock",
    "price": "price",
    "currency": "currency",
    "limit": "per_buyer_limit",
    "ttl": "hold_ttl_seconds",
}
SALE_FLAGS = {
    "name": "name",
    "starts_at": "starts_at",
    "ends_at": "ends_at",
    "admission_rate": "admission_rate",
    "max_queue": "max_queue",
}


def sale_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {
        key: getattr(args, flag) for flag, key in SALE_FLAGS.items() if getattr(args, flag)
    }
    sku = {key: getattr(args, flag) for flag, key in SKU_FLAGS.items() if getattr(args, flag)}
    if args.sku:
        data["skus"] = [{"sku": args.sku, **sku}]
    elif sku:
        raise InvalidInput("sku", "--sku is required with --stock/--price/--currency/...")
    return data


async def cmd_sale(args: argparse.Namespace, settings: Settings) -> int:
    command = args.sale_command
    # Validate everything before opening a connection: bad input writes nothing.
    if command == "create":
        given_flags = [f for f in (*SALE_FLAGS, *SKU_FLAGS, "sku") if getattr(args, f)]
        if args.file and given_flags:
            raise InvalidInput(given_flags[0], "give either --file or flags, not both")
        spec = parse_sale(read_json_file(args.file) if args.file else sale_from_flags(args))
        async with admin(settings) as sales:
            created = await sales.create(spec)
        dump_json(created) if args.json else out(created["id"])
        return 0
    if command == "import":
        specs = parse_csv(read_input(args.file))
        async with admin(settings) as sales:
            await sales.import_skus(args.sale, specs)
        out(
            f"imported {len(specs)} SKUs into {args.sale}; run `flashsale sale preload {args.sale}`"
        )
        return 0
    async with admin(settings) as sales:
        if command == "list":
            for sale in await sales.list_sales():
                out(f"{sale['id']}  {sale['state']:9}  {sale['starts_at']}  {sale['name']}")
        elif command == "show":
            dump_json(await sales.get(args.sale))
        elif command == "preload":
            results = await sales.preload(args.sale, force=args.force)
            for r in results:
                out(f"{r.sku}: {r.outcome} (total {r.counts.total}, available {r.counts.available},"
                    f" held {r.counts.held}, sold {r.counts.sold})")  # fmt: skip
        elif command == "status":
            print_status(await sales.status(args.sale), as_json=args.json)
        elif command == "add-stock":
            print_status(await sales.add_stock(args.sale, args.sku, args.units), as_json=False)
        else:
            sale = await sales.set_status(args.sale, command)
            out(f"{sale['id']}: status {sale['status']} (state {sale['state']})")
    return 0


def print_status(status: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        dump_json(status)
        return
    sale = status["sale"]
    out(f'sale {sale["id"]}  "{sale["name"]}"  state={sale["state"]}  status={sale["status"]}')
    out(f"  starts {sale['starts_at']}  ends {sale['ends_at']}  preloaded {sale['preloaded_at']}")
    out(f"  {'SKU':20} {'STOCK':>10} {'AVAILABLE':>10} {'HELD':>8} {'SOLD':>8} {'CONFIRMED':>10}")

    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    for row in status["skus"]:
        out(
            f"  {row['sku']:20} {row['stock_total']:>10} {cell(row['available']):>10}"
            f" {cell(row['held']):>8} {cell(row['sold']):>8} {row['confirmed']:>10}"
        )


# -- demo -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    out("== starting the embedded stack (servers given by env vars are used as they are)")
    stack = DevStack(settings.home)
    seconds = stack.up()
    out(f"   ready in {seconds:.1f}s")
    settings = Settings.from_env()  # pick up the freshly written dev.env
    from loadtest import demo  # noqa: PLC0415 - keep the CLI's start-up light

    buyers = positive(int, "buyers", args.buyers)
    stock = positive(int, "stock", args.stock)
    code = uvloop.run(demo.run(settings, buyers=buyers, stock=stock, progress=out,
                               json_path=args.json))  # fmt: skip
    out("\nThe stack keeps running; stop it with `.venv/bin/flashsale dev down`.")
    return code


def cmd_loadtest(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import spike  # noqa: PLC0415 - keep the CLI's start-up light

    options = spike.Options(
        buyers=positive(int, "buyers", args.buyers), stock=positive(int, "stock", args.stock),
        ramp=positive(float, "ramp", args.ramp), hold=non_negative("hold", args.hold),
        host=args.host, out=Path(args.out), embedded=args.embedded,
    )  # fmt: skip
    if not options.host.startswith(("http://", "https://")):
        raise InvalidInput("host", f"must be an http(s) URL, got {options.host!r}")
    if args.embedded:
        out("== starting the embedded stack (servers given by env vars are used as they are)")
        DevStack(settings.home).up()
        settings = Settings.from_env()
        uvloop.run(_migrated(settings))
    if not settings.admin_token.reveal() or not settings.buyer_token_secret.reveal():
        raise ConfigError("FLASHSALE_ADMIN_TOKEN and FLASHSALE_BUYER_TOKEN_SECRET must be set "
                          "(the spike makes its sale and signs its buyers' tokens)")  # fmt: skip
    return int(uvloop.run(spike.run(settings, options, out)))


async def _migrated(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.require_database(), timeout=5)
    try:
        await migrate(conn, progress=lambda _line: None)
    finally:
        await conn.close()


# -- tokens ---------------------------------------------------------------------------------


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    count = positive(int, "count", args.count)
    ttl = positive(float, "ttl", args.ttl)
    if not ID_PATTERN.match(f"{args.prefix}0"):
        raise InvalidInput("prefix", "letters, digits, '.', '_' or '-' (buyer ids are ids)")
    secret = settings.buyer_token_secret.reveal()
    if not secret:
        raise ConfigError(
            "FLASHSALE_BUYER_TOKEN_SECRET is not set: run `flashsale dev up` or export it"
        )
    signer = Signer.from_setting(secret, "buyer")
    lines = (f"{args.prefix}{i}\t{signer.sign({'sub': f'{args.prefix}{i}'}, ttl)}\n"
             for i in range(count))  # fmt: skip
    sys.stdout.writelines(lines)
    return 0


# -- benchmarks -----------------------------------------------------------------------------


def positive(kind: type[int] | type[float], field: str, value: str) -> Any:
    try:
        parsed = kind(value)
    except ValueError:
        raise InvalidInput(field, f"must be a positive number, got {value!r}") from None
    if parsed <= 0:
        raise InvalidInput(field, f"must be a positive number, got {value!r}")
    return parsed


async def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    if args.bench_command == "gateway":
        return await bench_gateway(args, settings)
    if args.bench_command == "pipeline":
        return await bench_pipeline(args, settings)
    if args.bench_command == "reconcile":
        return await bench_reconcile(args, settings)
    if args.bench_command == "all":
        return await bench_all(args, settings)
    from loadtest import bench_allocate  # noqa: PLC0415 - keep the CLI's start-up light

    options = bench_allocate.Options(
        seconds=positive(float, "seconds", args.seconds),
        concurrency=positive(int, "concurrency", args.concurrency),
        max_batch=positive(int, "max-batch", args.max_batch),
    )
    if options.max_batch > MAX_RESERVE_BATCH:
        raise InvalidInput("max-batch", f"must be at most {MAX_RESERVE_BATCH}")
    settings.require_redis()
    settings.require_database()
    report = await bench_allocate.run(settings, options, out, options.command())
    broken = [r.name for r in report.rows if r.extra.get("consistent") is False]
    return _report(report, bench_allocate.render, args.json, broken,
                   "stock moved by a different amount than decisions in")  # fmt: skip


def _report(report: Report, render: Callable[[Report], str], json_path: str | None,
            failed: list[str], failure: str) -> int:  # fmt: skip
    """Print a benchmark's tables, write its JSON, and exit 1 naming the rows that failed."""
    out()
    out(render(report))
    if json_path:
        report.write_json(json_path)
        out(f"\nwrote {json_path}")
    if failed:
        print(f"flashsale: error: {failure} {failed}", file=sys.stderr)
        return 1
    return 0


async def bench_all(args: argparse.Namespace, settings: Settings) -> int:
    """Every benchmark, then the tables of docs/BENCHMARKS.md rewritten (see bench_all)."""
    from loadtest import (  # noqa: PLC0415 - keep the CLI's start-up light
        bench_all,
        bench_allocate,
        bench_gateway,
        bench_pipeline,
        bench_reconcile,
        demo,
    )
    from loadtest.bench import machine  # noqa: PLC0415

    _service_settings(settings)
    settings.require_kafka()
    quick = args.quick
    folder = Path(args.json_dir)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    doc = Path(args.doc) if args.doc else (None if quick else Path("docs/BENCHMARKS.md"))
    if doc is not None and not await asyncio.to_thread(doc.is_file):
        raise InvalidInput("doc", f"no such file: {doc}")

    def outcome(name: str, report: Report, render: Callable[[Report], str],
                ok: bool) -> bench_all.Outcome:  # fmt: skip
        bench_all.write_json(folder / f"bench-{name}.json", report.as_json())
        out(render(report))
        return bench_all.Outcome(name, bench_all.block_for_report(report, render(report)), ok,
                                 all(t.met for t in report.targets))  # fmt: skip

    async def allocate() -> bench_all.Outcome:
        o = bench_allocate.Options(seconds=0.3) if quick else bench_allocate.Options()
        report = await bench_allocate.run(settings, o, out, o.command())
        ok = all(r.extra.get("consistent") is not False for r in report.rows)
        return outcome("allocate", report, bench_allocate.render, ok)

    async def gateway() -> bench_all.Outcome:
        o = bench_gateway.Options(seconds=0.6, rounds=2, workers=1) if quick \
            else bench_gateway.Options()  # fmt: skip
        report = await bench_gateway.run(settings, o, out, o.command())
        ok = not any(r.extra["non_200"] for r in report.rows)
        return outcome("gateway", report, bench_gateway.render, ok)

    async def pipeline() -> bench_all.Outcome:
        o = bench_pipeline.Options()
        if quick:
            o = bench_pipeline.Options(reservations=300, latencies=(0.0,), concurrency=100,
                                       paced_seconds=1)  # fmt: skip
        report = await bench_pipeline.run(settings, o, out, o.command())
        ok = all(r.extra.get("consistent") is not False for r in report.rows)
        return outcome("pipeline", report, bench_pipeline.render, ok)

    async def reconcile() -> bench_all.Outcome:
        o = bench_reconcile.Options(skus=300, passes=1) if quick else bench_reconcile.Options()
        report = await bench_reconcile.run(settings, o, out, o.command())
        ok = all(r.extra.get("consistent") is not False for r in report.rows)
        return outcome("reconcile", report, bench_reconcile.render, ok)

    async def spike() -> bench_all.Outcome:
        buyers = 2000 if quick else 50_000
        path = folder / "bench-demo.json"
        described = machine()
        code = await demo.run(settings, buyers=buyers, stock=100, progress=out,
                              json_path=str(path))  # fmt: skip
        data = orjson.loads(await asyncio.to_thread(path.read_bytes))
        seconds = data["seconds_to_answer_all"]
        met = seconds is not None and seconds <= data["target_seconds"]
        return bench_all.Outcome("demo", bench_all.block_for_demo(data, described), code == 0,
                                 met)  # fmt: skip

    # The demo first: the others leave sales behind (the reconcile run, 10,000 SKUs) that
    # the services keep an eye on for a while.
    runners: dict[str, bench_all.Runner] = {
        "demo": spike, "allocate": allocate, "gateway": gateway, "pipeline": pipeline,
        "reconcile": reconcile,
    }  # fmt: skip
    if doc is None:
        outcomes = [await runner() for runner in runners.values()]
    else:
        outcomes = await bench_all.run_all(runners, doc, out)
    out("\n" + "\n".join(
        f"{o.name:10} checks {'ok' if o.ok else 'FAILED'}, targets "
        f"{'all met' if o.targets_met else 'not all met'}" for o in outcomes
    ))  # fmt: skip
    failed = [o.name for o in outcomes if not o.ok]
    if failed:
        print(f"flashsale: error: consistency checks failed in {failed}", file=sys.stderr)
        return 1
    return 0


async def bench_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import bench_reconcile as bench  # noqa: PLC0415

    options = bench.Options(
        skus=positive(int, "skus", args.skus), passes=positive(int, "passes", args.passes)
    )
    settings.require_redis()
    settings.require_database()
    report = await bench.run(settings, options, out, options.command())
    broken = [r.name for r in report.rows if r.extra.get("consistent") is False]
    return _report(report, bench.render, args.json, broken,
                   "the drift pass did not repair exactly the corrupted SKUs in")  # fmt: skip


async def bench_pipeline(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import bench_pipeline as bench  # noqa: PLC0415

    try:
        latencies = tuple(float(x) for x in args.latencies.split(","))
    except ValueError:
        raise InvalidInput("latencies", f"must be comma-separated numbers, got {args.latencies!r}"
                           ) from None  # fmt: skip
    if not latencies or any(x < 0 for x in latencies):
        raise InvalidInput("latencies", "must be numbers >= 0")
    options = bench.Options(
        reservations=positive(int, "reservations", args.reservations),
        latencies=latencies,
        concurrency=positive(int, "concurrency", args.concurrency),
        paced_seconds=positive(float, "paced-seconds", args.paced_seconds),
    )
    settings.require_redis()
    settings.require_database()
    settings.require_kafka()
    report = await bench.run(settings, options, out, options.command())
    broken = [r.name for r in report.rows if r.extra.get("consistent") is False]
    return _report(report, bench.render, args.json, broken,
                   "confirmed orders disagree with the holds granted in")  # fmt: skip


async def bench_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest import bench_gateway as bench  # noqa: PLC0415

    options = bench.Options(
        seconds=positive(float, "seconds", args.seconds),
        rounds=positive(int, "rounds", args.rounds),
        concurrency=positive(int, "concurrency", args.concurrency),
        workers=positive(int, "workers", args.workers),
    )
    _service_settings(settings)
    if not settings.admin_token:
        raise ConfigError("FLASHSALE_ADMIN_TOKEN is not set: run `flashsale dev up` or export it")
    report = await bench.run(settings, options, out, options.command())
    failed = [r.name for r in report.rows if r.extra["non_200"]]
    return _report(report, bench.render, args.json, failed, "requests failed in")


# -- services -------------------------------------------------------------------------------


def port_number(field: str, value: str) -> int:
    port = positive(int, field, value)
    if port > 65535:
        raise InvalidInput(field, f"must be a TCP port (1..65535), got {value!r}")
    return int(port)


def _service_settings(settings: Settings) -> None:
    """Fail before forking anything when the stack or the secrets are not configured."""
    from gateway.app import Signers  # noqa: PLC0415

    settings.require_redis()
    settings.require_database()
    Signers.from_settings(settings)


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from flashsale import services  # noqa: PLC0415

    port = port_number("port", args.port)
    workers = positive(int, "workers", args.workers)
    _service_settings(settings)
    if workers == 1:
        return int(uvloop.run(
            services.serve_gateway(settings, args.host, port, reuse_port=args.reuse_port)
        ))  # fmt: skip
    metrics_dir = services.fresh_metrics_dir(settings.home, f"gateway-{port}")
    out(f"gateway: {workers} processes on http://{args.host}:{port} (Ctrl-C stops them)")
    children = services.gateway_children(args.host, port, workers, metrics_dir)
    return services.supervise(children, metrics_dir)


def cmd_allocator(args: argparse.Namespace, settings: Settings) -> int:
    from flashsale import services  # noqa: PLC0415

    ops_port = port_number("ops-port", args.ops_port) if args.ops_port else None
    settings.require_redis()
    settings.require_database()
    return int(uvloop.run(services.serve_allocator(settings, args.host, ops_port)))


SHOWN = 20  # repairs listed by `reconcile --once` before "... and N more"


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from flashsale import services  # noqa: PLC0415
    from reconciler import service  # noqa: PLC0415

    interval = positive(float, "interval", args.interval)
    stuck = positive(float, "stuck-after", args.stuck_after)
    for sale_id in args.sale or []:
        if not ID_PATTERN.match(sale_id):
            raise InvalidInput("sale", f"not a sale id: {sale_id!r}")
    ops_port = port_number("ops-port", args.ops_port) if args.ops_port else None
    settings.require_redis()
    settings.require_database()
    if not args.once:
        return int(uvloop.run(services.serve_reconciler(
            settings, args.host, ops_port, interval=interval, stuck_after_s=stuck,
        )))  # fmt: skip
    report = uvloop.run(service.reconcile_once(settings, args.sale, stuck))
    if args.json:
        dump_json(report.json())
    else:
        out(f"reconciled {report.skus} SKUs in {report.seconds:.3f}s: {report.changed} repairs, "
            f"{len(report.flags)} flags, {len(report.unresolved)} unresolved")  # fmt: skip
        items = report.repairs + report.flags
        for item in items[:SHOWN]:
            out(f"  {item.kind:16} {item.sale_id}/{item.sku or '-'} {item.subject or ''}"
                f"  {item.before} -> {item.after}")  # fmt: skip
        for line in report.unresolved[:SHOWN]:
            out(f"  unresolved: {line}")
        hidden = max(0, len(items) - SHOWN) + max(0, len(report.unresolved) - SHOWN)
        if hidden:
            out(f"  ... and {hidden} more (--json shows all; every repair is in reconcile_events)")
    return 3 if report.unresolved else 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler import service  # noqa: PLC0415

    if not ID_PATTERN.match(args.sale):
        raise InvalidInput("sale", f"not a sale id: {args.sale!r}")
    settings.require_redis()
    settings.require_database()
    settings.require_kafka()
    report = uvloop.run(service.audit(settings, args.sale))
    if args.json:
        dump_json({"passed": report.passed, "invariants": [i.json() for i in report.invariants],
                   "sale_id": report.sale_id, "facts": report.facts})  # fmt: skip
    else:
        out(report.text())
    return 0 if report.passed else 1


async def cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from flashsale.kafka import ensure_topics  # noqa: PLC0415

    await ensure_topics(settings, progress=out)
    return 0


def cmd_workers(args: argparse.Namespace, settings: Settings) -> int:
    from flashsale import services  # noqa: PLC0415

    concurrency = positive(int, "concurrency", args.concurrency)
    ops_port = port_number("ops-port", args.ops_port) if args.ops_port else None
    settings.require_redis()
    settings.require_database()
    settings.require_kafka()
    if not settings.psp_url:
        raise ConfigError("FLASHSALE_PSP_URL is not set: point it at the payment provider "
                          "(`flashsale psp` serves a simulator)")  # fmt: skip
    return int(uvloop.run(services.serve_workers(settings, args.host, ops_port, concurrency)))


def cmd_psp(args: argparse.Namespace, settings: Settings) -> int:
    from flashsale import services  # noqa: PLC0415
    from workers.psp import Knobs  # noqa: PLC0415

    port = port_number("port", args.port)
    knobs = Knobs(
        latency_ms=non_negative("latency-ms", args.latency_ms),
        jitter_ms=non_negative("jitter-ms", args.jitter_ms),
        decline_rate=fraction("decline-rate", args.decline_rate),
        error_rate=fraction("error-rate", args.error_rate),
        timeout_rate=fraction("timeout-rate", args.timeout_rate),
        hang_s=non_negative("hang-s", args.hang_s),
        seed=int(non_negative("seed", args.seed)),
    )
    out(f"psp simulator on http://{args.host}:{port} ({knobs})")
    return int(uvloop.run(services.serve_psp(args.host, port, knobs)))


def non_negative(field: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidInput(field, f"must be a number, got {value!r}") from None
    if not number >= 0:
        raise InvalidInput(field, f"must be >= 0, got {value!r}")
    return number


def fraction(field: str, value: str) -> float:
    number = non_negative(field, value)
    if number > 1:
        raise InvalidInput(field, f"must be within 0..1, got {value!r}")
    return number


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from flashsale import services  # noqa: PLC0415

    port = port_number("port", args.port)
    workers = positive(int, "workers", args.workers)
    allocator_port = port_number("allocator-port", args.allocator_port or str(port + 1))
    workers_port = port_number("workers-port", args.workers_port or str(port + 2))
    psp_port = port_number("psp-port", args.psp_port or str(port + 3))
    reconciler_port = port_number("reconciler-port", args.reconciler_port or str(port + 4))
    _service_settings(settings)
    settings.require_kafka()
    metrics_dir = services.fresh_metrics_dir(settings.home, f"gateway-{port}")
    psp_url = settings.psp_url or f"http://{args.host}:{psp_port}"
    children = [
        *services.gateway_children(args.host, port, workers, metrics_dir, psp_url),
        services.allocator_child(args.host, allocator_port),
        services.workers_child(args.host, workers_port, psp_url),
        services.reconciler_child(args.host, reconciler_port, psp_url),
    ]
    if not settings.psp_url:
        children.append(services.psp_child(args.host, psp_port))
    out(
        f"flashsale up: gateway x{workers} on http://{args.host}:{port}; ops endpoints "
        f"(/healthz, /metrics): allocator :{allocator_port}, workers :{workers_port}, "
        f"reconciler :{reconciler_port}; "
        f"payments: {psp_url}"
        + ("" if settings.psp_url else " (simulator)")
        + ". Ctrl-C or SIGTERM stops everything."
    )
    return services.supervise(children, metrics_dir)


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashsale",
        description="Flash-sale allocation engine: the dev stack, migrations, sale administration, "
        "the services (gateway, allocator, workers, payment simulator) and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"flashsale {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="embedded Redis + PostgreSQL + Kafka broker")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    up = dev_sub.add_parser("up", help="start (or reuse) the stack; write .flashsale/dev.env")
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    down = dev_sub.add_parser("down", help="stop the stack cleanly")
    down.add_argument("--purge", action="store_true", help="also delete its data and secrets")
    dev_sub.add_parser("status", help="what runs where (exit 3 if something is down)")
    dev_sub.add_parser("env", help="print the export lines of .flashsale/dev.env")

    commands.add_parser("migrate", help="apply pending Postgres migrations (re-runnable)")

    sale = commands.add_parser("sale", help="create, preload and operate sales")
    sale_sub = sale.add_subparsers(dest="sale_command", required=True, metavar="ACTION")
    create = sale_sub.add_parser(
        "create",
        help="create a sale from --file or flags; prints its id",
        description="Create a sale from a JSON sale file (--file, '-' for stdin) or from flags "
        "describing the sale and at most one SKU. Prints the sale id, or the whole sale with "
        "--json.",
    )
    create.add_argument("--file", help="sale file (JSON, see README); '-' reads stdin")
    create.add_argument("--json", action="store_true", help="print the created sale as JSON")
    create.add_argument("--name")
    create.add_argument("--starts-at", help="ISO 8601 with timezone (default: now)")
    create.add_argument("--ends-at", help="ISO 8601 with timezone (default: starts + 1h)")
    create.add_argument("--admission-rate", help="buyers admitted per second (default 500)")
    create.add_argument("--max-queue", help="queue cap (default 200000)")
    create.add_argument("--sku", help="SKU id (letters, digits, . _ -)")
    create.add_argument("--title", help="SKU title (default: the SKU id)")
    create.add_argument("--stock", help="units (positive integer)")
    create.add_argument("--price", help="price in integer minor units (cents)")
    create.add_argument("--currency", help="ISO 4217 code, e.g. EUR")
    create.add_argument("--limit", help="per-buyer limit (default 1)")
    create.add_argument("--ttl", help="hold TTL in seconds (default 120)")

    imp = sale_sub.add_parser("import", help="add SKUs from a CSV file (all rows validated first)")
    imp.add_argument("file", help="CSV with header sku,title,stock,price,currency,...")
    imp.add_argument("--sale", required=True, help="sale id")

    sale_sub.add_parser("list", help="list sales")
    show = sale_sub.add_parser("show", help="print a sale's configuration as JSON")
    show.add_argument("sale")
    preload = sale_sub.add_parser("preload", help="copy configuration and stock into Redis")
    preload.add_argument("sale")
    preload.add_argument(
        "--force", action="store_true",
        help="reload even with held or sold units (they are never reset)",
    )  # fmt: skip
    status = sale_sub.add_parser("status", help="per SKU: stock, available, held, sold, confirmed")
    status.add_argument("sale")
    status.add_argument("--json", action="store_true")
    add = sale_sub.add_parser("add-stock", help="add N units to a SKU (Postgres, then Redis)")
    add.add_argument("sale")
    add.add_argument("sku")
    add.add_argument("units", metavar="N")
    for action, text in (
        ("pause", "stop granting reservations"),
        ("resume", "resume a paused sale"),
        ("end", "end the sale for good"),
    ):
        sale_sub.add_parser(action, help=text).add_argument("sale")

    demo = commands.add_parser(
        "demo",
        help="the whole engine on the embedded stack, with buyers going through it",
        description="Starts the embedded stack and every service (flashsale up), creates a "
        "sale, sends a spike of buyers through the real journey when it opens (one in ten "
        "with a declined card), shows reservations becoming confirmed orders, and ends with "
        "the post-sale audit and a report (seconds until every buyer had an answer, sold, "
        "oversold, p50/p99 per route). Exit 1 if a buyer got an error, an order did not "
        "reach a final state, or the audit failed.",
    )
    demo.add_argument("--buyers", default="50000",
                      help="buyers arriving when the sale opens (default 50000)")  # fmt: skip
    demo.add_argument("--stock", default="100", help="units of the SKU (default 100)")
    demo.add_argument("--json", metavar="PATH", help="also write the final report as JSON")

    loadtest = commands.add_parser("loadtest", help="spike tests with locust")
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
    spike.add_argument("--ramp", default="10", help="seconds to bring every buyer in (default 10)")
    spike.add_argument("--hold", default="5", help="seconds held after the ramp (default 5)")
    spike.add_argument("--host", default="http://127.0.0.1:8080",
                       help="the gateway (default http://127.0.0.1:8080)")  # fmt: skip
    spike.add_argument("--out", default=".flashsale/spike", help="report folder")
    spike.add_argument("--embedded", action="store_true",
                       help="start the embedded stack and the engine for the run")  # fmt: skip

    token = commands.add_parser("token", help="mint signed tokens for tests and load tools")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="KIND")
    buyers = token_sub.add_parser(
        "buyers",
        help="print 'buyer_id<TAB>token' lines signed with FLASHSALE_BUYER_TOKEN_SECRET",
        description="Mint buyer tokens as the storefront would: one 'buyer_id<TAB>token' line "
        "per buyer, ids PREFIX0, PREFIX1, ... Send a token as 'Authorization: Bearer TOKEN'.",
    )
    buyers.add_argument("--count", default="1", help="how many buyers (default 1)")
    buyers.add_argument("--prefix", default="buyer-", help="buyer id prefix (default buyer-)")
    buyers.add_argument("--ttl", default="86400", help="validity in seconds (default 86400)")

    bench = commands.add_parser("bench", help="benchmarks (need a running stack)")
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

    gw = commands.add_parser(
        "gateway",
        help="serve the buyer API, the waiting room and the admin API",
        description="Serve the HTTP gateway. With --workers N, N processes share the port "
        "(SO_REUSEPORT) under a supervisor that restarts crashed ones.",
    )
    gw.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    gw.add_argument("--port", default="8080", help="TCP port (default 8080)")
    gw.add_argument("--workers", default="1", help="processes (default 1)")
    gw.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    alloc = commands.add_parser(
        "allocator",
        help="run the admission pumps, the hold sweeper and the outbox relay",
        description="The allocator service: one admission pump per live sale (leader-elected "
        "through a Redis lease, so replicas are safe), the hold-expiry sweeper, and the relay "
        "of the SKU outbox streams to the Kafka reservations topic.",
    )
    alloc.add_argument("--host", default="127.0.0.1", help="address of the ops endpoints")
    alloc.add_argument("--ops-port", help="serve /healthz and /metrics on this port")

    kafka = commands.add_parser("kafka", help="create the Kafka topics")
    kafka_sub = kafka.add_subparsers(dest="kafka_command", required=True, metavar="ACTION")
    kafka_sub.add_parser(
        "init", help="create the topics that are missing (reservations, order events, dead "
        "letters; names from FLASHSALE_TOPIC_*)",
    )  # fmt: skip

    wk = commands.add_parser(
        "workers",
        help="run the order saga: Kafka reservations -> payments -> orders in Postgres",
        description="Consume the reservations topic (consumer group flashsale-workers), run "
        "the payment saga against FLASHSALE_PSP_URL, write orders to Postgres and publish "
        "order events. Offsets are committed only after the effects are durable; SIGTERM "
        "drains the batch in hand.",
    )
    wk.add_argument("--concurrency", default="256",
                    help="charges sent to the provider at once (default 256)")  # fmt: skip
    wk.add_argument("--host", default="127.0.0.1", help="address of the ops endpoints")
    wk.add_argument("--ops-port", help="serve /healthz and /metrics on this port")

    psp = commands.add_parser(
        "psp",
        help="run the payment-provider simulator",
        description="A Stripe-like payment provider for tests and demos: idempotency keys, "
        "and deterministic outcomes by token (tok_decline..., tok_timeout..., tok_error...) "
        "and by the knobs below (drawn per idempotency key from --seed).",
    )
    psp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    psp.add_argument("--port", default="8090", help="TCP port (default 8090)")
    psp.add_argument("--latency-ms", default="0", help="mean latency per charge (default 0)")
    psp.add_argument("--jitter-ms", default="0", help="latency standard deviation (default 0)")
    psp.add_argument("--decline-rate", default="0", help="share of charges declined (0..1)")
    psp.add_argument("--error-rate", default="0", help="share of calls failing 500 (0..1)")
    psp.add_argument("--timeout-rate", default="0",
                     help="share of charges that capture, then answer too late (0..1)")  # fmt: skip
    psp.add_argument("--hang-s", default="30", help="how late those answer (default 30)")
    psp.add_argument("--seed", default="0", help="seed of the random knobs (default 0)")

    rec = commands.add_parser(
        "reconcile",
        help="find where Redis drifted from Postgres and repair it (once, or as a service)",
        description="Compare every live SKU's Redis state with Postgres (the truth) and "
        "repair drift: rebuild lost or corrupted SKUs, restore lost waiting rooms, resolve "
        "orders stuck PENDING/PAYING through the payment provider (FLASHSALE_PSP_URL), refund "
        "captures with no confirmed order, flag confirmed orders with no capture. Every repair "
        "is recorded in reconcile_events. Without --once it runs a pass every --interval "
        "seconds. Exit (with --once): 0 done, 3 something left unresolved, 1 error.",
    )
    rec.add_argument("--once", action="store_true", help="one pass, then exit")
    rec.add_argument("--interval", default="5", help="seconds between passes (default 5)")
    rec.add_argument("--sale", action="append", metavar="ID",
                     help="only this sale (repeatable; default: every live sale)")  # fmt: skip
    rec.add_argument(
        "--stuck-after", default="60",
        help="seconds after which a PENDING/PAYING order is stuck (default 60)",
    )  # fmt: skip
    rec.add_argument("--json", action="store_true", help="with --once: print the pass as JSON")
    rec.add_argument("--host", default="127.0.0.1", help="address of the ops endpoints")
    rec.add_argument("--ops-port", help="serve /healthz and /metrics on this port")

    aud = commands.add_parser(
        "audit",
        help="check every invariant of a sale (after it): exit 0 only if all hold",
        description="The post-sale audit: no oversell, conservation, one terminal state per "
        "reservation, captures vs orders vs refunds, per-buyer limits, nothing lost, "
        "admissions, and that a reconcile pass would change nothing. Reads Redis, Postgres, "
        "the broker's consumer lag and the payment provider (FLASHSALE_PSP_URL).",
    )
    aud.add_argument("sale", help="the sale id")
    aud.add_argument(
        "--json", action="store_true",
        help='print {"passed", "invariants": [{"name", "passed", "details"}]}',
    )  # fmt: skip

    up = commands.add_parser(
        "up",
        help="run the whole engine against the configured stack, supervised",
        description="Run every service of the engine against REDIS_URL, DATABASE_URL and "
        "KAFKA_BOOTSTRAP (or the embedded stack): the gateway processes, the allocator "
        "service (pumps, sweeper, outbox relay), the order workers, the reconciler, and the "
        "payment simulator "
        "unless FLASHSALE_PSP_URL names a provider. Crashed processes are restarted with "
        "backoff; SIGTERM or Ctrl-C stops all.",
    )
    up.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    up.add_argument("--port", default="8080", help="gateway port (default 8080)")
    up.add_argument("--workers", default="2", help="gateway processes (default 2)")
    up.add_argument("--allocator-port", help="allocator /healthz and /metrics (default PORT+1)")
    up.add_argument("--workers-port", help="workers /healthz and /metrics (default PORT+2)")
    up.add_argument("--psp-port", help="payment simulator port (default PORT+3)")
    up.add_argument("--reconciler-port",
                    help="reconciler /healthz and /metrics (default PORT+4)")  # fmt: skip
    return parser


HANDLERS: dict[str, Callable[[argparse.Namespace, Settings], Any]] = {
    "dev": cmd_dev,
    "migrate": cmd_migrate,
    "sale": cmd_sale,
    "demo": cmd_demo,
    "loadtest": cmd_loadtest,
    "bench": cmd_bench,
    "token": cmd_token,
    "gateway": cmd_gateway,
    "allocator": cmd_allocator,
    "kafka": cmd_kafka,
    "workers": cmd_workers,
    "psp": cmd_psp,
    "reconcile": cmd_reconcile,
    "audit": cmd_audit,
    "up": cmd_up,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings)
    try:
        result = HANDLERS[args.command](args, settings)
        if asyncio.iscoroutine(result):
            result = uvloop.run(result)
        return int(result)
    except InvalidInput as exc:
        print(f"flashsale: error: {exc.message}", file=sys.stderr)
        return 2
    except FlashsaleError as exc:
        print(f"flashsale: error: {exc.message}", file=sys.stderr)
        return 1
    except (redis.exceptions.ConnectionError, OSError) as exc:
        print(f"flashsale: error: a server is unreachable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
