"""The processes the load tools start and watch: servers stopped with a grace, the CPU time
they used, ``flashsale up`` in the background, waiting until a URL answers 200, and until the
order workers consume."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from flashsale.engine_record import refuse_to_start_an_engine
from flashsale.errors import Unavailable
from flashsale.parent import followed
from flashsale.settings import Settings


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(child) for child in task.read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants (0 where /proc is missing)."""
    total = 0
    for each in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # Fields after the parenthesised command name: utime and stime are the 12th and
            # 13th of them (man 5 proc), in clock ticks.
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Servers:
    """Processes started for one run, stopped together (SIGTERM, then SIGKILL after 15 s)."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def cpu(self, indexes: range | list[int]) -> float:
        return sum(cpu_seconds(self.processes[i].pid) for i in indexes)

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **(env or {}), **followed()}
        self.processes.append(subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        stop_all(self.processes, grace_s=15)


def stop_all(processes: Iterable[subprocess.Popen[bytes]], *, grace_s: float) -> None:
    """SIGTERM every process still running, wait up to ``grace_s`` for each, then SIGKILL
    what is left (and reap it)."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def engine(settings: Settings, port: int, log_path: Path, env: dict[str, str] | None = None,
           *, append: bool = False) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """``flashsale up`` in the background (``env`` added to this process's environment), its
    output in ``log_path`` (appended to with ``append``); stopped with SIGTERM (and waited
    for) on exit, or when this process dies. Refused (Conflict) before it starts where ``up``
    itself would refuse: a benchmark that makes sales runs on this stack, or an engine already
    runs a payment simulator there."""
    env = {**os.environ, "FLASHSALE_RATE_PER_IP": "off", "FLASHSALE_LOG_LEVEL": "WARNING",
           **(env or {}), **followed()}  # fmt: skip
    refuse_to_start_an_engine(settings.home, own_simulator=not env.get("FLASHSALE_PSP_URL"))
    with log_path.open("ab" if append else "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flashsale", "up", "--port", str(port), "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            yield process
        finally:
            stop_all([process], grace_s=30)


async def wait_healthy(session: aiohttp.ClientSession, url: str, patience: float = 60) -> None:
    """Return once ``url`` answers 200; Unavailable (one line from the command line) after
    ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise Unavailable(f"{url} did not answer 200 within {patience:g}s")
        await asyncio.sleep(0.1)


async def wait_consuming(session: aiohttp.ClientSession, metrics_url: str,
                         patience: float = 60) -> float:  # fmt: skip
    """Return once the workers behind ``metrics_url`` have partitions of the reservations
    topic (``flashsale_worker_partitions`` > 0): the seconds it took. A worker that answers
    its health checks may still be waiting for the broker to rebalance its consumer group
    (tansu lets a member that left count for about 18 s), and a reservation made meanwhile
    waits that long to become an order. Unavailable after ``patience`` seconds."""
    began = time.monotonic()
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(metrics_url) as response:
                text = await response.text()
            for family in text_string_to_metric_families(text):
                if family.name == "flashsale_worker_partitions" and any(
                    sample.value > 0 for sample in family.samples
                ):
                    return time.monotonic() - began
        if time.monotonic() - began > patience:
            raise Unavailable(f"the workers at {metrics_url} got no partition within "
                               f"{patience:g}s")  # fmt: skip
        await asyncio.sleep(0.2)


async def histogram_buckets(session: aiohttp.ClientSession, metrics_url: str, name: str,
                            labels: dict[str, str]) -> list[tuple[float, float]]:  # fmt: skip
    """The cumulative buckets (upper bound, count) of the histogram ``name`` with ``labels`` at
    ``metrics_url``, in order."""
    async with session.get(metrics_url) as response:
        text = await response.text()
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                buckets.append((float(sample.labels["le"]), sample.value))
    return sorted(buckets)
