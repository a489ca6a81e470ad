"""Messages parked on the dead-letter topic are seen: ``flashsale kafka dead-letters`` lists
them with their reasons, and the reconciler counts them for Prometheus (the alert on that
count: tests/test_alert_rules.py). The workers park them on the real broker."""

from __future__ import annotations

import asyncio
import json
import uuid

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from flashsale.settings import Settings
from reconciler.report import ReconcileMetrics
from reconciler.service import BrokerReadings
from tests.conftest import Cli
from tests.pipeline import pipeline
from workers.parking import Parked, park

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


def record(topic: str, offset: int, key: bytes, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(topic, 0, offset, 0, 0, key, value, None, len(key), len(value), [])


async def test_parked_messages_are_resent_to_where_they_came_from_once_the_cause_is_mended(
    stack: Settings, run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing read the dead-letter topic again: a shop that refused every order event for a
    while (a schema change on its side) had them all parked, and the runbook could only say
    to give it the orders by hand. ``kafka resend-dead-letters`` sends the chosen ones back
    to the topic each came from, as they were."""
    async with pipeline(stack) as p:
        topics = p.settings.topics
        for name, value in topics.env().items():
            monkeypatch.setenv(name, value)
        empty = await asyncio.to_thread(run_cli, "kafka", "resend-dead-letters")
        assert empty.out == f"no message is parked on {topics.dead_letter}\n", empty
        hook = [record(topics.order_events, 7 + n, b"o-%d" % n, b'{"order_id": "o-%d"}' % n)
                for n in range(3)]  # fmt: skip
        saga = record(topics.reservations, 3, b"r-1", b'{"type": "created"}')
        stray = record("someone-elses-topic", 1, b"x", b"{}")
        parked = [Parked(r, "webhook refused: HTTP 422") for r in hook]
        parked += [Parked(saga, "failed 3 times: KeyError('sku')"), Parked(stray, "unreadable")]
        await park(p.relay.producer, topics.dead_letter, parked, counted=lambda _r: None)
        await p.topic_messages(topics.dead_letter, at_least=len(parked))

        # Looked at first: --dry-run says what would go, and sends nothing.
        dry = await asyncio.to_thread(run_cli, "kafka", "resend-dead-letters", "--reason",
                                      "webhook refused", "--dry-run")  # fmt: skip
        assert dry.code == 0, dry.err
        assert f"would resend 3 messages to {topics.order_events}" in dry.out, dry.out
        mended = await asyncio.to_thread(run_cli, "kafka", "resend-dead-letters", "--reason",
                                         "WEBHOOK refused", "--within", "1h")  # fmt: skip
        assert mended.code == 0, mended.err
        assert f"resent 3 messages to {topics.order_events}" in mended.out, mended.out
        assert topics.reservations not in mended.out  # not chosen
        back = await p.topic_messages(topics.order_events, at_least=3)
        assert sorted((m.key, m.value) for m in back) == [(r.key, r.value) for r in hook]
        assert {dict(m.headers)["resent"].decode() for m in back} == \
            {f"{topics.dead_letter}/0/{n}" for n in range(3)}  # fmt: skip

        every = await asyncio.to_thread(run_cli, "kafka", "resend-dead-letters")
        assert every.code == 0, every.err
        assert f"resent 1 message to {topics.reservations}" in every.out, every.out
        assert "1 not resent: from someone-elses-topic, not one of this engine's" in every.out
        again = await p.topic_messages(topics.reservations, at_least=1)
        assert [(m.key, orjson.loads(m.value)) for m in again] == [(b"r-1", {"type": "created"})]

        none = await asyncio.to_thread(run_cli, "kafka", "resend-dead-letters", "--reason",
                                       "no such reason")  # fmt: skip
        assert none.code == 0, none.err
        assert none.out.startswith("none of the 5 newest parked messages matches"), none.out
        await asyncio.sleep(1.1)
        earlier = await asyncio.to_thread(run_cli, "kafka", "resend-dead-letters", "--within",
                                          "1s", "--dry-run")  # fmt: skip
        assert earlier.code == 0 and "none of the 5" in earlier.out, earlier.out
        for bad in (["--within", "soon"], ["--limit", "0"], ["--reason", " "]):
            refused = await asyncio.to_thread(run_cli, "kafka", "resend-dead-letters", *bad)
            assert refused.code == 2, refused
            assert refused.err.startswith(f"flashsale: error: {bad[0]}"), refused.err
