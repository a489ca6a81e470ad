"""The whole run of ``flashsale chaos``: the chosen scenarios one after the other, the engine
started once per wiring (restarted if a scenario leaves it broken), then the table, the JSON
and the docs/RELIABILITY.md block."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from flashsale.settings import Settings
from flashsale.wording import counted
from loadtest.bench import machine
from loadtest.bench_all import rewrite
from loadtest.chaos import report, spike
from loadtest.chaos.report import Result
from loadtest.chaos.rig import FaultFailed, Servers, compact_aof, rigged
from loadtest.chaos.scenarios import BY_NAME, SCENARIOS, Scenario

Progress = Callable[[str], None]


def choose(names: list[str] | None, *, quick: bool, cluster: bool = False) -> list[Scenario]:
    """The scenarios to run: those named, else every one (``--quick``: the short set; those
    that need a Redis Cluster only on one). ValueError names an unknown scenario."""
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise ValueError(f"no scenario {', '.join(unknown)} (see flashsale chaos --list)")
        return [BY_NAME[n] for n in names]
    return [s for s in SCENARIOS
            if (s.quick_times or not quick) and (cluster or not s.cluster_only)]  # fmt: skip


async def run(settings: Settings, servers: Servers, scenarios: list[Scenario], *, quick: bool,
              progress: Progress) -> list[Result]:  # fmt: skip
    results: dict[str, Result] = {}
    for proxied in (False, True):
        todo = [s for s in scenarios if s.proxied == proxied]
        while todo:
            try:
                await _some(settings, servers, todo, results, len(scenarios), proxied=proxied,
                            quick=quick, progress=progress)  # fmt: skip
            except FaultFailed as exc:  # the engine did not start: what is left cannot run
                progress(f"\n== the engine did not start: {exc}; not run: "
                         f"{', '.join(s.name for s in todo)}")  # fmt: skip
                why = f"the engine did not start: {exc}"
                for s in todo:
                    results[s.name] = Result(s.name, s.group, s.what, problems=[why])
                todo.clear()
    return [results[s.name] for s in scenarios if s.name in results]


async def _some(settings: Settings, servers: Servers, todo: list[Scenario],
                results: dict[str, Result], total: int, *, proxied: bool, quick: bool,
                progress: Progress) -> None:  # fmt: skip
    """Scenarios of ``todo`` on one engine, until a scenario breaks off (the engine is then
    started afresh) or none is left. FaultFailed when the engine does not start."""
    async with rigged(settings, servers, proxied=proxied, progress=progress) as rig:
        while todo:
            scenario = todo.pop(0)
            progress(f"\n===== chaos {scenario.name} ({len(results) + 1}/{total}): "
                     f"{scenario.what}")  # fmt: skip
            try:
                result = await spike.run(rig, scenario, quick=quick, progress=progress)
            except Exception as exc:  # noqa: BLE001 - recorded; the engine starts afresh
                result = Result(scenario.name, scenario.group, scenario.what)
                result.problems.append(f"the scenario broke off: {exc!r}")
                results[scenario.name] = result
                progress(f"   FAILED: {exc!r}; starting the engine afresh")
                return
            results[scenario.name] = result
            _said(result, progress)


def _said(result: Result, progress: Progress) -> None:
    if result.skipped:
        progress(f"   skipped: {result.skipped}")
        return
    progress(
        f"   {result.verdict()}: {counted(result.faults, 'fault')}, "
        f"{counted(result.requests, 'request')}, "
        f"{result.non_503_5xx} 5xx other than 503, {result.no_retry_after} without "
        f"Retry-After, {result.unanswered} unanswered, "
        f"{counted(result.violations, 'violation')}, {result.lost_reservations} lost; recovery "
        f"{'-' if result.recovery_seconds is None else f'{result.recovery_seconds:g}s'} "
        f"({result.seconds:.0f}s)"
    )
    for line in result.problems:
        progress(f"   problem: {line}")


async def main(settings: Settings, servers: Servers, scenarios: list[Scenario], *, quick: bool,
               command: str, json_path: Path | None, doc: Path | None,
               progress: Progress) -> int:  # fmt: skip
    """Run, print the table, write the JSON and the document block; 0 only if every scenario
    is clean."""
    described = machine()
    if any(s.group == "redis" for s in scenarios):
        await compact_aof(settings, servers, progress)
    results = await run(settings, servers, scenarios, quick=quick, progress=progress)
    progress("\n" + report.table(results))
    totals = report.totals(results)
    data: dict[str, Any] = {"scenarios": [r.as_json() for r in results], "machine": described,
                            "command": command, "totals": totals}  # fmt: skip
    if json_path is not None:
        await asyncio.to_thread(
            json_path.write_bytes, orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"
        )
        progress(f"wrote {json_path}")
    if doc is not None:
        text = await asyncio.to_thread(doc.read_text)
        new = rewrite(text, {"results": report.block(results, described, command)}, "chaos")
        await asyncio.to_thread(doc.write_text, new)
        progress(f"rewrote the results in {doc}")
    clean = all(r.clean for r in results)
    progress(f"{report.in_words(totals)}: {totals['clean']} clean"
             + ("" if clean else " - NOT every scenario is clean"))  # fmt: skip
    return 0 if clean and results else 1
