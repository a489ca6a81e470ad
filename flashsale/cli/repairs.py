"""``flashsale repairs``: what the reconciler repaired and flagged, as ``reconcile_events``
records it, read back without SQL (the runbook's alerts ask for it)."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from flashsale import event_loop
from flashsale.cli.checks import duration, sale_id, within
from flashsale.cli.output import dump_json, out
from flashsale.errors import InvalidInput, shown
from flashsale.settings import Settings
from flashsale.wording import counted

SHOWN_CHARS = 300  # of a repair's values before and after, in the text listing


def cmd_repairs(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler import service  # noqa: PLC0415 - a light CLI start
    from reconciler.report import KINDS  # noqa: PLC0415

    sale = sale_id("sale", args.sale) if args.sale is not None else None
    if args.kind is not None and args.kind not in KINDS:
        raise InvalidInput("kind", f"must be a kind the reconciler records ({', '.join(KINDS)}),"
                                   f" got {shown(args.kind)}")  # fmt: skip
    since = duration("within", args.within) if args.within is not None else None
    limit = within("limit", args.limit, 1, 10_000)
    rows, more = event_loop.run(service.repairs_recorded(
        settings, sale=sale, kind=args.kind, within=since, limit=limit))  # fmt: skip
    if args.json:
        dump_json({"repairs": rows, "more": more})
        return 0
    which = (f" for {sale}" if sale else "") + (f" in the last {args.within}" if since else "")
    if not rows:
        out(f"no {args.kind or 'repair or flag'} recorded{which}")
        return 0
    many = counted(len(rows), "repair or flag", "repairs and flags")
    out(f"the newest {many} recorded{which} (older ones: --limit):" if more
        else f"{many} recorded{which}:")  # fmt: skip
    for row in rows:
        out(_line(row))
        out(f"    before {_values(row['before'])} after {_values(row['after'])}")
    return 0


def _line(row: dict[str, Any]) -> str:
    where = " ".join(part for part in (row["sale_id"], row["sku"]) if part)
    about = f"  {row['subject']}" if row["subject"] else ""
    return f"{row['at']}  {row['kind']}  {where}{about}"


def _values(values: dict[str, Any]) -> str:
    text = orjson.dumps(values).decode()
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    repairs = commands.add_parser(
        "repairs", help="what the reconciler repaired and flagged, newest last",
        description="List what the reconciler repaired (a SKU rebuilt, a waiting room "
        "restored, a stuck order settled, a capture refunded...) and flagged for a human (a "
        "confirmed order with no capture), as it recorded each in reconcile_events: when, the "
        "kind, the sale and SKU, the reservation concerned, and the values before and after.",
    )  # fmt: skip
    repairs.set_defaults(handler=cmd_repairs)
    repairs.add_argument("--sale", metavar="ID", help="only this sale's")
    repairs.add_argument("--kind", help="only this kind (rebuild_sku, restore_queue, "
                         "flag_uncaptured, ...; one it does not know lists them all)")  # fmt: skip
    repairs.add_argument("--within", metavar="DURATION",
                         help="only those of the last DURATION (90s, 10m, 2h, 1d, "
                              "1h30m)")  # fmt: skip
    repairs.add_argument("--limit", metavar="N", default="50",
                         help="the newest N, 1..10000 (default 50)")  # fmt: skip
    repairs.add_argument(
        "--json",
        action="store_true",
        help='{"repairs": [...], "more": whether older ones match too}',
    )
