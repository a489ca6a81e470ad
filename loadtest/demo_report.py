"""The demo's report: what ``flashsale demo --json`` writes, the summary it prints, and the
figures behind them (how honest the ETAs were, the admission order, the reservations' latency),
each judged against its target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from flashsale.wording import counted
from gateway.eta import STEP_S
from loadtest.driver import Eta

TARGET_S = 10.0  # every buyer answered within this long after the sale opens
RESERVE_TARGETS_MS = {"p50_ms": 100.0, "p99_ms": 500.0}  # an admitted buyer's reservation

Progress = Callable[[str], None]


@dataclass
class DemoReport:
    """What ``--json`` writes."""

    buyers: int
    stock: int
    sale: str = ""
    scenario: dict[str, Any] = field(default_factory=dict)
    pre_queue_joins: int = 0
    sold: int = 0
    oversold: int = 0
    seconds_to_answer_all: float | None = None
    admission_kendall_tau: float | None = None
    admission_order: str = ""  # the line saying it (:func:`admission_order`); not in the JSON
    eta_p50_abs_pct_error: float | None = None
    eta_p90_coverage: float | None = None
    eta_past_p50: float | None = None  # admitted more than a step after their p50
    eta_buyers: int = 0
    eta_buyers_pre_queue: int = 0  # of eta_buyers: shown their first ETA before the draw
    # the same figures for the ETAs shown before the draw and for those shown with a place
    eta_by_kind: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    audit_passed: bool = False
    archived_kb: float | None = None  # per-buyer Redis state the archive deleted
    outcomes: dict[str, int] = field(default_factory=dict)
    orders: dict[str, int] = field(default_factory=dict)
    routes: dict[str, dict[str, float]] = field(default_factory=dict)
    driver_loop_lag: dict[str, float] = field(default_factory=dict)  # ms, p50 and p99
    reserved_via: dict[str, int] = field(default_factory=dict)  # see DriverStats.reserved_via
    # the reservations' p50 and p99 (ms) in the gateway's own latency histogram
    reserve_in_gateway: dict[str, float] = field(default_factory=dict)
    target_seconds: float = TARGET_S

    def as_json(self) -> dict[str, Any]:
        return {
            "sale": self.sale, "scenario": self.scenario, "buyers": self.buyers,
            "stock": self.stock, "pre_queue_joins": self.pre_queue_joins, "sold": self.sold,
            "oversold": self.oversold, "seconds_to_answer_all": self.seconds_to_answer_all,
            "admission_kendall_tau": self.admission_kendall_tau,
            "eta_p50_abs_pct_error": self.eta_p50_abs_pct_error,
            "eta_p90_coverage": self.eta_p90_coverage, "eta_past_p50": self.eta_past_p50,
            "eta_buyers": self.eta_buyers,
            "eta_buyers_pre_queue": self.eta_buyers_pre_queue, "eta_by_kind": self.eta_by_kind,
            "audit_passed": self.audit_passed, "archived_kb": self.archived_kb,
            "routes": self.routes,
            "outcomes": self.outcomes, "orders": self.orders,
            "target_seconds": self.target_seconds,
            "driver_loop_lag": self.driver_loop_lag,
            "reserved_via": self.reserved_via,
            "reserve_in_gateway": self.reserve_in_gateway,
            "reserve_targets_ms": RESERVE_TARGETS_MS,
            "reserve_verdicts": reserve_verdicts(self.routes),
        }  # fmt: skip


# A wait shorter than this counts as this long in the percentage error: the page shows whole
# seconds, so "about 0 s" for a wait of 0.4 s is not 100 % off to anyone.
ETA_FLOOR_S = 1.0
# Finer than this no ETA can place a buyer's admission: the pump's step and the rounding.
ETA_STEP_S = STEP_S
ETA_P50_ERROR_TARGET = 25.0  # % (median absolute error of the p50)
ETA_P90_COVERAGE_TARGET = (0.85, 0.95)  # share admitted within their p90


class EtaAccuracy(NamedTuple):
    """How honest the ETAs shown were (None when nobody was shown one)."""

    p50_error: float | None  # %, median absolute error of the p50
    p90_coverage: float | None  # share admitted within their p90
    past_p50: float | None  # share admitted more than ETA_STEP_S after their p50


def eta_verdicts(
    error: float | None, coverage: float | None, past_p50: float | None = None
) -> tuple[str, str]:
    """'met' or 'MISSED' for the p50 error and the p90 coverage ('-' when not measured).

    A coverage above the window says the p90 was wider than it had to be, unless fewer buyers
    than the window leaves out waited more than a step past their p50: then even a p90 a
    step above the p50, the tightest one an ETA can say, would have covered more, and the
    p90 shown was not too wide (everyone admitted by one pump step, as in the 50,000-buyer
    demo)."""
    low, high = ETA_P90_COVERAGE_TARGET
    p50 = "-" if error is None else "met" if error <= ETA_P50_ERROR_TARGET else "MISSED"
    if coverage is None:
        p90 = "-"
    elif low <= coverage <= high or (coverage > high and not p90_could_be_tighter(past_p50)):
        p90 = "met"
    else:
        p90 = "MISSED"
    return p50, p90


def p90_could_be_tighter(past_p50: float | None) -> bool:
    """Whether enough buyers waited past their p50 for a p90 inside the coverage window to
    exist (unknown counts as yes)."""
    return past_p50 is None or past_p50 >= 1.0 - ETA_P90_COVERAGE_TARGET[1]


def eta_accuracy(etas: list[Eta]) -> EtaAccuracy:
    """How honest the ETAs were: the median absolute percentage error of the first p50 each
    admitted buyer was shown, the share of them admitted within the first p90 shown, and the
    share admitted more than a step after that p50. A wait is floored at ``ETA_FLOOR_S`` in
    the error; an unknown p90 covers nothing."""
    if not etas:
        return EtaAccuracy(None, None, None)
    errors = sorted(abs(e.p50 - e.waited) / max(e.waited, ETA_FLOOR_S) for e in etas)
    middle = len(errors) // 2
    median = errors[middle] if len(errors) % 2 else (errors[middle - 1] + errors[middle]) / 2
    covered = sum(1 for e in etas if e.p90 is not None and e.waited <= e.p90)
    past = sum(1 for e in etas if e.waited > e.p50 + ETA_STEP_S)
    return EtaAccuracy(
        round(median * 100, 1), round(covered / len(etas), 3), round(past / len(etas), 3)
    )


def kendall_tau(pairs: list[tuple[int, int]]) -> float | None:
    """Kendall's tau between queue positions and admission times, over the pairs of buyers
    that differ in both (buyers admitted by one pump step share a time: such pairs say
    nothing about order). 1.0: nobody was admitted before someone ahead of them. None for
    fewer than two comparable buyers."""
    ordered = sorted(pairs)
    concordant = discordant = 0
    for i, (p1, t1) in enumerate(ordered):
        for p2, t2 in ordered[i + 1 :]:
            if p1 != p2 and t1 != t2:
                if t1 < t2:
                    concordant += 1
                else:
                    discordant += 1
    total = concordant + discordant
    return None if total == 0 else round((concordant - discordant) / total, 6)


def admission_order(pairs: list[tuple[int, int]]) -> str:
    """The report's word on admission order, from (queue position, admission time) pairs:
    Kendall's tau where buyers were admitted at different times; where one pump step
    admitted them all (the demo's defaults: every winner at the opening), which places."""
    tau = kendall_tau(pairs)
    if tau is not None:
        return f"Kendall tau {tau:.3f} ({'in order' if tau == 1.0 else 'OUT OF ORDER'})"
    if not pairs:
        return "Kendall tau n/a (nobody was admitted)"
    places = sorted(p for p, _ in pairs)
    step = "Kendall tau n/a (no two admitted at different times): one pump step admitted "
    if places == list(range(1, len(places) + 1)):
        return step + f"places 1..{len(places)}, the head of the queue"
    return step + f"{len(places)} places from {places[0]} to {places[-1]}"


def summary(report: DemoReport, progress: Progress) -> None:
    """The report, in lines for ``progress``."""
    seconds = report.seconds_to_answer_all
    met = seconds is not None and seconds <= report.target_seconds
    progress(f"== report: {counted(report.buyers, 'buyer')}, {counted(report.stock, 'unit')}")
    progress(f"   every buyer had a definitive answer {seconds:.1f}s after the sale opened "
             f"(target {report.target_seconds:g}s: {'met' if met else 'MISSED'})"
             if seconds is not None else "   not every buyer got an answer")  # fmt: skip
    kb = report.archived_kb
    archived = "" if kb is None else f"; archived, {kb:,.0f} KB of Redis state deleted"
    progress(f"   sold {report.sold}/{report.stock}, oversold {report.oversold}; "
             f"audit {'passed' if report.audit_passed else 'FAILED'}{archived}")  # fmt: skip
    progress(f"   admission order vs queue order: {report.admission_order}")
    if report.eta_buyers:
        coverage, past = report.eta_p90_coverage, report.eta_past_p50
        p50_met, p90_met = eta_verdicts(report.eta_p50_abs_pct_error, coverage, past)
        low, high = ETA_P90_COVERAGE_TARGET
        progress(f"   ETAs of the {report.eta_buyers} admitted buyers shown one "
                 f"({report.eta_buyers_pre_queue} before the draw): p50 off by "
                 f"{report.eta_p50_abs_pct_error}% (median; target <= "
                 f"{ETA_P50_ERROR_TARGET:g}%: {p50_met}), admitted within their p90: "
                 f"{coverage:.0%} (target {low:.0%}-{high:.0%}: {p90_met})")  # fmt: skip
        if coverage is not None and past is not None and coverage > high \
                and not p90_could_be_tighter(past):  # fmt: skip
            progress(f"     (above {high:.0%}, but only {past:.0%} were admitted more than "
                     f"{ETA_STEP_S:g}s after their p50: no p90 an ETA can say would have "
                     f"covered fewer)")  # fmt: skip
        for kind, part in report.eta_by_kind.items():
            if part["buyers"]:
                who = counted(int(part["buyers"]), "buyer")
                progress(f"     {kind.replace('_', ' ')}: {who}, p50 off by "
                         f"{part['p50_abs_pct_error']}%, within p90 "
                         f"{part['p90_coverage']:.0%}")  # fmt: skip
    for route, figures in report.routes.items():
        progress(f"   {route:8} {figures['requests']:>7,.0f} requests  p50 {figures['p50_ms']} "
                 f"ms  p99 {figures['p99_ms']} ms")  # fmt: skip
    if report.driver_loop_lag:
        lag = report.driver_loop_lag
        progress(f"   (the driver's own event loop ran late by p50 {lag['p50_ms']} ms, p99 "
                 f"{lag['p99_ms']} ms: each latency above but the reservations' includes that "
                 "wait; reservations are sent from a loop of their own, as from each buyer's "
                 "device)")  # fmt: skip
    if report.reserve_in_gateway:
        inside = report.reserve_in_gateway
        progress(f"   reservations inside the gateway (its latency histogram, from its "
                 f"middleware to the answer): p50 {inside['p50_ms']} ms, p99 "
                 f"{inside['p99_ms']} ms")  # fmt: skip
    if report.reserved_via:
        progress("   reservations sent to: " + ", ".join(
            f"{WHERE[k]} {v:,}" for k, v in sorted(report.reserved_via.items())))  # fmt: skip
    verdicts = reserve_verdicts(report.routes)
    if verdicts:
        progress("   reservations: " + ", ".join(
            f"{q.removesuffix('_ms')} {report.routes['reserve'][q]} ms (target <= "
            f"{RESERVE_TARGETS_MS[q]:g} ms: {v})" for q, v in verdicts.items()))  # fmt: skip


WHERE = {"listener": "the reservations listener (reserve_url)", "gateway": "the gateway",
         "fallback": "the gateway after the listener failed"}  # fmt: skip


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram (upper bound, count; in order), as
    Prometheus' ``histogram_quantile`` estimates it: linear within the bucket it falls in, the
    lower bound of the last, unbounded one. None without observations."""
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return None
    rank, low, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return low
            return low + (bound - low) * (rank - below) / (count - below or 1.0)
        low, below = bound, count
    return low


def reserve_verdicts(routes: dict[str, dict[str, float]]) -> dict[str, str]:
    """'met' or 'MISSED' for the reservations' p50 and p99 ({} when nobody reserved)."""
    reserve = routes.get("reserve")
    if not reserve or not reserve["requests"]:
        return {}
    return {q: "met" if reserve[q] <= limit else "MISSED" for q, limit in
            RESERVE_TARGETS_MS.items()}  # fmt: skip


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    """Every target the demo judges, from its JSON report: 'met', 'MISSED' or '-' (not
    measured). Not every buyer answered is a missed time."""
    seconds = report["seconds_to_answer_all"]
    p50, p90 = eta_verdicts(report["eta_p50_abs_pct_error"], report["eta_p90_coverage"],
                            report.get("eta_past_p50"))  # fmt: skip
    reserve = reserve_verdicts(report["routes"])
    on_time = seconds is not None and seconds <= report["target_seconds"]
    return {
        "every buyer answered": "met" if on_time else "MISSED",
        "ETA p50 error": p50,
        "ETA p90 coverage": p90,
        "reserve p50": reserve.get("p50_ms", "-"),
        "reserve p99": reserve.get("p99_ms", "-"),
    }
