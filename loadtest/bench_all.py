"""``flashsale bench all``: every benchmark, one after the other, and the tables of
``docs/BENCHMARKS.md`` rewritten from what they measured.

:func:`run` runs them, the demo first (the others leave sales behind, the reconcile run with
10,000 SKUs, that the services keep an eye on for a while); ``--quick`` runs each small, as a
check that every one works.

Each benchmark's section in the document holds a block between ``<!-- bench all: NAME -->``
and ``<!-- /bench all: NAME -->``: the latest run's machine, command, table and targets. Only
those blocks are rewritten; the analysis around them is written by people and kept. Each run
also writes its JSON report (``bench-NAME.json`` in ``--json-dir``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from flashsale.settings import Settings
from loadtest import (
    bench_allocate,
    bench_gateway,
    bench_pipeline,
    bench_reconcile,
    demo,
    demo_report,
)
from loadtest.bench import Report, machine

Progress = Callable[[str], None]
NAMES = ("allocate", "gateway", "pipeline", "reconcile", "demo")


@dataclass
class Outcome:
    name: str
    block: str  # the document block's new text
    ok: bool  # every consistency check held (targets may still be missed)
    targets_met: bool


def block_for_report(report: Report, rendered: str) -> str:
    m = report.machine
    load = ", ".join(str(x) for x in m.get("load_average_at_start", []))
    targets = report.targets
    met = sum(1 for t in targets if t.met)
    return (
        f"Latest `flashsale bench all` run: {m.get('when')}, {m.get('cpu')}, {m.get('cores')} "
        f"cores, {m.get('memory_gib')} GiB, Python {m.get('python')}, load average {load} at "
        f"the start. Reproduce: `{report.command}`. Targets met: {met} of {len(targets)}.\n\n"
        f"```\n{rendered}\n```\n"
    )


def block_for_demo(report: dict[str, Any], machine: dict[str, Any]) -> str:
    routes = "\n".join(
        f"| {name} | {r['requests']:,} | {r['p50_ms']} | {r['p99_ms']} |"
        for name, r in report["routes"].items()
    )
    seconds = report["seconds_to_answer_all"]
    load = ", ".join(str(x) for x in machine.get("load_average_at_start", []))
    error, coverage = report["eta_p50_abs_pct_error"], report["eta_p90_coverage"]
    past = report.get("eta_past_p50")
    verdict = demo_report.verdicts(report)
    low, high = demo_report.ETA_P90_COVERAGE_TARGET
    tau = report["admission_kendall_tau"]
    limits = demo_report.RESERVE_TARGETS_MS
    return (
        f"Latest `flashsale bench all` run: {machine.get('when')}, {machine.get('cpu')}, "
        f"{machine.get('cores')} cores, load average {load} at the start. Reproduce: "
        f"`flashsale demo --buyers {report['buyers']} --stock {report['stock']} --json "
        "bench-demo.json`.\n\n"
        f"| buyers | joined before the opening | units | every buyer answered after | target "
        f"| sold | oversold | admission order (Kendall tau) | audit |\n"
        f"|---:|---:|---:|---:|---|---:|---:|---:|---|\n"
        f"| {report['buyers']:,} | {report['pre_queue_joins']:,} | {report['stock']} | "
        f"{'-' if seconds is None else f'{seconds:.1f} s'} | ≤ {report['target_seconds']:g} s: "
        f"{verdict['every buyer answered']} | {report['sold']} | {report['oversold']} | "
        f"{'-' if tau is None else tau} | {'passed' if report['audit_passed'] else 'FAILED'} |\n\n"
        f"| ETAs: admitted buyers shown one (before the draw) | p50 error (median) | target "
        f"| admitted within their p90 | target | admitted more than "
        f"{demo_report.ETA_STEP_S:g} s after their p50 |\n|---:|---:|---|---:|---|---:|\n"
        f"| {report['eta_buyers']} ({report['eta_buyers_pre_queue']}) | "
        f"{'-' if error is None else f'{error} %'} | ≤ {demo_report.ETA_P50_ERROR_TARGET:g} %: "
        f"{verdict['ETA p50 error']} | {'-' if coverage is None else f'{coverage:.0%}'} | "
        f"{low:.0%}-{high:.0%}: {verdict['ETA p90 coverage']} | "
        f"{'-' if past is None else f'{past:.0%}'} |\n\n"
        f"| route | requests | p50 ms | p99 ms |\n|---|---:|---:|---:|\n{routes}\n\n"
        f"Reservations: p50 ≤ {limits['p50_ms']:g} ms: {verdict['reserve p50']}, p99 ≤ "
        f"{limits['p99_ms']:g} ms: {verdict['reserve p99']}.\n"
    )


def demo_outcome(report: dict[str, Any], machine: dict[str, Any], code: int) -> Outcome:
    """The demo's line in the summary and its block, from its JSON report and exit code."""
    missed = [name for name, verdict in demo_report.verdicts(report).items()
              if verdict == "MISSED"]  # fmt: skip
    return Outcome("demo", block_for_demo(report, machine), code == 0, not missed)


def rewrite(document: str, blocks: dict[str, str], tool: str = "bench all") -> str:
    """``document`` with the named blocks (between ``<!-- TOOL: NAME -->`` and
    ``<!-- /TOOL: NAME -->``) replaced; ValueError names a block it lacks."""
    pattern = re.compile(
        rf"(<!-- {re.escape(tool)}: (?P<name>[a-z-]+) -->\n)(.*?)"
        rf"(<!-- /{re.escape(tool)}: (?P=name) -->)", re.S
    )  # fmt: skip
    missing = set(blocks) - {m.group("name") for m in pattern.finditer(document)}
    if missing:
        raise ValueError(f"no '<!-- {tool}: NAME -->' block for {sorted(missing)}")

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in blocks:
            return match.group(0)
        return f"{match.group(1)}{blocks[name]}{match.group(4)}"

    return pattern.sub(replace, document)


Runner = Callable[[], Awaitable[Outcome]]


async def run_all(runners: dict[str, Runner], doc: Path, progress: Progress) -> list[Outcome]:
    """Run each benchmark, then rewrite ``doc`` once with every block that was produced."""
    outcomes = []
    for name, runner in runners.items():
        progress(f"\n===== bench {name} =====")
        outcomes.append(await runner())
    text = await asyncio.to_thread(doc.read_text)
    await asyncio.to_thread(doc.write_text, rewrite(text, {o.name: o.block for o in outcomes}))
    progress(f"\nrewrote {len(outcomes)} tables in {doc}")
    return outcomes


def write_json(path: Path, data: Any) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


async def run(settings: Settings, *, quick: bool, folder: Path, doc: Path | None,
              progress: Progress) -> list[Outcome]:  # fmt: skip
    """Every benchmark and the demo; their JSON in ``folder``, their blocks in ``doc`` (when
    given). An outcome is ``ok`` when its consistency checks held."""

    def outcome(name: str, report: Report, render: Callable[[Report], str], ok: bool) -> Outcome:
        write_json(folder / f"bench-{name}.json", report.as_json())
        progress(render(report))
        return Outcome(name, block_for_report(report, render(report)), ok,
                       all(t.met for t in report.targets))  # fmt: skip

    async def allocate() -> Outcome:
        o = bench_allocate.Options(seconds=0.3) if quick else bench_allocate.Options()
        report = await bench_allocate.run(settings, o, progress, o.command())
        return outcome("allocate", report, bench_allocate.render,
                       not bench_allocate.failed(report))  # fmt: skip

    async def gateway() -> Outcome:
        o = bench_gateway.Options(seconds=0.6, rounds=2, workers=1) if quick \
            else bench_gateway.Options()  # fmt: skip
        report = await bench_gateway.run(settings, o, progress, o.command())
        return outcome("gateway", report, bench_gateway.render, not bench_gateway.failed(report))

    async def pipeline() -> Outcome:
        o = bench_pipeline.Options()
        if quick:
            o = bench_pipeline.Options(reservations=300, latencies=(0.0,), concurrency=100,
                                       paced_seconds=1)  # fmt: skip
        report = await bench_pipeline.run(settings, o, progress, o.command())
        return outcome("pipeline", report, bench_pipeline.render,
                       not bench_pipeline.failed(report))  # fmt: skip

    async def reconcile() -> Outcome:
        o = bench_reconcile.Options(skus=300, passes=1) if quick else bench_reconcile.Options()
        report = await bench_reconcile.run(settings, o, progress, o.command())
        return outcome("reconcile", report, bench_reconcile.render,
                       not bench_reconcile.failed(report))  # fmt: skip

    async def spike() -> Outcome:
        buyers = 2000 if quick else 50_000
        path = folder / "bench-demo.json"
        described = machine()
        code = await demo.run(settings, scenario=demo.Scenario(buyers=buyers),
                              progress=progress, json_path=str(path))  # fmt: skip
        data = orjson.loads(await asyncio.to_thread(path.read_bytes))
        return demo_outcome(data, described, code)

    runners: dict[str, Runner] = {
        "demo": spike, "allocate": allocate, "gateway": gateway, "pipeline": pipeline,
        "reconcile": reconcile,
    }  # fmt: skip
    if doc is None:
        return [await runner() for runner in runners.values()]
    return await run_all(runners, doc, progress)
