"""What ``flashsale chaos`` found: one :class:`Result` per scenario, the table it prints, the JSON
of ``--json`` and the block of docs/RELIABILITY.md (between ``<!-- chaos: results -->`` and
``<!-- /chaos: results -->``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashsale.wording import counted


@dataclass
class Result:
    name: str
    group: str
    what: str
    faults: int = 0
    buyers: int = 0
    requests: int = 0
    non_503_5xx: int = 0
    no_retry_after: int = 0  # 429 or 503 answers without Retry-After
    unanswered: int = 0  # buyers with neither a reservation nor "sold out"
    violations: int = 0  # failed audit invariants, and hostile requests accepted
    lost_reservations: int = 0  # acknowledged, and not a terminal order after the drain
    recovery_seconds: float | None = None  # worst, from a fault's end to the next grant
    granted_during_outage: int | None = None  # Postgres-only outages
    reserved: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why it is not clean, in words
    skipped: str | None = None

    @property
    def clean(self) -> bool:
        return self.skipped is not None or (
            not self.problems and self.non_503_5xx == 0 and self.no_retry_after == 0
            and self.unanswered == 0 and self.violations == 0 and self.lost_reservations == 0
        )  # fmt: skip

    def verdict(self) -> str:
        return "skipped" if self.skipped else ("clean" if self.clean else "FAILED")

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "faults": self.faults, "buyers": self.buyers,
            "requests": self.requests, "non_503_5xx": self.non_503_5xx,
            "unanswered": self.unanswered, "violations": self.violations,
            "lost_reservations": self.lost_reservations,
            "recovery_seconds": self.recovery_seconds, "group": self.group, "what": self.what,
            "retry_after_missing": self.no_retry_after,
            "granted_during_outage": self.granted_during_outage, "reserved": self.reserved,
            "seconds": round(self.seconds, 1), "clean": self.clean, "skipped": self.skipped,
            "notes": self.notes, "problems": self.problems,
        }  # fmt: skip


HEADER = (
    "| scenario | faults | buyers | requests | 5xx ≠ 503 | no Retry-After | unanswered | "
    "violations | lost | recovery s | granted while Postgres was out | verdict |"
)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else f"{value:,}"


def row(r: Result) -> str:
    if r.skipped:
        return f"| {r.name} | - | - | - | - | - | - | - | - | - | - | skipped: {r.skipped} |"
    cells = [
        r.faults,
        r.buyers,
        r.requests,
        r.non_503_5xx,
        r.no_retry_after,
        r.unanswered,
        r.violations,
        r.lost_reservations,
        r.recovery_seconds,
        r.granted_during_outage,
    ]
    return f"| {r.name} | " + " | ".join(_cell(c) for c in cells) + f" | {r.verdict()} |"


def totals(results: list[Result]) -> dict[str, int]:
    ran = [r for r in results if not r.skipped]
    keys = ("faults", "requests", "non_503_5xx", "no_retry_after", "unanswered", "violations",
            "lost_reservations")  # fmt: skip
    sums = {k: sum(getattr(r, k) for r in ran) for k in keys}
    sums["scenarios"] = len(ran)
    sums["clean"] = sum(1 for r in ran if r.clean)
    sums["abuse_requests"] = sum(r.requests for r in ran if r.group == "abuse")
    sums["race_passes"] = sum(r.faults for r in ran if r.group == "races")
    return sums


def in_words(t: dict[str, int]) -> str:
    """What the run did, in words: faults injected (the races' passes apart), abuse."""
    races = t["race_passes"]
    return (f"{counted(t['faults'] - races, 'fault')} injected, {races:,} racing reconcile "
            f"{'pass' if races == 1 else 'passes'} and "
            f"{counted(t['abuse_requests'], 'abuse request')} in "
            f"{counted(t['scenarios'], 'scenario')}")  # fmt: skip


def table(results: list[Result]) -> str:
    lines = [HEADER, "|---|" + "---:|" * 10 + "---|", *(row(r) for r in results)]
    t = totals(results)
    lines.append(
        f"| **{counted(t['scenarios'], 'scenario')}** | **{t['faults']:,}** | | "
        f"**{t['requests']:,}** | "
        f"**{t['non_503_5xx']}** | **{t['no_retry_after']}** | **{t['unanswered']}** | "
        f"**{t['violations']}** | **{t['lost_reservations']}** | | | "
        f"**{t['clean']}/{t['scenarios']} clean** |"
    )
    return "\n".join(lines)


def block(results: list[Result], machine: dict[str, Any], command: str) -> str:
    """The docs/RELIABILITY.md block: when, where, how to reproduce, the table, the notes."""
    load = ", ".join(str(x) for x in machine.get("load_average_at_start", []))
    t = totals(results)
    notes = [f"- **{r.name}**: {'; '.join(r.notes + r.problems)}" for r in results
             if r.notes or r.problems]  # fmt: skip
    return (
        f"Latest run: {machine.get('when')}, {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"{machine.get('memory_gib')} GiB, Python {machine.get('python')}, load average {load} "
        f"at the start. Reproduce: `{command}`. {in_words(t)}; {t['clean']} clean."
        f"\n\n{table(results)}\n\n" + "\n".join(notes) + "\n"
    )
