"""``flashsale bench all``: every benchmark, one after the other, and the tables of
``docs/BENCHMARKS.md`` rewritten from what they measured.

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

from loadtest.bench import Report

Progress = Callable[[str], None]
NAMES = ("allocate", "gateway", "pipeline", "reconcile", "demo")
_BLOCK = re.compile(
    r"(<!-- bench all: (?P<name>[a-z]+) -->\n)(.*?)(<!-- /bench all: (?P=name) -->)", re.S
)


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
    met = seconds is not None and seconds <= report["target_seconds"]
    load = ", ".join(str(x) for x in machine.get("load_average_at_start", []))
    return (
        f"Latest `flashsale bench all` run: {machine.get('when')}, {machine.get('cpu')}, "
        f"{machine.get('cores')} cores, load average {load} at the start. Reproduce: "
        f"`flashsale demo --buyers {report['buyers']} --stock {report['stock']} --json "
        "bench-demo.json`.\n\n"
        f"| buyers | units | every buyer answered after | target | sold | oversold | audit |\n"
        f"|---:|---:|---:|---|---:|---:|---|\n"
        f"| {report['buyers']:,} | {report['stock']} | "
        f"{'-' if seconds is None else f'{seconds:.1f} s'} | ≤ {report['target_seconds']:g} s: "
        f"{'met' if met else 'MISSED'} | {report['sold']} | {report['oversold']} | "
        f"{'passed' if report['audit_passed'] else 'FAILED'} |\n\n"
        f"| route | requests | p50 ms | p99 ms |\n|---|---:|---:|---:|\n{routes}\n"
    )


def rewrite(document: str, blocks: dict[str, str]) -> str:
    """``document`` with the named blocks replaced; ValueError names a block it lacks."""
    missing = set(blocks) - {m.group("name") for m in _BLOCK.finditer(document)}
    if missing:
        raise ValueError(f"no '<!-- bench all: NAME -->' block for {sorted(missing)}")

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in blocks:
            return match.group(0)
        return f"{match.group(1)}{blocks[name]}{match.group(4)}"

    return _BLOCK.sub(replace, document)


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
