"""How the sale commands show a sale: its status table (once, or again every interval), what a
preload did, its orders, and its units left as the file of another sale."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from allocator.sale_admin import SaleAdmin, stock_units
from allocator.sale_reads import MAX_PAGE, offset_of, page_size, without_counts
from allocator.sale_scripts import PreloadResult
from flashsale.cli.checks import SHORTEST_INTERVAL_S, positive, seconds
from flashsale.cli.output import dump_json, out, warn
from flashsale.currencies import major
from flashsale.errors import Conflict, InvalidInput, listed
from flashsale.salespec import as_sale_file, parse_sale
from flashsale.timefmt import iso
from flashsale.wording import counted, span

PRELOAD_LINES = 20  # SKUs a preload lists one by one; a larger sale gets the summary alone
STARTED_LONG_AGO_S = 300  # a new sale's start this far past is said (not a script's "now")


def print_status(status: dict[str, Any], *, as_json: bool, whole: bool = True,
                 rows: int | None = None) -> None:  # fmt: skip
    """The status table; ``whole``: with the waiting room's line first and, last, what the
    confirmed orders took (not after a stock change, which shows the SKU changed). ``rows``:
    the most lines to print (a terminal's height, the table redrawn in it), the SKUs cut to
    fit."""
    if as_json:
        dump_json(status)
        return
    lines: list[str] = []
    say = lines.append  # printed at the end, once the SKU rows are cut to ``rows``
    sale = status["sale"]
    say(f'sale {sale["id"]}  "{sale["name"]}"  state={sale["state"]}  status={sale["status"]}')
    over = sale["state"] == "ended"  # preload and import refuse it: no command to suggest
    hint = f"(`flashsale sale preload {sale['id']}`)"
    preloaded = sale["preloaded_at"]
    loaded = (f"preloaded {to_second(preloaded)}" if preloaded else "never preloaded" if over
              else f"not preloaded {hint}")  # fmt: skip
    starts, ends, end = sale["starts_at"], sale["ends_at"], sale.get("ended_at")
    start, stop = to_second(starts), to_second(ends)
    if not end:
        when = f"starts {start}  ends {stop}"
    elif datetime.fromisoformat(end) < datetime.fromisoformat(starts):  # called off
        when = f"ended {to_second(end)}, before its start (it was to run {start} to {stop})"
    else:
        when = f"starts {start}  ended {to_second(end)}" + (
            "" if end == ends else f" (planned for {stop})")  # fmt: skip
    say(f"  {when}  {loaded}")
    cleared = sale.get("redis_cleared_at")
    if sale.get("archived_at"):
        say(f"  archived {to_second(sale['archived_at'])} (its per-buyer Redis state deleted)")
    elif cleared:  # a benchmark's sale kept for its orders (loadtest.bench_gateway_rig)
        why = "no service visits it, and it cannot be archived (its audit needs that state)"
        say(f"  its Redis state deleted {to_second(cleared)}, on purpose (a benchmark's "
            f"sale): {why}")  # fmt: skip
    elif over and whole:  # what becomes of its buyers' Redis state, and when
        say(f"  {archiving(sale, status.get('archive_due_at'))}")
    queue = status.get("queue")
    if whole and queue and queue["live"]:
        say(f"  queue: {queue_line(queue, sale['state'])}{full_line(queue, sale['id'])}")
    if whole and sale.get("join_challenge") and not over:  # turned on against bots, say
        rising = sale.get("join_challenge_max") or 0
        say(f"  proof of work at join: {sale['join_challenge']} bits"
            + (f", up to {rising} as the joins outpace admissions" if rising else ""))  # fmt: skip
    if not status["skus"]:
        add = f"`flashsale sale import {sale['id']} FILE.csv`"
        say("  no SKUs" if over else f"  no SKUs yet: add some with {add}")
    w = max((len(row["sku"]) for row in status["skus"]), default=0)
    w = max(20, w)  # the SKU column, as wide as the longest
    if status["skus"]:
        say(f"  {'SKU':{w}} {'STOCK':>10} {'AVAILABLE':>10} {'HELD':>8} {'SOLD':>8} "
            f"{'CONFIRMED':>10}")  # fmt: skip

    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    def line(name: str, row: dict[str, Any]) -> str:
        return (
            f"  {name:{w}} {row['stock_total']:>10} {cell(row['available']):>10}"
            f" {cell(row['held']):>8} {cell(row['sold']):>8} {row['confirmed']:>10}"
        )

    head, blocks = len(lines), []  # each SKU's lines (a bucket's, in transit) start a block
    for row in status["skus"]:
        blocks.append(len(lines))
        say(line(row["sku"], row))
        for index, b in enumerate(row.get("by_bucket") or []):
            name = f"  bucket {index}"
            if b is None:
                say(f"  {name:{w}} {'-':>10} {'-':>10} {'-':>8} {'-':>8}")
            else:
                say(f"  {name:{w}} {b['total']:>10} {b['available']:>10} {b['held']:>8}"
                    f" {b['sold']:>8}")  # fmt: skip
        if row.get("in_transit"):  # free, counted as available, and in no bucket yet
            say(f"  {'  in transit':{w}} {'':>10} {row['in_transit']:>10}")
    table = lines[head:]
    del lines[head:]
    if len(status["skus"]) > 1:  # the whole sale's line, where a column is known for all
        say(line(f"all {counted(len(status['skus']), 'SKU')}", totals(status["skus"])))
    # Why a SKU has no counts, two different things to do: said once for the SKUs of each
    # (a sale never preloaded has said so above), naming the first few of them.
    uncounted = without_counts(status["skus"])
    lost, unloaded = uncounted["lost"], (uncounted["not_preloaded"]
                                         if preloaded and not cleared else [])  # fmt: skip
    rebuild = "(`flashsale reconcile --once` rebuilds {} from Postgres)"
    later = "never preloaded" if over else f"not preloaded yet {hint}"
    for skus, one, several in (
        (lost, f"preloaded, but Redis lost it {rebuild.format('it')}",
         f"preloaded, but Redis lost them {rebuild.format('them')}"),
        (unloaded, later, later),
    ):  # fmt: skip
        if len(skus) == 1:
            say(f"  {skus[0]}: {one}")
        elif skus:
            say(f"  {counted(len(skus), 'SKU')} {several}: {listed(skus)}")
    if whole:
        taken = [f"{major(amount, currency)} {currency}"
                 for currency, amount in sorted(status["revenue"].items())]  # fmt: skip
        nothing = "none" if over else "none yet"
        say(f"  revenue of confirmed orders: {', '.join(taken) or nothing}")
    room = None if rows is None else rows - len(lines) - 1  # the line of those left out
    if room is not None and len(table) > room + 1:
        ends = [start - head for start in blocks[1:]] + [len(table)]  # where each SKU's end
        shown = max(1, sum(end <= room for end in ends))
        table = [*table[: ends[shown - 1]], f"  ... and {len(blocks) - shown:,} more SKUs "
                                            "(--sku SKU shows one)"]  # fmt: skip
    for text in lines[:head] + table + lines[head:]:
        out(text)


def totals(skus: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The columns of ``skus`` added up; one that a SKU lacks (not counted in Redis) is
    unknown for the whole sale."""
    summed: dict[str, Any] = {}
    for column in ("stock_total", "available", "held", "sold", "confirmed"):
        values = [row[column] for row in skus]
        summed[column] = None if None in values else sum(values)
    return summed


def print_created(sale: dict[str, Any], *, as_json: bool) -> None:
    """`sale create`'s answer: the id, or the sale as JSON; and on stderr a start long past
    (a template's dates kept, a year mistyped): the sale is open already, and `sale update`
    moves no start once it has come."""
    dump_json(sale) if as_json else out(sale["id"])
    ago = (datetime.now(UTC) - datetime.fromisoformat(sale["starts_at"])).total_seconds()
    if ago > STARTED_LONG_AGO_S:
        sale_id = sale["id"]
        warn(f"{sale_id} started {span(ago)} ago ({to_second(sale['starts_at'])}): it is open "
             "as soon as it is preloaded. If that is not what you meant, `flashsale sale delete "
             f"{sale_id}` and create it again with --starts-in or --starts-at")  # fmt: skip


def print_changed(
    now: dict[str, Any], changes: dict[str, Any], *, as_json: bool, sale: str | None = None
) -> None:
    """What ``sale update`` (``now``: the sale) or ``update-sku`` (a SKU of ``sale``)
    changed, as it now is, in a line; the whole record with ``as_json``. A new start moves
    the end with it, so either date shows both."""
    if as_json:
        dump_json(now)
        return
    asked = set(changes)
    if asked & {"starts_at", "ends_at"}:
        asked |= {"starts_at", "ends_at"}

    def said(name: str, value: Any) -> str:
        if name == "price":
            return f"{value} ({major(value, now['currency'])} {now['currency']})"
        return orjson.dumps(value).decode() if name in ("name", "title") else str(value)

    where = f"{sale} {now['sku']}" if sale else now["id"]
    out(f"{where}: " + ", ".join(f"{name} {said(name, value)}" for name, value in now.items()
                                 if name in asked))  # fmt: skip


def to_second(moment: str) -> str:
    """A time of the engine's JSON as a person reads it: to the second (the answers give
    milliseconds, which a status line only widens)."""
    return str(iso(datetime.fromisoformat(moment), "seconds"))


def queue_line(q: dict[str, Any], state: str) -> str:
    """The waiting room in a line: the draw's registrations before the start, then the line
    and how it ends for a newcomer."""
    if not q["joined"]:  # nobody placed: before the start, or nobody came (yet)
        if state == "scheduled" or q["pre_queue"]:  # registered, and the draw still to come
            return f"{q['pre_queue']:,} registered for the draw"
        return "nobody joined" if state == "ended" else "nobody has joined yet"
    line = f"{q['waiting']:,} waiting, {q['admitted']:,} admitted of {q['joined']:,} joined"
    if q["sold_out"]:
        return line + f"; sold out{' at ' + q['sold_out_at'] if q['sold_out_at'] else ''}"
    if q["closed_to_newcomers"]:
        line += (
            f"; new buyers are told it is sold out: the line reaches the cutoff ({q['cutoff']:,})"
        )
    if q["stranded"]:
        line += f"; {counted(q['stranded'], 'unit')} left that nobody can buy any more"
    return line


def full_line(q: dict[str, Any], sale_id: str) -> str:
    """What a full waiting room does to newcomers, and how to let more in (see the
    runbook's FlashsaleQueueFull)."""
    if not q.get("full"):
        return ""
    return (f"; the waiting room is full (its cap: {q['max_queue']:,}): new buyers are turned "
            "away (503 queue_full) until the line moves or the cap is raised "
            f"(`flashsale sale update {sale_id} --max-queue N`)")  # fmt: skip


def print_preload(sale_id: str, results: Sequence[PreloadResult]) -> None:
    """A line per SKU for a few, then the sale's summary: a preload of 200,000 SKUs printed
    200,000 lines."""
    if len(results) <= PRELOAD_LINES:
        for r in results:
            out(f"{r.sku}: {r.outcome} (total {r.counts.total}, available {r.counts.available},"
                f" held {r.counts.held}, sold {r.counts.sold})")  # fmt: skip
    loaded = sum(r.outcome == "loaded" for r in results)
    total, available, held, sold = (
        sum(getattr(r.counts, name) for r in results)
        for name in ("total", "available", "held", "sold")
    )
    where = "" if len(results) <= PRELOAD_LINES else f"; per SKU: flashsale sale status {sale_id}"
    out(f"preloaded the {counted(len(results), 'SKU')} of {sale_id}: {loaded:,} loaded, "
        f"{len(results) - loaded:,} unchanged; {counted(total, 'unit')} ({available:,} available, "
        f"{held:,} held, {sold:,} sold){where}")  # fmt: skip


def print_sales(page: dict[str, Any], args: argparse.Namespace) -> None:
    """``sale list``: a line a sale (as JSON with ``--json``), or why there is none; on
    stderr, when older sales did not fit, the command that lists them."""
    listed, more = page["sales"], page["next_offset"]
    if args.json:
        dump_json(listed)
    else:
        for sale in listed:  # one nobody can join yet, until `sale preload`, says so
            unready = not sale["preloaded_at"] and sale["state"] != "ended"
            out(f"{sale['id']}  {sale['state']:9}  {to_second(sale['starts_at'])}  "
                f"{sale['name']}" + ("  (not preloaded)" if unready else ""))  # fmt: skip
        if not listed:
            out(no_sales(args.state or args.status, int(args.offset)))
    if more is not None:
        given = [f"--{name} {getattr(args, name)}" for name in ("limit", "state", "status")
                 if getattr(args, name) is not None]  # fmt: skip
        print(f"{counted(len(listed), 'sale')} shown (older ones: `flashsale sale list "
              f"{' '.join(given)} --offset {more}`)", file=sys.stderr)  # fmt: skip


def no_sales(status: str | None, offset: int) -> str:
    """What ``sale list`` says when it lists none, rather than nothing at all."""
    which = f"no {status} sales" if status else "no sales"
    if offset:
        return f"{which} past the newest {offset:,}"
    return which if status else "no sales yet: `flashsale sale create` makes one"


def read_first(args: argparse.Namespace) -> tuple[float, int | None] | None:
    """What a ``sale`` command is given that can be checked alone, checked before any server
    is asked, by the admin API's own checks; ``sale status``'s pace (:func:`watching`). A
    change of settings is checked against the sale as it stands, once read."""
    command = args.sale_command
    if command == "show" and args.left and not args.template:
        raise InvalidInput("left", "goes with --template (the file of a next sale)")
    if command == "list":
        page_size(args.limit)
        offset_of(args.offset)
    elif command in ("add-stock", "remove-stock"):
        stock_units(args.units, command.removesuffix("-stock"))
    elif command == "set-rate":  # as a sale file's: no other setting bounds it
        parse_sale({"name": "the rate", "admission_rate": args.rate})
    return watching(args) if command == "status" else None


def watching(args: argparse.Namespace) -> tuple[float, int | None] | None:
    """``sale status``'s ``--interval`` and ``--count``, read before anything is asked of a
    server: with ``--watch``, (seconds, refreshes or None); without it, None (and either
    given is refused)."""
    if not args.watch:
        if args.count or args.interval:
            raise InvalidInput("count" if args.count else "interval", "goes with --watch")
        return None
    interval = seconds("interval", args.interval or "1", SHORTEST_INTERVAL_S)
    return interval, positive(int, "count", args.count) if args.count else None


def archiving(sale: dict[str, Any], due: str | None) -> str:
    """When an ended sale not archived yet will be (``due``: by the reconciler, None: not
    by itself), and the command that archives it."""
    command = f"`flashsale sale archive {sale['id']}`"
    if due is None or not sale.get("ended_at"):
        return f"not archived yet ({command} does it)"
    after = (datetime.fromisoformat(due) - datetime.fromisoformat(sale["ended_at"])).total_seconds()
    when = "right after its end" if after < 60 else f"{span(after)} after its end"
    return f"the reconciler archives it at {to_second(due)}, {when} ({command} does it now)"


async def watch_status(sales: SaleAdmin, args: argparse.Namespace, interval: float,
                       count: int | None) -> None:  # fmt: skip
    """``sale status --watch``: the status again every ``interval`` seconds (``count`` times,
    or until Ctrl-C), in place on a terminal (a new block each time otherwise); with
    ``--json`` a line of JSON each time."""
    shown = 0
    in_place = sys.stdout.isatty()
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        while count is None or shown < count:
            status = await sales.status(args.sale, args.sku)
            if args.json:  # a line each: documents a program reads one by one (JSON Lines)
                out(orjson.dumps(status).decode())
            else:
                if in_place:
                    sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: the table is redrawn
                height = shutil.get_terminal_size().lines - 2  # the time's line, the cursor's
                print_status(status, as_json=False, rows=height if in_place else None)
                out(f"-- {datetime.now(UTC):%H:%M:%S} UTC, every {interval:g}s (Ctrl-C stops)")
            sys.stdout.flush()
            shown += 1
            if count is None or shown < count:
                await asyncio.sleep(interval)


async def print_orders(sales: SaleAdmin, args: argparse.Namespace) -> None:
    """``sale orders``: a line per order, a page at a time, or every order as CSV."""
    if args.csv:
        stdout = sys.stdout.buffer

        async def sink(chunk: bytes) -> None:
            stdout.write(chunk)

        await sales.export_orders(args.sale, sink, state=args.state)
        stdout.flush()
        return
    after = None
    while True:
        page = await sales.orders(args.sale, state=args.state, after=after)
        if not page and after is None:
            out(f"no {args.state.upper()} orders in {args.sale}" if args.state
                else f"no orders in {args.sale} yet")  # fmt: skip
        for o in page:
            paid = f"{major(o['amount'], o['currency'])} {o['currency']}"
            out(f"{o['id']}  {o['state']:14}  {o['sku']}  x{o['quantity']}  {paid}  "
                f"buyer {o['buyer_id']}  {o['created_at']}")  # fmt: skip
        if len(page) < MAX_PAGE:
            return
        after = page[-1]["id"]


async def units_left(sales: SaleAdmin, sale: dict[str, Any]) -> dict[str, Any]:
    """An ended sale as the file of another sale of its units left: each SKU's stock is its
    units free now, a SKU with none is left out, and units still held are said on stderr (a
    hold may yet come back). A sale not ended could still sell them: refused."""
    if sale["state"] != "ended":
        raise Conflict(f"sale {sale['id']} has not ended: its units left could still sell "
                       f"there; end it first (`flashsale sale end {sale['id']}`)",
                       code="sale_not_ended")  # fmt: skip
    rows = {row["sku"]: row for row in (await sales.status(sale["id"]))["skus"]}
    template = as_sale_file(sale)
    kept = []
    for sku in template["skus"]:
        row = rows[sku["sku"]]
        free = row["available"]
        if free is None:  # not in Redis (never preloaded, or lost): Postgres's orders say
            free = row["stock_total"] - row["confirmed"]
            warn(f"{sku['sku']} is not in Redis: its units left are its stock less its "
                 "confirmed orders")  # fmt: skip
        if row["held"]:
            verb = "is" if row["held"] == 1 else "are"
            warn(f"{counted(row['held'], 'unit')} of {sku['sku']} {verb} still held, so left "
                 "out: run this again once the holds are settled")  # fmt: skip
        if free > 0:
            kept.append({**sku, "stock": free})
    if not kept:
        raise Conflict(f"sale {sale['id']} has no unit left free: there is nothing to sell again",
                       code="nothing_left")  # fmt: skip
    return {**template, "skus": kept}
