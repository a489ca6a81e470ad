"""The engine's services as commands: ``gateway``, ``allocator``, ``workers``, ``psp``,
``reconcile``, ``audit`` and ``up`` (all of them, supervised). Each checks its flags and its
configuration before it starts anything (:mod:`flashsale.cli.checks`), then runs through
:mod:`flashsale.cli.runners`."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
from datetime import UTC, datetime

from flashsale import __version__, event_loop
from flashsale.cli import runners
from flashsale.cli.checks import (
    MAX_PROCESSES,
    SHORTEST_INTERVAL_S,
    fraction,
    free_ops_port,
    free_to_listen,
    non_negative,
    output_file,
    port_number,
    ports_after,
    positive,
    sale_id,
    seconds,
    service_settings,
    within,
)
from flashsale.cli.output import Stages, dump_json, out
from flashsale.cli.supervisor import HUNG_AFTER_S
from flashsale.engine_record import refuse_to_start_an_engine
from flashsale.errors import ConfigError, InvalidInput
from flashsale.settings import Settings, mask_url
from flashsale.wording import counted, said

PSP_JOURNAL = "psp/charges.jsonl"  # the simulator's journal under `flashsale up`, in <home>


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    port = port_number("port", args.port)
    workers = within("workers", args.workers, 1, MAX_PROCESSES)
    service_settings(settings)
    only = args.reservations_only
    if not (workers == 1 and args.reuse_port):  # with --reuse-port, shared on purpose
        free_to_listen(args.host, {"port": port})  # taken: refused, not shared unawares
    if workers == 1:
        return int(event_loop.run(runners.serve_gateway(
            settings, args.host, port, reuse_port=args.reuse_port, reservations_only=only
        )))  # fmt: skip
    metrics_dir = runners.fresh_metrics_dir(settings.home, f"gateway-{port}")
    out(f"gateway: {counted(workers, 'process', 'processes')} on {origin(args.host, port)}"
        f"{' (reservations only)' if only else ''} (Ctrl-C stops them)")  # fmt: skip
    children = runners.gateway_children(args.host, port, workers, metrics_dir,
                                        reservations_only=only)  # fmt: skip
    return runners.supervise(children, metrics_dir)


def cmd_allocator(args: argparse.Namespace, settings: Settings) -> int:
    ops_port = free_ops_port(args)
    settings.require_redis()
    settings.require_database()
    return int(event_loop.run(runners.serve_allocator(settings, args.host, ops_port)))


SHOWN = 20  # repairs listed by `reconcile --once` before "... and N more"


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler import service as reconciler_service  # noqa: PLC0415 - a light CLI start

    if not args.once and args.json:  # else the service would start, and print no pass
        raise InvalidInput("json", "goes with --once (one pass, printed as JSON)")
    if args.once and args.ops_port:
        raise InvalidInput("ops-port", "goes without --once: the service serves its probes")
    interval = seconds("interval", args.interval, SHORTEST_INTERVAL_S)
    stuck = seconds("stuck-after", args.stuck_after)
    for sale in args.sale or []:
        sale_id("sale", sale)
    ops_port = free_ops_port(args)
    settings.require_redis()
    settings.require_database()
    if not args.once:
        return int(event_loop.run(runners.serve_reconciler(
            settings, args.host, ops_port, interval=interval, stuck_after_s=stuck,
            sales=args.sale,
        )))  # fmt: skip
    stages = Stages("reconciling")
    report = event_loop.run(stages.over(
        reconciler_service.reconcile_once(settings, args.sale, stuck, stages)))  # fmt: skip
    if args.json:
        dump_json(report.json())
    else:
        out(f"reconciled {counted(report.skus, 'SKU')} in {report.seconds:.3f}s: "
            f"{counted(report.changed, 'repair')}, {counted(len(report.flags), 'flag')}, "
            f"{len(report.unresolved)} unresolved")  # fmt: skip
        items = report.repairs + report.flags
        for item in items[:SHOWN]:
            out(f"  {item.kind:16} {item.sale_id}/{item.sku or '-'} {item.subject or ''}"
                f"  {said(item.before)} -> {said(item.after)}")  # fmt: skip
        for line in report.unresolved[:SHOWN]:
            out(f"  unresolved: {line}")
        hidden = max(0, len(items) - SHOWN) + max(0, len(report.unresolved) - SHOWN)
        if hidden:
            out(f"  ... and {hidden} more (--json shows all; every repair is in reconcile_events)")
    return 3 if report.unresolved else 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler import service as reconciler_service  # noqa: PLC0415 - a light CLI start

    sale_id("sale", args.sale)
    settings.require_redis()
    settings.require_database()
    settings.require_kafka()
    stages = Stages(f"auditing {args.sale}")
    report = event_loop.run(stages.over(reconciler_service.audit(settings, args.sale, stages)))
    if args.json:
        dump_json(report.json())
    else:
        out(report.text())
    return 0 if report.passed else 1


def cmd_workers(args: argparse.Namespace, settings: Settings) -> int:
    concurrency = positive(int, "concurrency", args.concurrency)
    ops_port = free_ops_port(args)
    settings.require_redis()
    settings.require_database()
    settings.require_kafka()
    if not settings.psp_url:
        raise ConfigError("FLASHSALE_PSP_URL is not set: point it at the payment provider "
                          "(`flashsale psp` serves a simulator)")  # fmt: skip
    return int(event_loop.run(runners.serve_workers(settings, args.host, ops_port, concurrency)))


def cmd_psp(args: argparse.Namespace, settings: Settings) -> int:
    from workers.payment_simulator import Knobs  # noqa: PLC0415 - a light CLI start

    port = port_number("port", args.port)
    knobs = Knobs(
        latency_ms=non_negative("latency-ms", args.latency_ms),
        jitter_ms=non_negative("jitter-ms", args.jitter_ms),
        decline_rate=fraction("decline-rate", args.decline_rate),
        error_rate=fraction("error-rate", args.error_rate),
        timeout_rate=fraction("timeout-rate", args.timeout_rate),
        hang_s=seconds("hang-s", args.hang_s, zero=True),
        seed=int(non_negative("seed", args.seed)),
    )
    keep_days = positive(float, "keep-days", args.keep_days)
    journal = output_file("journal", args.journal) if args.journal else None
    free_to_listen(args.host, {"port": port})
    days = f"{keep_days:g} day{'' if keep_days == 1 else 's'}"
    said = (f"psp simulator on {origin(args.host, port)} ({knobs})"
            + (f", charges journaled to {journal} for {days}" if journal
               else ", charges in memory only"))  # fmt: skip
    return int(event_loop.run(runners.serve_psp(args.host, port, knobs, journal, keep_days,
                                                listening=lambda: out(said))))  # fmt: skip


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    port = port_number("port", args.port)
    workers = within("workers", args.workers, 1, MAX_PROCESSES)
    listeners = within("reservation-workers", args.reservation_workers, 0, MAX_PROCESSES)
    hung_after = seconds("hung-after", args.hung_after, longest=3600, zero=True)
    # A provider named in the environment is used as it is; one that a previous `up` recorded
    # in the state folder is not: this `up` starts its own simulator.
    external = None if "FLASHSALE_PSP_URL" in settings.from_dev_env else settings.psp_url
    refuse_to_start_an_engine(settings.home, own_simulator=not external)
    service_settings(settings)
    settings.require_kafka()
    unused = {"psp-port": "FLASHSALE_PSP_URL names the payment provider: no simulator is "
                          "started"} if external else {}  # fmt: skip
    if not listeners:
        unused["reservation-port"] = "goes with --reservation-workers of 1 or more"
    ports = ports_after(port, args, unused)
    allocator_port, workers_port, psp_port, reconciler_port, listener_port = ports.values()
    free_to_listen(args.host, {
        "port": port, "allocator-port": allocator_port, "workers-port": workers_port,
        "reconciler-port": reconciler_port, **({} if external else {"psp-port": psp_port}),
        **({"reservation-port": listener_port} if listeners else {}),
    })  # fmt: skip
    metrics_dir = runners.fresh_metrics_dir(settings.home, f"gateway-{port}")
    psp_url = external or origin(_callable(args.host), psp_port)
    listener, announce = _reservation_listener(args.host, listener_port, listeners, settings)
    page_cors = _cors_for(args.host, port, settings)
    # fmt: off
    children = [
        *runners.gateway_children(args.host, port, workers, metrics_dir, psp_url, env=announce),
        *runners.gateway_children(args.host, listener_port, listeners, metrics_dir, psp_url,
                                  reservations_only=True, env=page_cors),
        runners.allocator_child(args.host, allocator_port),
        runners.workers_child(args.host, workers_port, psp_url),
        runners.reconciler_child(args.host, reconciler_port, psp_url),
    ]
    # fmt: on
    if not external:
        journal = settings.home / PSP_JOURNAL
        journal.parent.mkdir(parents=True, exist_ok=True)
        children.append(runners.psp_child(args.host, psp_port, journal))
    page_origin = origin(_callable(args.host), port)  # a wildcard is nobody's address
    out(
        f"flashsale up: gateway x{workers} on {origin(args.host, port)}; {listener}; ops endpoints "
        f"(/healthz, /metrics): allocator :{allocator_port}, workers :{workers_port}, "
        f"reconciler :{reconciler_port}; "
        f"payments: {mask_url(psp_url)}"
        + ("" if external else " (simulator)")
        + (f"; order webhooks to {mask_url(settings.webhook_url)}" if settings.webhook_url else "")
        + f"; pages: operators' live sale page {page_origin}/admin/ (the admin token), a "
        f"sale's waiting room {page_origin}/sales/SALE (a buyer's link to it: `flashsale token "
        f"buyers --page {page_origin}/sales/SALE`). Ctrl-C or SIGTERM stops everything."
    )
    ops = {"allocator": allocator_port, "workers": workers_port, "reconciler": reconciler_port,
           **({} if external else {"payments": psp_port})}  # fmt: skip
    where = {"gateway": page_origin, "admin_page": f"{page_origin}/admin/", "ops": ops,
             "reservations": origin(_callable(args.host), listener_port) if listeners else None,
             "version": __version__,
             "started_at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    with contextlib.ExitStack() as records:
        records.enter_context(runners.recorded_engine(settings.home, port, where))
        if not external:  # the record names the simulator this engine runs: none here
            records.enter_context(runners.recorded_psp(settings.home, psp_url))
        return runners.supervise(children, metrics_dir, hung_after_s=hung_after)


def origin(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets as a URL needs it (``[::1]``)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _callable(host: str) -> str:
    """The address the engine's own services call a listener on ``host`` at: the loopback of
    its family for a wildcard (which binds every interface, and is nobody's address)."""
    if not _wildcard(host):
        return host
    return "::1" if ":" in host else "127.0.0.1"


def _wildcard(host: str) -> bool:
    """``host`` binds every interface (0.0.0.0, ::): it is nobody's address to call."""
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _reservation_listener(host: str, listener_port: int, workers: int,
                          settings: Settings) -> tuple[str, dict[str, str]]:  # fmt: skip
    """What ``up`` says about the reservations listener, and the environment that tells the
    other gateway processes where it is (``reserve_url`` in an admitted status answer):
    FLASHSALE_RESERVATIONS_URL as the operator set it (a public address behind a proxy), else
    the listener's own address. A wildcard address is nobody's URL: the operator must say."""
    if workers == 0:
        return "no reservations listener", {}
    where = f"reservations x{workers} on {origin(host, listener_port)}"
    if settings.reservations_url:
        return f"{where} (announced as {settings.reservations_url})", {}
    if _wildcard(host):
        return (f"{where} (not announced: set FLASHSALE_RESERVATIONS_URL to its public "
                "address)"), {}  # fmt: skip
    url = origin(host, listener_port)
    return where, {"FLASHSALE_RESERVATIONS_URL": url}


def _cors_for(host: str, port: int, settings: Settings) -> dict[str, str]:
    """The reservations listener is another origin than the waiting-room page it serves: the
    page's origin (``http://host:port``) is allowed too, beside FLASHSALE_CORS_ORIGINS."""
    origins = list(settings.cors_origins)
    if "*" not in origins and not _wildcard(host):
        origins.append(origin(host, port))
    return {"FLASHSALE_CORS_ORIGINS": ",".join(origins)} if origins else {}


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gw = commands.add_parser(
        "gateway",
        help="serve the buyer API, the waiting room and the admin API",
        description="Serve the HTTP gateway. With --workers N, N processes share the port "
        "(SO_REUSEPORT) under a supervisor that restarts crashed ones.",
    )
    gw.set_defaults(handler=cmd_gateway, serves=True)
    gw.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    gw.add_argument("--port", default="8080", help="TCP port (default 8080)")
    gw.add_argument("--workers", default="1", help=f"processes, 1..{MAX_PROCESSES} (default 1)")
    gw.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    gw.add_argument(
        "--reservations-only", action="store_true",
        help="serve only admitted buyers' reservations (and /healthz, /metrics): the listener "
        "that keeps reservations off the waiting room's traffic; point "
        "FLASHSALE_RESERVATIONS_URL of the other gateway processes at it",
    )  # fmt: skip

    alloc = commands.add_parser(
        "allocator",
        help="run the admission pumps, the hold sweeper and the outbox relay",
        description="The allocator service: one admission pump per live sale (leader-elected "
        "through a Redis lease, so replicas are safe), the hold-expiry sweeper, and the relay "
        "of the SKU outbox streams to the Kafka reservations topic.",
    )
    alloc.set_defaults(handler=cmd_allocator, serves=True)
    alloc.add_argument("--host", default="127.0.0.1", help="address of the ops endpoints")
    alloc.add_argument("--ops-port", help="serve /healthz and /metrics on this port")

    wk = commands.add_parser(
        "workers",
        help="run the order saga: Kafka reservations -> payments -> orders in Postgres",
        description="Consume the reservations topic (consumer group flashsale-workers), run "
        "the payment saga against FLASHSALE_PSP_URL, write orders to Postgres and publish "
        "order events. Offsets are committed only after the effects are durable; SIGTERM "
        "drains the batch in hand.",
    )
    wk.set_defaults(handler=cmd_workers, serves=True)
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
    psp.set_defaults(handler=cmd_psp, serves=True)
    psp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    psp.add_argument("--port", default="8090", help="TCP port (default 8090)")
    psp.add_argument("--latency-ms", default="0", help="mean latency per charge (default 0)")
    psp.add_argument("--jitter-ms", default="0", help="latency standard deviation (default 0)")
    psp.add_argument("--decline-rate", default="0", help="share of charges declined (0..1)")
    psp.add_argument("--error-rate", default="0", help="share of calls failing 500 (0..1)")
    psp.add_argument("--timeout-rate", default="0",
                     help="share of charges that capture, then answer too late (0..1)")  # fmt: skip
    psp.add_argument("--hang-s", default="30", help="how late those answer, seconds or a "
                     "duration as 1m (default 30)")  # fmt: skip
    psp.add_argument("--seed", default="0", help="seed of the random knobs (default 0)")
    psp.add_argument("--journal", help="append every charge and refund to this file and read "
                     "it back at start, so a restart forgets nothing (default: memory only; "
                     f"`flashsale up` uses <home>/{PSP_JOURNAL})")  # fmt: skip
    psp.add_argument("--keep-days", default="7",
                     help="at start, forget journaled charges made longer ago than this, as a "
                     "provider forgets idempotency keys (default 7)")  # fmt: skip

    rec = commands.add_parser(
        "reconcile",
        help="find where Redis drifted from Postgres and repair it (once, or as a service)",
        description="Compare every live SKU's Redis state with Postgres (the truth) and repair "
        "drift: rebuild lost or corrupted SKUs, recount sold counters from the orders, restore "
        "lost waiting rooms, settle stuck orders through the payment provider "
        "(FLASHSALE_PSP_URL), refund captures with no confirmed order, flag confirmed orders with "
        "no capture; each repair is kept in reconcile_events. Without --once, each sale is passed "
        "over every --interval seconds. Exit (--once): 0 done, 3 something unresolved, 1 error.",
    )
    rec.set_defaults(handler=cmd_reconcile, serves=True)
    rec.add_argument("--once", action="store_true", help="one pass, then exit")
    rec.add_argument(
        "--interval",
        default="5",
        help="seconds (or a duration as 1m) between two passes over a sale (default 5, at "
        "least 0.05; the budget of 2,000 SKUs a second is shared out sale by sale, and a sale "
        "with more SKUs than its share is passed over less often)",
    )
    rec.add_argument("--sale", action="append", metavar="ID",
                     help="only this sale (repeatable; default: every live sale); an unknown "
                          "id is refused")  # fmt: skip
    rec.add_argument("--stuck-after", default="60", help="seconds (or a duration as 2m) after "
                     "which a PENDING/PAYING order is stuck (default 60)")  # fmt: skip
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
    aud.set_defaults(handler=cmd_audit)
    aud.add_argument("sale", help="the sale id")
    aud.add_argument(
        "--json", action="store_true",
        help='print {"passed", "invariants": [{"name", "passed", "details"}]}',
    )  # fmt: skip

    up = commands.add_parser(
        "up",
        help="run the whole engine against the configured stack, supervised",
        description="Run every service of the engine against REDIS_URL, DATABASE_URL and "
        "KAFKA_BOOTSTRAP (or the embedded stack): the gateway processes, the reservations "
        "listener (gateway --reservations-only, named to admitted buyers), the allocator "
        "service (pumps, sweeper, outbox relay), the order workers, the reconciler, and the "
        "payment simulator unless FLASHSALE_PSP_URL names a provider (refused while another "
        "engine's simulator runs on the stack). Refused while a benchmark that makes sales "
        "runs on the stack. Crashed processes are restarted with backoff; SIGTERM or Ctrl-C "
        "stops all.",
    )
    up.set_defaults(handler=cmd_up, serves=True)
    up.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    up.add_argument("--port", default="8080", help="gateway port (default 8080)")
    up.add_argument(
        "--workers", default="2", help=f"gateway processes, 1..{MAX_PROCESSES} (default 2)"
    )
    up.add_argument("--allocator-port", help="allocator /healthz and /metrics (default PORT+1)")
    up.add_argument("--workers-port", help="workers /healthz and /metrics (default PORT+2)")
    up.add_argument("--psp-port", help="payment simulator port (default PORT+3)")
    up.add_argument("--reconciler-port",
                    help="reconciler /healthz and /metrics (default PORT+4)")  # fmt: skip
    up.add_argument("--reservation-workers", default="1",
                    help="gateway processes serving only admitted buyers' reservations, on "
                    f"their own port, 0..{MAX_PROCESSES} (default 1; 0: reserve on the "
                    "gateway port)")  # fmt: skip
    up.add_argument("--reservation-port",
                    help="port of those processes (default PORT+5)")  # fmt: skip
    up.add_argument("--hung-after", default=str(HUNG_AFTER_S), metavar="SECONDS",
                    help="kill and start again a process whose event loop has not turned for "
                    f"this long: seconds, or a duration as 1m (default {HUNG_AFTER_S}; 0: "
                    "never)")  # fmt: skip
