"""How the engine counts things in what it prints: "1 partition", "2 processes"."""

from __future__ import annotations

import pytest

from flashsale.kafka import partition_count
from flashsale.wording import counted


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
