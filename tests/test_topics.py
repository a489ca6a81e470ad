"""``flashsale kafka init``: partition counts and replication factor, on the real broker."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import Cli


def test_kafka_init_takes_partitions_and_leaves_existing_topics_alone(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASHSALE_TOPIC_PREFIX", f"t{uuid.uuid4().hex[:8]}-")
    first = cli("kafka", "init", "--partitions", "3")
    assert first.code == 0, first.err
    assert "reservations: created (3 partitions, replication factor 1)" in first.out
    assert "order-events: created (3 partitions" in first.out
    assert "dead-letter: created (1 partitions" in first.out
    again = cli("kafka", "init", "--partitions", "12")
    assert again.code == 0, again.err
    assert again.out.count("exists") == 3 and "reservations: exists (3 partitions)" in again.out
    for flag, value in (("--partitions", "0"), ("--replication-factor", "x")):
        bad = cli("kafka", "init", flag, value)
        assert bad.code == 2 and flag.lstrip("-") in bad.err and bad.err.count("\n") == 1
