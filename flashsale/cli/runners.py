"""How each service runs in its process (the gateway, the allocator service, the workers, the
reconciler, the payment simulator), and the children that ``up`` and ``gateway --workers N``
supervise.

A single gateway process serves one port; ``--workers N`` runs N of them on that same port with
``SO_REUSEPORT`` (the kernel spreads connections between them) under the supervisor, with
Prometheus in multiprocess mode so ``/metrics`` on any worker shows the sum of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import multiprocess

from flashsale.cli.devstack.files import write_whole
from flashsale.cli.supervisor import HUNG_AFTER_S, Child, Supervisor
from flashsale.engine_record import ENGINES_DIR, this_process
from flashsale.heap import settle_heap
from flashsale.ops_endpoints import listen
from flashsale.settings import ENGINE_ENV_FILE, Settings

if TYPE_CHECKING:
    from workers.payment_simulator import Knobs

log = logging.getLogger("flashsale.runners")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: how every service is told to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve_gateway(settings: Settings, host: str, port: int, *, reuse_port: bool,
                        reservations_only: bool = False) -> int:  # fmt: skip
    from flashsale.http_protocol import answer_malformed_in_json  # noqa: PLC0415
    from gateway.app import create_app  # noqa: PLC0415 - only the gateway needs aiohttp's app
    from gateway.state import ANNOUNCER, LANE  # noqa: PLC0415

    app = create_app(settings, reservations_only=reservations_only)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    assert runner.server is not None
    app[LANE].install(runner.server)
    answer_malformed_in_json(runner.server)
    warm = asyncio.create_task(app[ANNOUNCER].warm())  # the broker's producer, before buyers
    took = settle_heap()  # before the first request: a full walk of it held spikes' answers
    log.info("gateway (pid %d) settled its heap: %s objects kept out of the garbage "
             "collector's walks (%.0f ms)", os.getpid(), f"{gc.get_freeze_count():,}",
             took * 1000)  # fmt: skip
    try:
        await listen(runner, host, port, reuse_port=reuse_port or None, backlog=4096)
        log.info("gateway (pid %d) listening on http://%s:%d%s", os.getpid(), host, port,
                 " (reservations only)" if reservations_only else "")  # fmt: skip
        await _stop_on_signals().wait()
        log.info("gateway (pid %d) stopping", os.getpid())
    finally:
        warm.cancel()
        await runner.cleanup()
    return 0


async def serve_allocator(settings: Settings, host: str, ops_port: int | None) -> int:
    from allocator.service import AllocatorService  # noqa: PLC0415

    stop = _stop_on_signals()
    log.info("allocator service (pid %d) starting", os.getpid())
    await AllocatorService(settings).run(stop, ops_port=ops_port, host=host)
    return 0


async def serve_workers(
    settings: Settings, host: str, ops_port: int | None, concurrency: int
) -> int:
    from workers.service import WorkerService  # noqa: PLC0415

    stop = _stop_on_signals()
    log.info("order workers (pid %d) starting", os.getpid())
    await WorkerService(settings, concurrency=concurrency).run(stop, ops_port=ops_port, host=host)
    return 0


async def serve_reconciler(
    settings: Settings,
    host: str,
    ops_port: int | None,
    *,
    interval: float,
    stuck_after_s: float,
    sales: list[str] | None = None,
) -> int:
    from reconciler.service import serve  # noqa: PLC0415

    stop = _stop_on_signals()
    log.info("reconciler (pid %d) starting: a pass every %gs over %s", os.getpid(), interval,
             ", ".join(sales) if sales else "every sale in scope")  # fmt: skip
    await serve(settings, stop, interval=interval, stuck_after_s=stuck_after_s,
                ops_port=ops_port, host=host, sales=sales)  # fmt: skip
    return 0


async def serve_psp(host: str, port: int, knobs: Knobs, journal: Path | None,
                    keep_days: float, *, listening: Callable[[], None]) -> int:  # fmt: skip
    from workers.payment_simulator import serve  # noqa: PLC0415

    await serve(host, port, knobs, _stop_on_signals(), journal, keep_days=keep_days,
                listening=listening)  # fmt: skip
    return 0


def recorded_psp(home: Path, psp_url: str) -> contextlib.AbstractContextManager[None]:
    """Record the payment provider ``up`` uses in the state folder while it runs, so commands
    run from another shell (``flashsale audit``) find it; removed when ``up`` stops."""
    return recorded(home / ENGINE_ENV_FILE, f"export FLASHSALE_PSP_URL={psp_url}\n")


def recorded_engine(home: Path, port: int,
                    record: dict[str, Any]) -> contextlib.AbstractContextManager[None]:  # fmt: skip
    """Record where this ``up``'s services listen in the state folder while it runs, so
    ``dev status``, run from another shell, names them; removed when ``up`` stops."""
    text = orjson.dumps({**this_process(), **record}).decode()
    return recorded(home / ENGINES_DIR / f"{port}.json", text)


@contextlib.contextmanager
def recorded(path: Path, text: str) -> Iterator[None]:
    """``text`` in the file ``path`` (its folders made) while the block runs, removed after:
    what this process is doing, for commands run from another shell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, text)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def fresh_metrics_dir(home: Path, name: str) -> Path:
    """An empty folder for one supervised service's multiprocess metrics."""
    path = home / "metrics" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def gateway_children(
    host: str, port: int, workers: int, metrics_dir: Path, psp_url: str | None = None,
    *, reservations_only: bool = False, env: dict[str, str] | None = None,
) -> list[Child]:  # fmt: skip
    """``workers`` gateway processes sharing ``port``; with ``reservations_only``, the listener
    kept for admitted buyers. Every gateway process of one ``up`` writes its metrics to
    ``metrics_dir``: either port's ``/metrics`` shows them all."""
    env = {**(env or {}), MULTIPROC_ENV: str(metrics_dir)}
    if psp_url:  # the admin API's audit asks the payment provider
        env["FLASHSALE_PSP_URL"] = psp_url
    args = ["gateway", "--host", host, "--port", str(port), "--workers", "1", "--reuse-port"]
    name = "gateway"
    if reservations_only:
        args.append("--reservations-only")
        name = "reservations"
    return [Child(f"{name}-{i + 1}", args, env) for i in range(workers)]


def allocator_child(host: str, ops_port: int) -> Child:
    return Child("allocator", ["allocator", "--host", host, "--ops-port", str(ops_port)])


def workers_child(host: str, ops_port: int, psp_url: str) -> Child:
    args = ["workers", "--host", host, "--ops-port", str(ops_port)]
    return Child("workers", args, {"FLASHSALE_PSP_URL": psp_url})


def reconciler_child(host: str, ops_port: int, psp_url: str) -> Child:
    args = ["reconcile", "--host", host, "--ops-port", str(ops_port)]
    return Child("reconciler", args, {"FLASHSALE_PSP_URL": psp_url})


def psp_child(host: str, port: int, journal: Path) -> Child:
    return Child("psp", ["psp", "--host", host, "--port", str(port), "--journal", str(journal)])


def supervise(children: list[Child], metrics_dir: Path | None, *,
              hung_after_s: float = HUNG_AFTER_S) -> int:  # fmt: skip
    """Run ``children`` under a :class:`Supervisor`; their shared metrics folder goes with
    them (nothing scrapes it once they are gone, and one was left per port ever used)."""

    def on_exit(pid: int) -> None:
        if metrics_dir is not None:
            multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]

    try:
        return Supervisor(children, on_exit=on_exit, hung_after_s=hung_after_s).run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
