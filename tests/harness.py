"""A gateway over the real stack for HTTP tests: an in-process aiohttp server, the admin API to
set up sales, buyer tokens, and admission pumps ticking in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import gzip
import json
import os
import pkgutil
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer

from allocator.pump import AdmissionPump
from allocator.queue_scripts import QueueScripts
from flashsale.engine_record import BENCHES_DIR, ENGINES_DIR
from flashsale.errors import Unavailable
from flashsale.http_protocol import answer_malformed_in_json
from flashsale.kafka import ensure_topics
from flashsale.settings import Rate, Secret, Settings
from flashsale.tokens import Signer
from flashsale.topics import Topics
from gateway.app import create_app
from gateway.state import CLIENTS, LANE

ADMIN = "test-admin-token-0123456789"
# The HTTP tests' own topics: the gateway publishes every granted reservation, and nothing
# consumes these (an engine a test starts reads the default ones).
_RUN = uuid.uuid4().hex[:8]
TOPICS = Topics(f"http{_RUN}-reservations", f"http{_RUN}-order-events",
                f"http{_RUN}-dead-letter")  # fmt: skip


def calls_to(monkeypatch: pytest.MonkeyPatch, target: str) -> list[tuple[Any, ...]]:
    """The positional arguments of each call of the coroutine function at ``target`` (a
    dotted path, as monkeypatch takes it) from now on; every call goes through."""
    calls: list[tuple[Any, ...]] = []
    original = pkgutil.resolve_name(target)

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await original(*args, **kwargs)

    monkeypatch.setattr(target, recorded)
    return calls


def is_utc_z(text: str) -> bool:
    """``text`` is a time as the engine's answers write them all: ISO 8601 in UTC to the
    millisecond with a ``Z`` (ECMAScript's date format)."""
    return bool(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sale_spec(
    name: str, sku: str, stock: int, starts_in: float = -1.0, limit: int = 1
) -> dict[str, Any]:
    """A one-SKU sale in the sale file format, starting ``starts_in`` seconds from now."""
    now = datetime.now(UTC)
    return {
        "name": name,
        "starts_at": (now + timedelta(seconds=starts_in)).isoformat(),
        "ends_at": (now + timedelta(hours=1)).isoformat(),
        "skus": [{"sku": sku, "title": "Sneaker", "stock": stock, "price": 12900,
                  "currency": "EUR", "per_buyer_limit": limit}],
    }  # fmt: skip


@dataclass
class Gateway:
    http: TestClient[Any, Any]
    settings: Settings
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: bool = False

    @property
    def app(self) -> Any:
        assert self.http.app is not None
        return self.http.app

    def token(self, buyer: str, ttl: float = 3600) -> str:
        signer = Signer.from_setting(self.settings.buyer_token_secret.reveal(), "buyer")
        return signer.sign({"sub": buyer}, ttl)

    async def create_sale(
        self, *, stock: int = 5, limit: int = 1, starts_in: float = -1.0, preload: bool = True,
        **sale: Any,
    ) -> str:  # fmt: skip
        body = {**sale_spec("HTTP test sale", "SKU-1", stock, starts_in, limit), **sale}
        created = await self.http.post("/admin/v1/sales", json=body, headers=auth(ADMIN))
        assert created.status == 201, await created.text()
        sale_id = str((await created.json())["id"])
        if preload:
            loaded = await self.http.post(f"/admin/v1/sales/{sale_id}/preload", headers=auth(ADMIN))
            assert loaded.status == 200, await loaded.text()
        return sale_id

    def pump(self, sale_id: str, *, interval: float = 0.02, owner: str = "test",
             buckets: dict[str, int] | None = None) -> AdmissionPump:  # fmt: skip
        """Start ticking an admission pump for ``sale_id`` (its SKU-1 in ``buckets``, if
        given) until the harness closes."""
        c = self.app[CLIENTS]
        pump = AdmissionPump(QueueScripts(c.redis), c.pool, sale_id, ["SKU-1"], owner,
                             buckets=buckets or {})  # fmt: skip

        async def run() -> None:
            while not self.stopping:
                await pump.tick()
                await asyncio.sleep(interval)

        self.pumps.append(asyncio.get_running_loop().create_task(run()))
        return pump

    async def join(self, sale_id: str, buyer: str) -> tuple[int, dict[str, Any]]:
        response = await self.http.post(
            f"/v1/sales/{sale_id}/queue", headers=auth(self.token(buyer))
        )
        return response.status, await response.json()

    async def status(self, sale_id: str, ticket: str) -> tuple[int, dict[str, Any]]:
        response = await self.http.get(
            f"/v1/sales/{sale_id}/queue/status", headers={"X-Queue-Ticket": ticket}
        )
        return response.status, await response.json()

    async def admitted(self, sale_id: str, ticket: str, patience: float = 10.0) -> dict[str, Any]:
        """Poll (at the server's pace, capped) until the buyer's state is not waiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            code, body = await self.status(sale_id, ticket)
            assert code == 200, body
            ticket = body.get("ticket", ticket)
            if body["state"] != "waiting":
                return body
            assert loop.time() < deadline, f"still waiting: {body}"
            await asyncio.sleep(min(body["retry_after_ms"], 100) / 1000)

    async def reserve(
        self, sale_id: str, buyer: str, admission: str | None, *, key: str = "k1",
        body: Any = None, headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:  # fmt: skip
        all_headers = {**auth(self.token(buyer)), "Idempotency-Key": key, **(headers or {})}
        if admission is not None:
            all_headers["X-Admission-Token"] = admission
        payload = (
            {"sku": "SKU-1", "quantity": 1, "payment_token": "tok_ok"} if body is None else body
        )
        response = await self.http.post(
            f"/v1/sales/{sale_id}/reservations", json=payload, headers=all_headers
        )
        return response.status, await response.json()

    async def close(self) -> None:
        # Pumps stop at their next turn rather than by cancellation: a CancelledError that
        # lands inside a redis-py call can be swallowed there, leaving the task running.
        self.stopping = True
        await asyncio.gather(*self.pumps)
        await self.http.close()


_MADE: set[tuple[str | None, Topics]] = set()


async def _with_topics(settings: Settings) -> None:
    """As `kafka init` makes them for a real gateway (once per process and broker): without
    them its /healthz is 503, and a test that reads it passed only after another one on the
    same xdist worker had made them."""
    made = (settings.kafka_bootstrap, settings.topics)
    if made not in _MADE:
        with contextlib.suppress(Unavailable):  # a gateway a test cuts off from the broker
            await ensure_topics(settings)
            _MADE.add(made)


@contextlib.asynccontextmanager
async def gateway(stack: Settings, **overrides: Any) -> AsyncIterator[Gateway]:
    """A gateway with the admin token set and rate limits off unless ``overrides`` say so."""
    options: dict[str, Any] = {
        "admin_token": Secret(ADMIN), "rate_per_ip": Rate(0, 0), "rate_per_buyer": Rate(0, 0),
        "topics": TOPICS, **overrides,
    }  # fmt: skip
    settings = dataclasses.replace(stack, **options)
    await _with_topics(settings)
    app = create_app(settings)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    assert client.server.runner is not None and client.server.runner.server is not None
    app[LANE].install(client.server.runner.server)  # the hot routes as production serves them
    harness = Gateway(client, settings)
    try:
        yield harness
    finally:
        await harness.close()


@dataclass
class LiveGateway:
    """The gateway on a real TCP port, served by a thread with its own event loop, for clients
    that are not asyncio (schemathesis, a browser)."""

    base_url: str
    loop: asyncio.AbstractEventLoop
    app: Any
    settings: Settings

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def pump_forever(self, sale_id: str, skus: list[str]) -> None:
        """Tick an admission pump for ``sale_id`` in the server's loop until shutdown."""
        c = self.app[CLIENTS]
        pump = AdmissionPump(QueueScripts(c.redis), c.pool, sale_id, skus, "live")

        async def run() -> None:
            # Not `while True`: Python 3.11's asyncio.wait_for (redis-py's, around a write)
            # drops a cancel that lands as its write ends, and the loop ran on for the 5 s
            # the gateway's teardown waits.
            while not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                await pump.tick()
                await asyncio.sleep(0.02)

        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(run()))


@contextlib.contextmanager
def live_gateway(stack: Settings, **overrides: Any) -> Iterator[LiveGateway]:
    import threading

    from aiohttp import web

    settings = dataclasses.replace(
        stack,
        admin_token=Secret(ADMIN),
        rate_per_ip=Rate(0, 0),
        rate_per_buyer=Rate(0, 0),
        topics=TOPICS,
        **overrides,
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(settings), access_log=None)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(_with_topics(settings))
        loop.run_until_complete(runner.setup())
        assert runner.server is not None
        runner.app[LANE].install(runner.server)
        answer_malformed_in_json(runner.server)
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(15), "the gateway did not start"
    try:
        yield LiveGateway(f"http://127.0.0.1:{port}", loop, runner.app, settings)
    finally:

        async def ending() -> None:
            # Cancelled and seen to end before the loop stops: a pump's task cancelled with
            # the loop stopping before it ran again was "destroyed but pending" at exit.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            await runner.cleanup()

        asyncio.run_coroutine_threadsafe(ending(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()  # its self-pipe socket, else a ResourceWarning in a later test


def packed_and_revalidated(url: str) -> requests.Response:
    """Assert that ``url`` is sent gzipped to a client that accepts it (less than half its
    size, the same bytes once unpacked, the same headers), and answered 304 with those headers
    to one holding its ETag. Returns the plain answer."""
    plain = requests.get(url, headers={"Accept-Encoding": "identity"}, timeout=10)
    packed = requests.get(url, headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10)
    raw = packed.raw.read(decode_content=False)
    assert plain.status_code == packed.status_code == 200, (plain.status_code, packed.status_code)
    assert packed.headers.get("Content-Encoding") == "gzip", packed.headers
    assert gzip.decompress(raw) == plain.content and len(raw) < len(plain.content) / 2
    same = ("Content-Type", "Cache-Control", "Content-Security-Policy")
    assert {h: packed.headers.get(h) for h in same} == {h: plain.headers.get(h) for h in same}
    again = requests.get(
        url,
        headers={"Accept-Encoding": "gzip", "If-None-Match": packed.headers["ETag"]},
        timeout=10,
    )
    assert again.status_code == 304 and again.content == b"", again.status_code
    # A 304 refreshes the headers a cache holds: they must be there too.
    assert {h: again.headers.get(h) for h in same[1:]} == {
        h: plain.headers.get(h) for h in same[1:]
    }
    return plain


def create_live_sale(
    base_url: str, *, stock: int = 50, name: str = "live test", starts_in: float = -1.0,
    spec: dict[str, Any] | None = None, preload: bool = True,
) -> str:  # fmt: skip
    """A preloaded sale (unless not ``preload``) that started a second ago (or starts in
    ``starts_in`` seconds), through the admin API; ``spec``, a whole sale file, instead of
    those."""
    import requests

    headers = {"Authorization": f"Bearer {ADMIN}"}
    created = requests.post(
        f"{base_url}/admin/v1/sales",
        json=spec or sale_spec(name, "S1", stock, starts_in),
        headers=headers,
        timeout=10,
    )
    created.raise_for_status()
    sale_id = str(created.json()["id"])
    if preload:
        requests.post(f"{base_url}/admin/v1/sales/{sale_id}/preload", headers=headers, timeout=10)
    return sale_id


def ask_proof_of_work(base_url: str, sale_id: str, bits: int) -> None:
    """Turn the sale's proof of work at join to ``bits`` through the admin API (as `sale update
    SALE --challenge B` does), once the gateway has read it (it reads the sale's counters
    every 100 ms)."""
    import requests

    changed = requests.patch(f"{base_url}/admin/v1/sales/{sale_id}", timeout=10,
                             json={"join_challenge": bits},
                             headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
    assert changed.status_code == 200, changed.text
    time.sleep(0.3)


@dataclass
class LivePage:
    """A gateway, a preloaded sale on it (one SKU, ``S1``, unless a whole sale file is given)
    and a Chromium page, not opened yet."""

    gw: LiveGateway
    sale: str
    page: Any  # playwright's Page


@contextlib.contextmanager
def live_page(stack: Settings, browser: Any, name: str, *, stock: int = 3,
              starts_in: float = -1.0, spec: dict[str, Any] | None = None,
              preload: bool = True) -> Iterator[LivePage]:  # fmt: skip
    """A live gateway, a sale on it and a page of ``browser`` (the ``browser`` fixture, a
    Playwright Browser)."""
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, stock=stock, name=name, starts_in=starts_in,
                                spec=spec, preload=preload)  # fmt: skip
        yield LivePage(gw, sale, browser.new_page())


def record_engine(
    home: Path, port: int, pid: int, gateway: str, identity: str | None = None
) -> None:
    """The record a running ``flashsale up`` keeps on its stack (flashsale.engine_record),
    naming ``pid`` as its supervisor and ``gateway`` as its gateway; with ``identity``, as
    the process it recorded was (a record without one is an older engine's)."""
    folder = home / ENGINES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "gateway": gateway, "admin_page": f"{gateway}/", "ops": {}}
    if identity is not None:
        record["identity"] = identity
    (folder / f"{port}.json").write_text(json.dumps(record))


def record_bench(home: Path, pid: int, bench: str, identity: str | None = None) -> None:
    """The record a running ``flashsale bench`` that makes sales keeps on its stack
    (flashsale.engine_record), naming ``pid`` as its process (and ``identity``, as
    :func:`record_engine`)."""
    folder = home / BENCHES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"pid": pid, "bench": bench}
    if identity is not None:
        record["identity"] = identity
    (folder / f"{pid}.json").write_text(json.dumps(record))


@contextlib.contextmanager
def flashsale_named_process() -> Iterator[int]:
    """A process whose command line names flashsale (it sleeps), as ``running_engines`` asks
    of an engine's supervisor: its pid, for :func:`record_engine`; killed after."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "flashsale"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


# axe-core (the rules of WCAG 2.x A and AA, and its best practices), as the PyPI package that
# bundles it ships it: read once, run in a page as it is at the moment of the check.
AXE_CORE = (resources.files("axe_playwright_python") / "axe.min.js").read_text()


def accessibility_violations(page: Any) -> list[str]:
    """What axe-core finds wrong in ``page`` as it is shown now, a line per rule broken: its
    id, impact, what it asks and the first elements that break it; [] for none."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE_CORE)
    found = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    return [f"{rule['id']} ({rule['impact']}): {rule['help']}: "
            f"{[node['target'] for node in rule['nodes'][:3]]}"
            for rule in found["violations"]]  # fmt: skip


def answer_no_on_the_page(page: Any, button: str) -> str:
    """Click ``button``, whose action is final, and answer its question No: the question is
    the page's own (a browser dialog is suppressed in a storefront's frame sandboxed without
    ``allow-modals``, and none may appear). Returns the question."""
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    page.click(button)
    page.wait_for_selector("#ask:not([hidden])", timeout=5_000)
    question = page.text_content("#ask-text") or ""
    page.click("#ask-no")
    page.wait_for_selector("#ask", state="hidden", timeout=5_000)
    assert dialogs == [], dialogs
    return question


def answer_yes_on_the_page(page: Any, button: str) -> None:
    page.click(button)
    page.wait_for_selector("#ask:not([hidden])", timeout=5_000)
    page.click("#ask-yes")


def hang_the_first(page: Any, pattern: str | re.Pattern[str]) -> list[Any]:
    """The first request of ``page`` matching ``pattern`` is never answered (a connection
    that hangs), the others go through; the page's clock is Playwright's, so that a test can
    move it past the page's patience (``page.clock.fast_forward``). The held requests."""
    held: list[Any] = []

    def route(request: Any) -> None:
        if not held:
            held.append(request)  # never answered
            return
        request.continue_()

    page.clock.install()
    page.clock.resume()
    page.route(pattern, route)
    return held


def join_and_reserve(page: Any, gw: LiveGateway, sale: str, *,
                     admitted_ms: int = 20_000) -> str:  # fmt: skip
    """On a waiting-room page opened on ``sale`` (one SKU, ``S1``): join, be admitted (the
    pump runs from here) and reserve; the reservation's id."""
    page.wait_for_selector("#join:not([hidden])", timeout=15_000)
    page.click("#join")
    gw.pump_forever(sale, ["S1"])
    page.wait_for_selector("#state[data-state='admitted']", timeout=admitted_ms)
    page.click("#reserve")
    page.wait_for_selector("#result[data-reservation]", timeout=15_000)
    return str(page.get_attribute("#result", "data-reservation"))


def healthy(url: str, patience: float = 30) -> None:
    """Wait until ``url`` answers 200 (a service of ``flashsale up`` is ready)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never became healthy")


def run_bounded(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """Run a command in a process group of its own: (exit code, stdout, stderr). Past
    ``timeout`` the whole group is killed, the processes it started included, and the test
    fails saying so (``subprocess.run`` kills only the first process)."""
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        raise AssertionError(f"{argv[2:]} still ran after {timeout:g} s:\n{err[-2000:]}") from None
    return child.returncode, out, err


# Chromium for the page tests (Debian's; `make test` installs it): where their screenshots go
# and how it is started.
SCREENSHOTS = Path(os.environ.get("FLASHSALE_HOME", ".flashsale")) / "screenshots"
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


async def longest_stall(work: Awaitable[Any]) -> float:
    """The most CPU time the event loop's thread spent between two turns of the loop while
    ``work`` ran: how long any other request would have waited for it. CPU time of the thread,
    with the collector off, so that neither the machine taking the CPU away nor a collection
    of what earlier tests left is counted."""
    worst, done = 0.0, asyncio.Event()

    async def watch() -> None:
        nonlocal worst
        while not done.is_set():
            began = time.thread_time()
            await asyncio.sleep(0)
            worst = max(worst, time.thread_time() - began)

    gc.collect()
    gc.disable()
    watcher = asyncio.create_task(watch())
    try:
        await work
    finally:
        done.set()
        await watcher
        gc.enable()
    return worst


@contextlib.asynccontextmanager
async def loop_turns() -> AsyncIterator[Callable[[], int]]:
    """How many turns the event loop has given a task beside, so far: a stretch of work that
    never lets the loop's other tasks run (other sales' pumps, say) leaves it where it was."""
    turns = 0

    async def beside() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(beside())
    await asyncio.sleep(0)
    try:
        yield lambda: turns
    finally:
        task.cancel()
