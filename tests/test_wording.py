"""How the engine counts things and amounts in what it prints: "1 partition", "2 processes",
"129.00 EUR"."""

from __future__ import annotations

import pytest

from flashsale.currencies import major
from flashsale.kafka import partition_count
from flashsale.wording import counted, said, span
from reconciler.report import SHOWN, AuditReport, Invariant


@pytest.mark.parametrize(
    ("n", "noun", "plural", "said"),
    [
        (1, "SKU", None, "1 SKU"),
        (0, "SKU", None, "0 SKUs"),
        (12_000, "unit", None, "12,000 units"),
        (1, "process", "processes", "1 process"),
        (2, "process", "processes", "2 processes"),
    ],
)
def test_counted_says_one_thing_and_several(
    n: int, noun: str, plural: str | None, said: str
) -> None:
    assert counted(n, noun, plural) == said


def test_a_topic_of_one_partition_is_said_so() -> None:
    """`flashsale kafka init` printed "created (1 partitions, …)" for the dead-letter topic."""
    assert (partition_count(1), partition_count(8)) == ("1 partition", "8 partitions")
    assert partition_count(None) == "? partitions"  # the broker did not say


@pytest.mark.parametrize(
    ("amount", "currency", "said"),
    [(12900, "EUR", "129.00"), (1500, "JPY", "1,500"), (12345, "KWD", "12.345"),
     (5, "USD", "0.05"), (123456789, "EUR", "1,234,567.89"), (0, "EUR", "0.00")],
)  # fmt: skip
def test_an_amount_reads_in_its_currencys_decimals(amount: int, currency: str, said: str) -> None:
    assert major(amount, currency) == said


def test_a_failed_audit_and_a_repair_read_as_text_not_python() -> None:
    """A failed invariant printed "{'count': 22, 'ids': ['sale~S~r-1', ...]}" and a repair
    "{'reason': 'conservation', ...}": Python's own notation, in a command's output."""
    broken = Invariant("4. at most one capture per reservation")
    broken.fail("confirmed_orders_without_capture", [f"s~A~r-{i:02}" for i in range(25)])
    broken.fail("provider", "unreachable")
    report = AuditReport("s", [broken], {"orders": 25, "drained": True})
    text = report.text()
    assert "'" not in text and "{" not in text, text
    first = ", ".join(f"s~A~r-{i:02}" for i in range(SHOWN))
    assert f"        confirmed_orders_without_capture: 25: {first}, …\n" in text, text
    assert text.endswith("        provider: unreachable"), text
    assert said({"reason": "lost", "redis": {"total": 10}}) == (
        '{"reason": "lost", "redis": {"total": 10}}'
    )
    assert said(None) == "-" and said("x") == "x" and said(3) == "3"


def test_a_span_of_time_reads_in_the_unit_a_person_would_use() -> None:
    spans = [45, 119, 120, 600, 7199, 7200, 5 * 3600, 47 * 3600, 48 * 3600, 3 * 86400 + 5]
    assert [span(s) for s in spans] == ["45 s", "119 s", "2 min", "10 min", "120 min", "2 h",
                                        "5 h", "47 h", "2 days", "3 days"]  # fmt: skip
