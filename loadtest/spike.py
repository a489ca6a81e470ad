"""``flashsale loadtest spike``: the locust spike (``loadtest/locustfile.py``) headless against a
running engine, or, with ``--embedded``, against the embedded stack and a ``flashsale up``
started for the run. CSV and HTML reports go to ``--out``; the exit code is locust's, which
the locustfile sets non-zero on any failed invariant."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.errors import ConfigError
from flashsale.kafka import ensure_topics
from flashsale.settings import Settings
from flashsale.wording import span
from loadtest.engine_check import CannotStart, check_engine
from loadtest.processes import engine, wait_consuming, wait_healthy
from loadtest.spike_sale import copy_sale, existing_sale

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    buyers: int
    stock: int
    ramp: float
    hold: float
    host: str
    out: Path
    embedded: bool
    buckets: int = 1
    sale: str = ""  # an existing sale to rehearse, instead of one the spike makes
    in_place: bool = False  # rehearse that sale itself, not a copy made for the run
    opens_in: float = 0.0  # seconds from now to the copy's opening


def locust_command(options: Options, host: str) -> list[str]:
    locustfile = importlib.resources.files("loadtest").joinpath("locustfile.py")
    prefix = options.out / "spike"
    return [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", host,
        "--buyers", str(options.buyers),
        *(["--sale", options.sale] if options.sale else
          ["--stock", str(options.stock), "--buckets", str(options.buckets)]),
        "--ramp", f"{options.ramp:g}", "--hold", f"{options.hold:g}",
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--loglevel", "WARNING",
    ]  # fmt: skip


def _check(host: str, admin_token: str, sale: str, progress: Progress, *,
           copy_opening_in: float | None = None) -> str:  # fmt: skip
    """The sale locust rehearses: ``sale`` itself, or with ``copy_opening_in`` (seconds to its
    opening) a copy of it made now, so that its buyers and orders land in the copy. One line
    before locust starts when the engine is not there or refuses the token, or the sale to
    rehearse cannot be; and one when that sale opens later, which the run waits for."""
    try:
        check_engine(host, admin_token)
        if sale and copy_opening_in is not None:
            progress(f"== copying {sale} for the run: its products, stock, limits and proof of "
                     f"work ({sale} itself is only read)")  # fmt: skip
            copy = copy_sale(host, admin_token, sale, opens_in_s=copy_opening_in)
            progress(f"== rehearsing {copy}, a copy of {sale} made for the run")
            sale = copy
        if sale:
            wait = existing_sale(host, admin_token, sale)["opened_at"] - time.time()
            if wait >= 1:
                progress(f"== {sale} opens in {span(wait)}: its buyers wait in its pre-queue "
                         "until then, and their answers are timed from the opening")  # fmt: skip
    except CannotStart as exc:
        if exc.unreachable:
            raise ConfigError(f"--host: {exc}: start the engine (flashsale up) or run the spike "
                              "with --embedded") from None  # fmt: skip
        raise ConfigError(str(exc)) from None
    return sale


def _checked(host: str, admin_token: str, options: Options, progress: Progress) -> Options:
    """``options`` with the sale :func:`_check` found for locust to rehearse."""
    sale = _check(host, admin_token, options.sale, progress,
                  copy_opening_in=None if options.in_place else options.opens_in)  # fmt: skip
    return dataclasses.replace(options, sale=sale)


def _run_locust(settings: Settings, options: Options, host: str, progress: Progress) -> int:
    options.out.mkdir(parents=True, exist_ok=True)
    command = locust_command(options, host)
    progress(f"== {' '.join(command[1:])}")
    env = {
        **os.environ,
        "FLASHSALE_ADMIN_TOKEN": settings.admin_token.current(),
        "FLASHSALE_BUYER_TOKEN_SECRET": settings.buyer_token_secret.reveal(),
    }
    code = subprocess.run(command, env=env, check=False).returncode
    progress(f"== reports: {options.out}/spike_stats.csv, spike.html (locust exit {code})")
    return code


async def run(settings: Settings, options: Options, progress: Progress) -> int:
    token = settings.admin_token.current()
    if not options.embedded:
        options = await asyncio.to_thread(_checked, options.host, token, options, progress)
        return await asyncio.to_thread(_run_locust, settings, options, options.host, progress)
    await ensure_topics(settings)
    port = free_ports(UP_PORTS)
    log_path = settings.home / "spike-engine.log"
    progress(f"== starting the engine: flashsale up --port {port} (log: {log_path})")
    with engine(settings, port, log_path):
        async with aiohttp.ClientSession() as session:
            for offset in range(UP_PORTS):
                await wait_healthy(session, f"http://127.0.0.1:{port + offset}/healthz")
            # Orders only flow once the broker has given the workers their partitions.
            await wait_consuming(session, f"http://127.0.0.1:{port + 2}/metrics")
        host = f"http://127.0.0.1:{port}"
        if options.sale:  # in this stack, ready to rehearse: else one line, as without
            options = await asyncio.to_thread(_checked, host, token, options, progress)
        code = await asyncio.to_thread(_run_locust, settings, options, host, progress)
    progress("== engine stopped")
    return code
