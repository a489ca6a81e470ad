"""A database whose schema is behind the engine (``flashsale migrate`` not run yet, or a new
version deployed before its migrations): every part says so and waits, instead of a traceback,
a 500 or an event parked on the dead letters."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from flashsale.errors import FlashsaleError
from flashsale.migrate import migrate
from flashsale.outages import is_outage, schema_error
from flashsale.settings import Secret, Settings
from loadtest.bench_gateway_rig import prepare_sale
from workers import order_events

from .conftest import Cli
from .harness import ADMIN, auth, gateway, sale_spec

publish_some = order_events._publish_some


async def _missing_table(dsn: str) -> asyncpg.PostgresError:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetch("SELECT id FROM sales")
    except asyncpg.PostgresError as exc:
        return exc
    finally:
        await conn.close()
    raise AssertionError("a fresh database has a sales table")


async def test_a_missing_table_is_an_outage_that_names_the_fix(fresh_dsn: str) -> None:
    """One classification for every service: wait and retry (the workers do not park the
    event, the reconciler tries again), and say what to run."""
    exc = await _missing_table(fresh_dsn)
    assert is_outage(exc)
    behind = schema_error(exc)
    assert behind is not None and behind.code == "schema_not_migrated"
    assert "flashsale migrate" in behind.message and 'relation "sales"' in behind.message
    assert schema_error(asyncpg.UniqueViolationError("duplicate key")) is None
    assert not is_outage(asyncpg.UniqueViolationError("duplicate key"))


def test_the_cli_says_to_migrate_in_one_line(
    fresh_dsn: str, run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", fresh_dsn)
    for argv in (("sale", "list"), ("sale", "status", "s-1"), ("reconcile", "--once")):
        result = run_cli(*argv)
        assert result.code == 1, (argv, result)
        assert "Traceback" not in result.err, (argv, result.err)
        last = result.err.strip().splitlines()[-1]  # after the command's own log lines, if any
        assert last.startswith("flashsale: error: the database schema is behind"), (argv, last)
        assert last.endswith("run `flashsale migrate`"), (argv, last)


async def test_the_gateway_answers_503_and_is_not_ready_until_migrated(
    stack: Settings, fresh_dsn: str
) -> None:
    async with gateway(dataclasses.replace(stack, database_url=fresh_dsn)) as gw:
        spec = sale_spec("schema test", "SKU-1", 5)
        created = await gw.http.post("/admin/v1/sales", json=spec, headers=auth(ADMIN))
        assert created.status == 503, await created.text()
        assert (await created.json())["error"]["code"] == "schema_not_migrated"
        assert int(created.headers["Retry-After"]) >= 1
        ready = await gw.http.get("/readyz")
        assert ready.status == 503
        assert "flashsale migrate" in (await ready.json())["checks"]["postgres"]

        conn = await asyncpg.connect(fresh_dsn)
        try:
            await migrate(conn, progress=lambda _line: None)
        finally:
            await conn.close()
        await asyncio.sleep(1.1)  # readiness is checked at most once a second
        ready = await gw.http.get("/readyz")
        assert ready.status == 200, await ready.text()
        created = await gw.http.post("/admin/v1/sales", json=spec, headers=auth(ADMIN))
        assert created.status == 201, await created.text()


async def test_a_benchmark_says_why_the_gateway_refused_its_sale(stack: Settings) -> None:
    """The gateway benchmark's sale is made through the admin API: a refusal is one line with
    the gateway's answer, not a KeyError."""
    async with gateway(stack) as gw, aiohttp.ClientSession() as session:
        wrong = dataclasses.replace(stack, admin_token=Secret("not-the-admin-token-012345"))
        base = str(gw.http.make_url("")).rstrip("/")
        with pytest.raises(FlashsaleError, match=r"creating the sale failed: 401 .*unauthorized"):
            await prepare_sale(session, base, wrong)


def test_benchmarks_apply_the_migrations_first(
    fresh_dsn: str, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flashsale dev up && flashsale bench ...` is the documented way to run one, on a stack
    nothing has migrated yet (as `flashsale demo` does)."""
    monkeypatch.setenv("DATABASE_URL", fresh_dsn)
    result = cli("bench", "reconcile", "--skus", "20", "--passes", "1")
    assert result.code == 0, result.err
    assert "clean" in result.out


async def test_the_order_events_publisher_backs_off_and_says_to_migrate(
    fresh_dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher that cannot read its outbox (here: no table yet) waits longer after each
    failed round, as the relay and the saga's batches do, instead of trying every 50 ms; its
    line says what mends it."""
    rounds = [0]

    async def counted(*args: Any) -> int:
        rounds[0] += 1
        return await publish_some(*args)

    monkeypatch.setattr(order_events, "_publish_some", counted)
    pool = await asyncpg.create_pool(fresh_dsn, min_size=1, max_size=1)
    stop = asyncio.Event()
    try:
        with caplog.at_level(logging.WARNING, logger="flashsale.workers"):
            task = asyncio.create_task(order_events.publish_outbox(
                pool, cast(AIOKafkaProducer, None), stop, on_published=lambda _n: None
            ))  # fmt: skip
            await asyncio.sleep(1.5)
            stop.set()
            await task
    finally:
        await pool.close()
    assert 2 <= rounds[0] <= 6, rounds  # 30 at one round per 50 ms
    lines = [r.getMessage() for r in caplog.records if "order-events outbox" in r.getMessage()]
    assert lines and all("run `flashsale migrate`" in line for line in lines), lines
