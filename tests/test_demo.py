"""``flashsale demo`` (what ``make demo`` runs), small: the engine comes up, buyers go through
it, and every reservation becomes a final order with nothing oversold."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from flashsale.settings import Settings


def test_demo_turns_reservations_into_orders(stack: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flashsale", "demo", "--buyers", "80", "--stock", "20"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "80 buyers arrive at once" in out
    match = re.search(r"result: (\d+) orders confirmed, (\d+) payments declined .* (\d+)/20 units "
                      r"sold, oversold 0", out)  # fmt: skip
    assert match, out
    confirmed, declined, sold = (int(g) for g in match.groups())
    # Declined buyers (one in ten, wherever they queued) gave their units to later buyers.
    assert confirmed == sold == 20
    reserved = int(re.search(r"answered in [\d.]+s: (\d+) reserved", out).group(1))  # type: ignore[union-attr]
    assert reserved == confirmed + declined
    assert "0 errors" in out and "== engine stopped" in out
    # It ends with the post-sale audit, every invariant passing.
    assert "== post-sale audit: PASSED" in out
    assert len(re.findall(r"\[pass\] \d\.", out)) == 8 and "[FAIL]" not in out
