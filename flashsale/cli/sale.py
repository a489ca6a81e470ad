"""``flashsale sale`` (create, import, list, show, preload, status, add-stock, pause, resume,
end...): the merchandiser's commands, over :mod:`allocator.sale_admin`.

What a command is given that can be checked alone is checked before any connection is
opened; a change of settings against the sale as it stands, once read. Bad input writes
nothing either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

from allocator.sale_admin import SaleAdmin
from flashsale.cli.flags import (
    SALE_FLAGS,
    SKU_FLAGS,
    SKU_UPDATE_FLAGS,
    dated,
    flag_value,
    from_now,
    given,
    sale_from_flags,
    started_as_typed,
)
from flashsale.cli.output import Progress, Stages, dump_json, out, warn
from flashsale.cli.sale_files import json_text, read_input, read_json_file
from flashsale.cli.sale_views import (
    print_changed,
    print_created,
    print_orders,
    print_preload,
    print_sales,
    print_status,
    read_first,
    units_left,
    watch_status,
)
from flashsale.clients import pg_pool, redis_client
from flashsale.errors import Conflict, InvalidInput
from flashsale.records import body_fingerprint, idempotency_key
from flashsale.salespec import (
    SALE_DEFAULTS,
    SKU_DEFAULTS,
    SkuImport,
    as_sale_file,
    parse_sale,
)
from flashsale.settings import Settings
from flashsale.sku_csv import SKUS_TEXT, parse_import
from flashsale.wording import counted


@contextlib.asynccontextmanager
async def admin(settings: Settings) -> AsyncIterator[SaleAdmin]:
    """A SaleAdmin over fresh clients, closed on exit (the Redis client first: building it
    checks REDIS_URL and connects to nothing yet)."""
    async with contextlib.AsyncExitStack() as opened:
        client = redis_client(settings)
        opened.push_async_callback(client.aclose)
        pool = await pg_pool(settings, max_size=4)
        opened.push_async_callback(pool.close)
        yield SaleAdmin.build(pool, client, settings.archive_after_s)


async def cmd_sale(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return await _sale(args, settings)
    except Conflict as exc:
        raise started_as_typed(exc, args) from None


async def _sale(args: argparse.Namespace, settings: Settings) -> int:
    command = args.sale_command
    # Validate everything before opening a connection: bad input writes nothing.
    if command == "create":
        given_flags = [f for f in (*SALE_FLAGS, *SKU_FLAGS, "sku") if getattr(args, f)]
        if args.file and given_flags:
            raise InvalidInput(given_flags[0], "give either --file or flags, not both")
        moments = from_now(args)  # a bad --starts-in or --ends-in before the file is read
        raw = read_json_file(args.file) if args.file else sale_from_flags(args)
        start = None if args.file else moments.get("starts_at")  # flags: --ends-at vs it
        spec = dated(parse_sale(raw, now=start), args, moments)
        key = idempotency_key(args.idempotency_key, required=False)
        asked = {"sale": raw, "starts_in": args.starts_in}
        if args.ends_in:  # the same typed words, not the moments they named then
            asked["ends_in"] = args.ends_in
        async with admin(settings) as sales:
            created = await sales.create(spec, key=key, fingerprint=body_fingerprint(asked))
        print_created(created, as_json=args.json)
        return 0
    if command == "import":
        if args.sale_id and args.sale:
            raise InvalidInput("sale", "the sale is given twice: before the file and as --sale")
        args.sale = args.sale_id or args.sale
        if not args.sale:
            raise InvalidInput("sale", "which sale? `flashsale sale import SALE FILE`")
        stages = Stages(f"importing into {args.sale}")
        batch = await stages.over(_import(settings, args, stages))
        imported = counted(len(batch.skus), "SKU")
        out(f"imported {imported} into {args.sale}; run `flashsale sale preload {args.sale}`")
        return 0
    if command == "archive":  # the reconciler's job, with the audit
        return await _archive(args, settings)
    pace = read_first(args)
    async with admin(settings) as sales:
        if command == "list":
            page = await sales.list_sales(status=args.status, state=args.state,
                                          limit=args.limit, offset=args.offset)  # fmt: skip
            print_sales(page, args)
        elif command == "orders":
            await print_orders(sales, args)
        elif command == "show":
            sale = await sales.get(args.sale)
            shown = as_sale_file(sale) if args.template else sale
            dump_json(await units_left(sales, sale) if args.left else shown)
        elif command == "preload":
            progress = Progress(f"preloading {args.sale}", "SKUs")
            try:
                results = await sales.preload(args.sale, force=args.force, progress=progress)
            finally:
                progress.close()
            print_preload(args.sale, results)
        elif command == "status" and pace:
            await watch_status(sales, args, *pace)
        elif command == "status":
            print_status(await sales.status(args.sale, args.sku), as_json=args.json)
        elif command in ("add-stock", "remove-stock"):
            key = idempotency_key(args.idempotency_key, required=False)
            move = sales.add_stock if command == "add-stock" else sales.lower_stock
            changed = await move(args.sale, args.sku, args.units, key=key)
            if changed.get("redis") == "pending":  # in Postgres, Redis to follow: no retry
                warn(changed["message"])
            else:
                if changed.get("replayed"):
                    warn("this key's change was made before: nothing changed now")
                print_status(changed, as_json=False, whole=False)
        elif command == "delete":
            gone = await sales.delete(args.sale)
            out(f'deleted {gone["id"]} ("{gone["name"]}", {counted(gone["skus"], "SKU")})')
        elif command == "remove-sku":
            sale = await sales.remove_sku(args.sale, args.sku)
            out(f"removed {args.sku} from {sale['id']}: "
                f"{counted(len(sale['skus']), 'SKU')} left")  # fmt: skip
        elif command == "update":
            changes = {field: flag_value(args, attr, field) for attr, field in
                       SALE_FLAGS.items() if getattr(args, attr) is not None}  # fmt: skip
            changes |= {field: at.isoformat() for field, at in from_now(args).items()}
            if not changes:
                raise InvalidInput("update", "give at least one setting to change")
            print_changed(await sales.update(args.sale, changes, with_skus=False), changes,
                          as_json=args.json)  # fmt: skip
        elif command == "update-sku":
            changes = given(args, SKU_UPDATE_FLAGS)
            if not changes:
                raise InvalidInput("update-sku", "give --title, --price, --currency, --limit "
                                                 "or --ttl")  # fmt: skip
            changed = await sales.update_sku(args.sale, args.sku, changes, with_skus=False)
            print_changed(changed["skus"][0], changes, as_json=args.json, sale=args.sale)
        elif command == "set-rate":
            sale = await sales.set_admission_rate(args.sale, args.rate)
            out(f"{sale['id']}: admitting {counted(sale['admission_rate'], 'buyer')} per second")
        else:
            sale = await sales.set_status(args.sale, command, with_skus=False)
            out(f"{sale['id']}: status {sale['status']} (state {sale['state']})")
    return 0


async def _import(settings: Settings, args: argparse.Namespace, stage: Stages) -> SkuImport:
    """``sale import``: the file checked whole (in a thread, so that its stage is said), then
    written."""
    stage(f"reading {args.file}")
    text = read_input(args.file, SKUS_TEXT)
    stage("checking every row")
    batch = await asyncio.to_thread(parse_import, text, json_text)
    stage(f"writing {counted(len(batch.skus), 'SKU')}")
    async with admin(settings) as sales:
        await sales.import_skus(args.sale, batch, with_skus=False)  # said in one line
    return batch


async def _archive(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler import service as reconciler_service  # noqa: PLC0415 - a light CLI start

    settings.require_kafka()
    stages = Stages(f"archiving {args.sale}")
    archived = await stages.over(reconciler_service.archive(settings, args.sale, stages))
    dump_json(archived.json()) if args.json else out(archived.text())
    return 0


# The switches of a sale's status: (the line in `sale --help`, the command's own description).
SWITCHES = {
    "pause": ("stop granting reservations", "Stop admitting buyers and granting reservations: "
              "admitted buyers keep their turn, its countdown stopped, and buyers are told the "
              "sale is paused. Idempotent."),
    "resume": ("resume a paused sale", "Resume a paused sale: admissions and reservations go on "
               "where they stopped. Idempotent."),
    "end": ("end the sale for good", "End the sale for good (it cannot be resumed): nothing more "
            "is admitted or reserved, buyers are told it ended, and every change but archive is "
            "refused. Idempotent."),
}  # fmt: skip


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sale = commands.add_parser("sale", help="create, preload and operate sales")
    sale.set_defaults(handler=cmd_sale)
    sale_sub = sale.add_subparsers(dest="sale_command", required=True, metavar="ACTION")
    create = sale_sub.add_parser(
        "create",
        help="create a sale from --file or flags; prints its id",
        description="Create a sale from a JSON sale file (--file, '-' for stdin) or from flags "
        "describing the sale and at most one SKU. Prints the sale id, or the whole sale with "
        "--json.",
    )
    create.add_argument(
        "--file",
        help="sale file: a JSON object with name, starts_at, "
        "ends_at, admission_rate, max_queue, ... and skus[]; '-' reads stdin",
    )
    create.add_argument("--json", action="store_true", help="print the created sale as JSON")
    create.add_argument("--idempotency-key", metavar="KEY",
                        help="a retry with the same key gives the same sale, not a second one "
                             "(1..100 of A-Z a-z 0-9 . _ : -)")  # fmt: skip
    create.add_argument("--name", help="the sale's name (with the SKU flags, instead of --file)")
    create.add_argument("--starts-at", help="ISO 8601 with timezone (default: now)")
    create.add_argument(
        "--starts-in", metavar="DURATION",
        help="open the sale this long from now (90s, 10m, 2h, 1d, 1h30m), keeping its length "
        "unless an end is given; with --file it replaces the file's dates",
    )  # fmt: skip
    create.add_argument("--ends-at", help="future ISO 8601 with timezone (default: starts + 1h)")
    create.add_argument("--ends-in", metavar="DURATION",
                        help="end the sale this long from now, e.g. 2h or 1h30m")  # fmt: skip
    create.add_argument(
        "--admission-rate",
        help=f"buyers admitted per second (default {SALE_DEFAULTS['admission_rate']})",
    )
    create.add_argument("--max-queue", help=f"queue cap (default {SALE_DEFAULTS['max_queue']})")
    _admission_flags(create, defaults=True)
    create.add_argument("--sku", help="SKU id (letters, digits, . _ -)")
    create.add_argument("--title", help="SKU title (default: the SKU id)")
    create.add_argument("--stock", help="units (positive integer)")
    create.add_argument("--price", help="price in integer minor units (cents)")
    create.add_argument("--currency", help="ISO 4217 code, e.g. EUR")
    limit, ttl = SKU_DEFAULTS["per_buyer_limit"], SKU_DEFAULTS["hold_ttl_seconds"]
    create.add_argument("--limit", help=f"per-buyer limit (default {limit})")
    create.add_argument("--ttl", help=f"hold TTL, seconds or a duration as 10m (default {ttl})")
    create.add_argument("--buckets", help="split the SKU's stock into this many buckets on "
                        "separate Redis slots, for a SKU hotter than one Redis core (1..64, "
                        f"default {SKU_DEFAULTS['buckets']})")  # fmt: skip

    imp = sale_sub.add_parser("import", help="add SKUs from a CSV or JSON file (all validated "
                              "first)")  # fmt: skip
    imp.add_argument("sale_id", metavar="sale", nargs="?", help="sale id (or --sale)")
    imp.add_argument(
        "file",
        help="CSV with header sku,title,stock,price,currency,...; or JSON: "
        '{"skus": [...]} as in a sale file, or the list alone ("-": stdin)',
    )
    imp.add_argument("--sale", help="sale id, given after the file")

    listing = sale_sub.add_parser("list", help="list sales, newest first")
    listing.add_argument(
        "--state",
        help="only sales in this state, as the list shows it: "
        "scheduled, live, paused or ended (by `sale end` or its end time)",
    )
    listing.add_argument("--status", choices=("active", "paused", "ended"), type=str.lower,
                         help="only sales with this status, as pause, resume and end set "
                         "it (a sale past its end time stays active: --state ended finds "
                         "it)")  # fmt: skip
    listing.add_argument("--limit", default="1000", help="at most this many (default 1000)")
    listing.add_argument("--offset", default="0",
                         help="skip this many of the newest (default 0): next page")  # fmt: skip
    listing.add_argument("--json", action="store_true", help="print them as a JSON array")
    orders = sale_sub.add_parser(
        "orders", help="a sale's orders: one line each, or the whole list as CSV",
        description="Prints the sale's orders, oldest first (by created_at). --csv streams every "
        "order as CSV with a header (id, sku, buyer_id, quantity, amount, currency, state, "
        "created_at, updated_at, in UTC: 2026-12-01T12:00:00.000Z) through Postgres's COPY, "
        "however many there are; the payment token is never exported, and a buyer id a spreadsheet "
        "would run as a formula (=, +, - or @ first) is written behind an apostrophe.",
    )  # fmt: skip
    orders.add_argument("sale", help="sale id")
    orders.add_argument("--state", help="only orders in this state (CONFIRMED, PAYMENT_FAILED, "
                                        "PENDING, PAYING, EXPIRED, CANCELLED)")  # fmt: skip
    orders.add_argument("--csv", action="store_true", help="CSV on stdout, streamed")
    show = sale_sub.add_parser("show", help="print a sale's configuration as JSON")
    show.add_argument("sale", help="sale id")
    show.add_argument(
        "--template", action="store_true",
        help="print it as a sale file (no id, status or shuffle record): the template of the "
        "next sale, for `sale create --file F --starts-in D`",
    )  # fmt: skip
    show.add_argument(
        "--left", action="store_true",
        help="with --template, of an ended sale: each SKU's stock is its units still free, "
        "and a SKU with none is left out (a sale of what did not sell)",
    )  # fmt: skip
    preload = sale_sub.add_parser(
        "preload", help="copy configuration and stock into Redis",
        description="Copy the sale's configuration and each SKU's stock from Postgres into "
        "Redis, where buyers are queued and served: run it after creating or importing, before "
        "the start. Re-runnable: an unchanged SKU is left as it is. A SKU with held or sold "
        "units whose configuration changed needs --force; held and sold units are never reset.",
    )  # fmt: skip
    preload.add_argument("sale", help="sale id")
    preload.add_argument(
        "--force", action="store_true",
        help="reload even with held or sold units (they are never reset)",
    )  # fmt: skip
    status = sale_sub.add_parser(
        "status", help="the waiting room, then per SKU: stock, available, held, sold, confirmed"
    )
    status.add_argument("sale", help="sale id")
    status.add_argument("--json", action="store_true",
                        help="print it as JSON (with --watch: a line each time)")  # fmt: skip
    status.add_argument("--sku", help="this SKU alone (a sale may have thousands)")
    status.add_argument("--watch", action="store_true",
                        help="refresh in place every --interval seconds until Ctrl-C")  # fmt: skip
    status.add_argument("--interval", help="seconds between refreshes, or a duration as 1m "
                        "(default 1, at least 0.05)")  # fmt: skip
    status.add_argument("--count", help="stop after this many refreshes (default: never)")
    add = sale_sub.add_parser("add-stock", help="add N units to a SKU (Postgres, then Redis)")
    add.add_argument("sale", help="sale id")
    add.add_argument("sku", help="SKU id")
    add.add_argument("units", metavar="N", help="units to add (a positive integer)")
    lower = sale_sub.add_parser(
        "remove-stock", help="lower a SKU's stock by N units, never below held plus sold",
        description="Lowers the stock in Postgres and Redis together: refused, with nothing "
        "written, when fewer units than N are free (held and sold units are never taken "
        "back). A SKU in stock buckets cannot shrink.",
    )  # fmt: skip
    lower.add_argument("sale", help="sale id")
    lower.add_argument("sku", help="SKU id")
    lower.add_argument("units", metavar="N", help="units to take out (a positive integer)")
    for change in (add, lower):
        change.add_argument("--idempotency-key", metavar="KEY",
                            help="a retry with the same key changes the stock once, not twice "
                                 "(1..100 of A-Z a-z 0-9 . _ : -)")  # fmt: skip
    delete = sale_sub.add_parser(
        "delete", help="delete a sale never preloaded (one made by mistake)",
        description="Deletes the sale and its SKUs, if it was never preloaded: nothing of it "
        "reached Redis, a buyer or an order. A sale preloaded keeps its record, for its audit: "
        "end it instead.",
    )  # fmt: skip
    delete.add_argument("sale", help="sale id")
    drop = sale_sub.add_parser(
        "remove-sku", help="take a SKU out of a sale, if nobody reserved it",
        description="Deletes the SKU in Postgres and Redis together; refused, with nothing "
        "written, once it has an order, a hold or a sold unit.",
    )  # fmt: skip
    drop.add_argument("sale", help="sale id")
    drop.add_argument("sku", help="SKU id")
    update = sale_sub.add_parser(
        "update", help="change a sale's settings (anything before its start)",
        description="Change settings, Postgres first and then Redis: any before the start; then "
        "only --name, an end still to come, --admission-rate, a higher --max-queue and the "
        "--challenge flags (refused otherwise, nothing written). Prints what changed, as it is.",
    )  # fmt: skip
    update.add_argument("sale", help="sale id")
    update.add_argument("--json", action="store_true", help="print the sale's settings as JSON")
    update.add_argument("--name", help="the sale's name")
    update.add_argument("--starts-at", help="ISO 8601 with timezone (before the start only)")
    update.add_argument("--starts-in", help="open this long from now, e.g. 10m (before the "
                                            "start only)")  # fmt: skip
    update.add_argument("--ends-at", help="ISO 8601 with timezone")
    update.add_argument("--ends-in", help="end this long from now, e.g. 2h or 1h30m")
    update.add_argument("--admission-rate", help="buyers admitted per second")
    update.add_argument("--max-queue", help="queue cap (only higher once started)")
    _admission_flags(update, defaults=False)
    update_sku = sale_sub.add_parser(
        "update-sku", help="change a SKU's title, or before the start its price, currency, "
        "per-buyer limit or hold time",
    )  # fmt: skip
    update_sku.add_argument("sale", help="sale id")
    update_sku.add_argument("sku", help="SKU id")
    update_sku.add_argument("--json", action="store_true", help="print the SKU as JSON")
    update_sku.add_argument("--title", help="the title buyers see")
    update_sku.add_argument("--price", help="integer minor units (before the start only)")
    update_sku.add_argument("--currency", help="ISO 4217 code (before the start only)")
    update_sku.add_argument("--limit", help="per-buyer limit (before the start only)")
    update_sku.add_argument("--ttl", help="hold TTL, seconds or 10m (before the start only)")
    rate = sale_sub.add_parser(
        "set-rate", help="change the admission rate, also while the sale runs",
        description="Change how many buyers per second the waiting room admits. The pump "
        "follows within a step and the ETAs buyers are shown follow the new rate.",
    )  # fmt: skip
    rate.add_argument("sale", help="sale id")
    rate.add_argument("rate", metavar="N", help="buyers admitted per second (1..1000000)")
    archive = sale_sub.add_parser(
        "archive", help="after the end: record the audit, delete the per-buyer Redis state",
        description="Archive an ended sale: once its audit passes, the report is recorded in "
        "Postgres and the sale's per-buyer Redis state (waiting room, holds, buyer counts, "
        "idempotency answers) deleted. Buyers are still told 'ended', a reservation is "
        "answered from its order, `flashsale audit` shows the recorded report. The reconciler "
        "archives sales FLASHSALE_ARCHIVE_AFTER seconds after their end (default a day).",
    )  # fmt: skip
    archive.add_argument("sale", help="sale id")
    archive.add_argument("--json", action="store_true", help="print the outcome as JSON")
    for action, (text, long) in SWITCHES.items():
        switch = sale_sub.add_parser(action, help=text, description=long)
        switch.add_argument("sale", help="sale id")


def _admission_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The admission flags of `sale update`, and of `sale create` with a sale's ``defaults``."""
    said = {f: f" (default {SALE_DEFAULTS[f]})" if defaults else "" for f in SALE_DEFAULTS}
    parser.add_argument("--window", help="admission window, 5..3600 seconds or a duration"
                                         + said["admission_window_seconds"])  # fmt: skip
    parser.add_argument("--capacity", help="admitted buyers who have not reserved yet, at most"
                                           + said["admission_capacity"])  # fmt: skip
    parser.add_argument("--challenge", help="proof-of-work bits asked at join, 0..24"
                                            + said["join_challenge"])  # fmt: skip
    parser.add_argument("--challenge-max", help="most bits as the join rate rises, 0 for fixed"
                                                + said["join_challenge_max"])  # fmt: skip
