"""The kinds of repair and flag the reconciler records: one list (``reconciler.report.KINDS``)
that every recorded repair names, that `flashsale repairs --kind` accepts and the runbook
explains. The runbook told operators to watch for `restore_waiting_room`, a kind never
recorded (the reconciler says `restore_queue`), and `repairs --kind restore_waiting_room`
answered "no restore_waiting_room recorded", as for any misspelt kind."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml  # type: ignore[import-untyped]

from reconciler.report import KINDS
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = (ROOT / "docs" / "RUNBOOK.md").read_text()


def _named_in_code() -> set[str]:
    """The kind of every ``Repair(...)`` the reconciler makes: a literal, as the third
    argument or ``kind=``."""
    named: set[str] = set()
    for path in (ROOT / "reconciler").glob("*.py"):
        if path.name == "report.py":  # where the recorded ones are read back
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Repair"):
                continue
            given = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "kind"), None)  # fmt: skip
            assert isinstance(given, ast.Constant) and isinstance(given.value, str), (
                f"{path.name}:{node.lineno}: a Repair's kind is a literal of KINDS"
            )
            named.add(given.value)
    return named


def test_every_kind_recorded_is_listed_and_every_listed_kind_is_recorded() -> None:
    assert _named_in_code() == set(KINDS)


def test_the_runbook_explains_every_kind_and_names_no_other() -> None:
    section = RUNBOOK.split("## FlashsaleReconcileRepairs\n")[1].split("\n## ")[0]
    table = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)
    assert sorted(table) == sorted(KINDS), table
    named = set(re.findall(r"FlashsaleReconcileRepairs \(([^)]*)\)", RUNBOOK))
    for words in named:
        for kind in re.findall(r"`([a-z_]+)`", words):
            assert kind in KINDS, kind


def test_repairs_refuses_a_kind_never_recorded_naming_those_that_are(cli: Cli) -> None:
    refused = cli("repairs", "--kind", "restore_waiting_room")
    assert refused.code == 2, refused
    assert refused.err.startswith("flashsale: error: --kind: "), refused.err
    assert "restore_queue" in refused.err and "rebuild_sku" in refused.err, refused.err


def test_every_flag_for_a_person_raises_an_alert() -> None:
    """A hold sold whose payment the provider never captured was flagged
    (`flag_sold_uncaptured`) for a person, and no alert told anyone: the uncaptured-order
    alert counted `flag_uncaptured` alone."""
    rules = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]
             if "flashsale_reconcile_flags_total" in rule.get("expr", "")]  # fmt: skip
    for kind in (k for k in KINDS if k.startswith("flag_")):
        assert any(
            re.search(r"flashsale_reconcile_flags_total(\[|\{[^}]*\b" + kind + r"\b)", expr)
            for expr in exprs
        ), (kind, exprs)
