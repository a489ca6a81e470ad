"""Messages parked on the dead-letter topic are seen: ``flashsale kafka dead-letters`` lists
them with their reasons, and the reconciler counts them for Prometheus (the alert on that
count: tests/test_alert_rules.py). The workers park them on the real broker."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from prometheus_client import CollectorRegistry

from flashsale.settings import Settings
from reconciler.report import ReconcileMetrics
from reconciler.service import BrokerReadings
from tests.conftest import Cli
from tests.pipeline import pipeline

POISON = [b"{not json", b"\xff\xfe binary", b"[1, 2]"]


async def test_parked_messages_are_listed_with_their_reasons_and_counted(
    stack: Settings, run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with pipeline(stack) as p:
        topic = p.settings.topics.dead_letter
        monkeypatch.setenv("FLASHSALE_TOPIC_DEAD_LETTER", topic)
        empty = await asyncio.to_thread(run_cli, "kafka", "dead-letters")
        assert empty.code == 0, empty.err
        assert f"no message is parked on {topic}" in empty.out

        for value in POISON:
            await p.relay.producer.send_and_wait(p.settings.topics.reservations, key=b"k",
                                                 value=value)  # fmt: skip
        workers = p.start_workers(attempts=2)  # they run to the end: one group join
        parked = await p.topic_messages(topic, at_least=len(POISON))
        sources = [dict(m.headers)["source"].decode() for m in parked]

        listed = await asyncio.to_thread(run_cli, "kafka", "dead-letters", "--json")
        assert listed.code == 0, listed.err
        body = json.loads(listed.out)
        assert (body["topic"], body["parked"], body["kept"]) == (topic, 3, 3), body
        assert [m["source"] for m in body["messages"]] == sources
        assert [m["value"] for m in body["messages"]] == [v.decode(errors="replace")
                                                          for v in POISON]  # fmt: skip
        assert all(m["reason"].startswith("unreadable") for m in body["messages"]), body
        assert all(m["at"].endswith("Z") for m in body["messages"]), body

        last = await asyncio.to_thread(run_cli, "kafka", "dead-letters", "--limit", "2")
        assert last.code == 0, last.err
        head, *lines = last.out.splitlines()
        assert head == f"3 messages parked on {topic}; the last 2:", head
        assert len(lines) == 4, lines  # two lines a message
        assert sources[0] not in last.out and sources[1] in last.out and sources[2] in last.out
        assert "unreadable" in last.out and "[1, 2]" in last.out

        bad = await asyncio.to_thread(run_cli, "kafka", "dead-letters", "--limit", "0")
        assert bad.code == 2 and bad.err.startswith("flashsale: error: --limit:"), bad.err

        # The reconciler's gauge (the alert's input) rises with one more parked message. Its
        # figure is the broker's end offsets, which tansu reports short (module docstring of
        # flashsale/dead_letters.py); it rises all the same.
        registry = CollectorRegistry()
        metrics = ReconcileMetrics(registry)
        broker = BrokerReadings(p.settings)
        name, labels = "flashsale_dead_letter_messages", {"topic": topic}
        try:
            await broker.read(metrics)
            before = registry.get_sample_value(name, labels)
            assert before is not None and before >= 1, before
            await p.relay.producer.send_and_wait(p.settings.topics.reservations, value=b"{")
            await p.topic_messages(topic, at_least=len(POISON) + 1)
            broker.last = None  # read now, not a second after the first reading
            await broker.read(metrics)
            after = registry.get_sample_value(name, labels)
            assert after is not None and after > before, (before, after)
        finally:
            await broker.aclose()
            await workers.drain()


def test_a_dead_letter_topic_not_made_yet_is_said_so(
    stack: Settings, run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any service or `kafka init` made the topic, the listing stopped with a
    traceback: aiokafka's consumer raises CancelledError when stopped right after its start
    (its issue 647)."""
    topic = f"t{uuid.uuid4().hex[:8]}-dead-letter"
    monkeypatch.setenv("FLASHSALE_TOPIC_DEAD_LETTER", topic)
    said = run_cli("kafka", "dead-letters")
    assert said.code == 0, said.err
    assert said.out.strip() == f"no topic {topic} on the broker yet: `flashsale kafka init` " \
        "or the services at their start make it", said.out  # fmt: skip
