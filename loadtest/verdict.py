"""The spike's verdict, apart from locust (which patches the interpreter with gevent): whether
the run stayed correct, from the post-sale audit, the SKU's status and the buyers' answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flashsale.wording import counted
from reconciler.report import detail_text


@dataclass(frozen=True)
class Verdict:
    ok: bool
    lines: list[str]


def judge(sale_id: str, audit: dict[str, Any], sold: int, stock: int, *, answered: int,
          buyers: int, slowest_s: float,
          waited: Mapping[int, int] | None = None) -> Verdict:  # fmt: skip
    """Correct means: the audit passed, nothing was oversold, and every buyer had a definitive
    answer. Anything else fails the run. ``waited``: the 429 and 503 answers the buyers waited
    out (counted as designed, not as failures), said so that a slow run says why."""
    failed = [i["name"] + "".join(f"; {what.replace('_', ' ')}: {detail_text(value)}"
                                  for what, value in i.get("details", {}).items())
              for i in audit.get("invariants", []) if not i.get("passed")]  # fmt: skip
    said = "PASSED" if audit.get("passed") else "FAILED"
    state = audit.get("facts", {}).get("sale_state", "ended")
    if state != "ended":  # a spike leaves its sale running (worded as `flashsale audit` does)
        said += f" (the sale is {state}: this holds as of now; audit it again after its end)"
    lines = [
        f"== spike verdict for sale {sale_id}",
        f"   buyers answered: {answered}/{buyers}; every answer within {slowest_s:.1f}s of the "
        "sale opening",
        f"   sold {sold}/{stock}, oversold {max(0, sold - stock)}",
        f"   audit: {said}",
        *(f"   FAILED: {name}" for name in failed),
    ]
    if answered < buyers:
        lines.append(f"   {counted(buyers - answered, 'buyer')} got no definitive answer")
    limited, busy = (waited or {}).get(429, 0), (waited or {}).get(503, 0)
    if limited or busy:
        lines.append(
            f"   waited out at their Retry-After: {limited:,} answers 429 (rate limited), "
            f"{busy:,} answers 503 (at capacity, or a server down)"
        )
    if limited:
        lines.append(
            "   the engine's per-IP limit paced these buyers, who all come from this "
            "machine's address: to rehearse the crowd rather than the limit, run the "
            "engine with FLASHSALE_RATE_PER_IP=off, or spread the load over machines"
        )
    ok = bool(audit.get("passed")) and sold <= stock and answered >= buyers
    return Verdict(ok, lines)
