"""Fixtures: the real stack, from the environment or the embedded dev stack.

When ``REDIS_URL``, ``DATABASE_URL`` and ``KAFKA_BOOTSTRAP`` are all set, tests use those servers.
Otherwise the session starts (or reuses) the embedded stack under ``FLASHSALE_HOME``
(``./.flashsale``) and stops it at the end if it was the one that started it. With
``FLASHSALE_TEST_REDIS_CLUSTER=N[,R]`` that stack's Redis is a Redis Cluster of N primaries with
R replicas each (``make test-cluster``; give it its own ``FLASHSALE_HOME``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis

from allocator.sale_admin import SaleAdmin
from flashsale.cli import main
from flashsale.cli.devstack.redis_cluster import Layout
from flashsale.cli.devstack.stack import EXTERNAL_VAR, DevStack
from flashsale.clients import RedisClient, pg_pool, redis_client
from flashsale.kafka import ensure_topics
from flashsale.migrate import migrate
from flashsale.settings import Settings, home_dir, read_env_file
from tests.harness import FLAGS

if TYPE_CHECKING:
    from playwright.sync_api import Browser

REPO = Path(__file__).resolve().parent.parent

# Under pytest-xdist each worker but the first has an embedded stack of its own, beside the
# first's: the tests stop and fill the servers they use (and delete only what they made:
# the first's is the developer's own dev stack, whose sales stay).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
if _WORKER != "gw0" and not all(os.environ.get(var) for var in EXTERNAL_VAR.values()):
    os.environ["FLASHSALE_HOME"] = f"{home_dir()}-{_WORKER}"


_SHARED: dict[str, int] = {}  # test id -> how many tests share it, under pytest-xdist


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pytest-xdist sends a worker each test by its id, and runs one of several sharing it
    (schemathesis's operations do): the others were never run, and the run passed. Under
    xdist such an id is one test, which fails saying so."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    counts = Counter(item.nodeid for item in items)
    _SHARED.update((nodeid, n) for nodeid, n in counts.items() if n > 1)
    first: dict[str, pytest.Item] = {}
    for item in items:
        first.setdefault(item.nodeid, item)
    items[:] = first.values()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in _SHARED:
        pytest.fail(
            f"{_SHARED[item.nodeid]} tests share this id, and pytest-xdist runs one of "
            "them: mark it serial (make pytest runs those without xdist)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    """Settings pointing at running servers, with the schema migrated."""
    external = all(os.environ.get(var) for var in EXTERNAL_VAR.values())
    started = False
    home = home_dir()
    if not external:
        dev = DevStack(home)
        started = any(row.state == "stopped" for row in dev.status())
        dev.up(progress=lambda _line: None, cluster=_cluster_layout())
        for key, value in read_env_file(dev.env_file).items():
            os.environ.setdefault(key, value)
    # The shortest session Kafka takes by default (group.min.session.timeout.ms): a group's
    # first join is answered after half of it at the local broker, and many tests start one.
    os.environ.setdefault("FLASHSALE_WORKER_SESSION_TIMEOUT", "6")
    settings = Settings.from_env()

    async def prepare() -> None:
        conn = await asyncpg.connect(settings.require_database())
        try:
            await migrate(conn, progress=lambda _line: None)
        finally:
            await conn.close()
        # As a deployment's `kafka init`: a probe of the broker needs them, and a test of
        # it passed only after another had made them.
        await ensure_topics(settings)

    asyncio.run(prepare())
    began = datetime.now(UTC)
    sentinel = f"fs:test-sentinel:{uuid.uuid4().hex}"  # what this stack held before the tests
    asyncio.run(_redis_call(settings, "set", sentinel, "kept"))
    yield settings
    asyncio.run(_end_sales_since(settings, began))
    kept = asyncio.run(_redis_call(settings, "delete", sentinel))
    # The stack may be the developer's own (./.flashsale, as `flashsale dev up` makes it):
    # a test that emptied its Redis (FLUSHALL) took the state of every sale on it, theirs too.
    assert kept == 1, (
        "a test deleted keys it did not make from the stack's Redis (FLUSHALL, a restart "
        "without its data): delete only what the test made"
    )
    if started:
        DevStack(home).down(progress=lambda _line: None)


def _cluster_layout() -> Layout | None:
    wanted = os.environ.get("FLASHSALE_TEST_REDIS_CLUSTER")
    if not wanted:
        return None
    primaries, _, replicas = wanted.partition(",")
    return Layout(int(primaries), int(replicas or 0))


async def _redis_call(settings: Settings, command: str, *args: str) -> Any:
    client = redis_client(settings)
    try:
        return await getattr(client, command)(*args)
    finally:
        await client.aclose()


async def _end_sales_since(settings: Settings, began: datetime) -> None:
    """End the sales this session made, as a merchandiser would: the services stop pumping,
    relaying and reconciling them, instead of keeping an eye on them for an hour."""
    pool = await pg_pool(settings, max_size=2)
    client = redis_client(settings)
    try:
        admin = SaleAdmin.build(pool, client)
        rows = await pool.fetch(
            "SELECT id FROM sales WHERE created_at >= $1 AND status <> 'ended'", began
        )
        for row in rows:
            await admin.set_status(row["id"], "end")
    finally:
        await client.aclose()
        await pool.close()


@pytest.fixture
async def client(stack: Settings) -> AsyncIterator[RedisClient]:
    """An asyncio Redis client (bytes replies) on the test stack: the engine's own."""
    c = redis_client(stack)
    yield c
    await c.aclose()


@pytest.fixture
def rdb(stack: Settings) -> Iterator[redis.Redis | redis.RedisCluster]:
    """A synchronous Redis client for assertions (a cluster client on a cluster)."""
    kind = redis.RedisCluster if stack.redis_cluster else redis.Redis
    client = kind.from_url(stack.require_redis(), decode_responses=True)
    yield client
    client.close()


@dataclass
class Db:
    """Synchronous one-shot queries for assertions (each opens and closes a connection)."""

    dsn: str

    def _run(self, method: str, sql: str, *args: Any) -> Any:
        async def go() -> Any:
            conn = await asyncpg.connect(self.dsn)
            try:
                return await getattr(conn, method)(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(go())

    def val(self, sql: str, *args: Any) -> Any:
        return self._run("fetchval", sql, *args)

    def rows(self, sql: str, *args: Any) -> list[Any]:
        return list(self._run("fetch", sql, *args))

    def execute(self, sql: str, *args: Any) -> Any:
        return self._run("execute", sql, *args)


@pytest.fixture
def db(stack: Settings) -> Db:
    return Db(stack.require_database())


@pytest.fixture
def fresh_dsn(stack: Settings) -> Iterator[str]:
    """A new, empty database on the stack's Postgres (no migration applied), dropped after."""
    parts = urlsplit(stack.require_database())
    name = f"fresh_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    yield urlunsplit(parts._replace(path=f"/{name}"))
    asyncio.run(admin(f"DROP DATABASE {name} WITH (FORCE)"))


@dataclass
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Result]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``flashsale ARGS...`` in-process with the current environment (no stack implied)."""

    def run(*argv: str) -> Result:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def cli(stack: Settings, run_cli: Cli) -> Cli:
    """``run_cli`` against the test stack."""
    return run_cli


@pytest.fixture(scope="session")
def chromium() -> Iterator[str]:
    """Debian's chromium for the page tests: a failure under CI (`make test` installs it with
    apt), a skip elsewhere, saying how to install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `make test` installs it (apt) when root")
        pytest.skip("chromium is not installed (apt install chromium)")
    yield found


@pytest.fixture(scope="module")
def _module_browser(chromium: str) -> Iterator[Browser]:
    """One Chromium for a module's page tests. Starting Playwright's driver and the browser
    takes about a second, which once per test came to most of a minute of `make test`.

    While it runs, Playwright's event loop is this thread's: a module with page tests calls
    ``asyncio.run`` only from another thread, and keeps its tests without a browser elsewhere.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser(_module_browser: Browser) -> Iterator[Browser]:
    """The module's Chromium; every page a test opened (each in a context of its own) is
    closed after it, so that no test sees another's storage, routes or clock."""
    yield _module_browser
    for context in _module_browser.contexts:
        context.close()
