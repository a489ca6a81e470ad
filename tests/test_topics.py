"""``flashsale kafka init``: partition counts and replication factor, and the consumer lag's
reading, on the real broker."""

from __future__ import annotations

import asyncio
import gc
import uuid
from dataclasses import replace

import pytest

from flashsale.cli.devstack.processes import free_port
from flashsale.errors import Unavailable
from flashsale.kafka import LagReader, delete_topics, ensure_topics, producer
from flashsale.ops_endpoints import KafkaProbe, check
from flashsale.settings import Settings
from flashsale.topics import Topics
from tests.conftest import Cli


def test_kafka_init_takes_partitions_and_leaves_existing_topics_alone(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASHSALE_TOPIC_PREFIX", f"t{uuid.uuid4().hex[:8]}-")
    first = cli("kafka", "init", "--partitions", "3")
    assert first.code == 0, first.err
    assert "reservations: created (3 partitions, replication factor 1)" in first.out
    assert "order-events: created (3 partitions" in first.out
    assert "dead-letter: created (1 partition, replication factor 1)" in first.out
    again = cli("kafka", "init", "--partitions", "12")
    assert again.code == 0, again.err
    # What was asked and not done is said (the count alone read as done).
    assert again.out.count("exists") == 3 and (
        "reservations: exists (3 partitions, not the 12 asked: an existing topic keeps its "
        "partitions, as adding some moves keys to others; add them with Kafka's own tools, "
        "between sales)" in again.out), again.out  # fmt: skip
    assert "dead-letter: exists (1 partition)\n" in again.out
    same = cli("kafka", "init", "--partitions", "3")
    assert "reservations: exists (3 partitions)\n" in same.out, same.out
    for flag, value in (("--partitions", "0"), ("--replication-factor", "x")):
        bad = cli("kafka", "init", flag, value)
        assert bad.code == 2 and flag.lstrip("-") in bad.err and bad.err.count("\n") == 1


async def test_the_lag_of_a_topic_made_after_the_reader_started_is_read(stack: Settings) -> None:
    """A lag reader started before its topic existed (a fresh deployment: the services start
    side by side, and the first to need the topics makes them) reads the topic's lag as soon
    as it has messages, not after the client's next scheduled metadata refresh."""
    name = f"lag{uuid.uuid4().hex[:8]}"
    settings = replace(stack, topics=Topics(name, name + "-e", name + "-d"))
    reader = LagReader(settings, f"{name}-group")
    try:
        assert await reader.read(name) == 0  # no such topic yet: nothing to consume
        await ensure_topics(settings, partitions=3)
        out = producer(settings, linger_ms=0)
        await out.start()
        try:  # one message a batch: tansu's end offset is its last batch's start + 1
            for i in range(7):
                await out.send_and_wait(name, key=b"k%d" % i, value=b"v")
        finally:
            await out.stop()
        assert await reader.read(name) == 7
    finally:
        await reader.aclose()
        await delete_topics(settings, settings.topics.all())


async def test_a_broker_without_the_engines_topics_is_not_ready(stack: Settings) -> None:
    """A broker that answers and lacks a topic of the engine (one whose storage was lost with
    a restart, or that does not make topics on first use) had every reservation's event
    refused while the probe, a metadata request, said ready."""
    name = f"probe{uuid.uuid4().hex[:8]}"
    settings = replace(stack, topics=Topics(name, name + "-e", name + "-d"))
    probe = KafkaProbe(settings)
    try:
        said = await check(probe.ping)
        assert said is not None and name in said and "flashsale kafka init" in said, said
        await ensure_topics(settings)
        assert await check(probe.ping) is None
    finally:
        await probe.aclose()
        await delete_topics(settings, settings.topics.all())


async def test_a_lag_reader_that_cannot_reach_the_broker_leaves_no_client_behind(
    stack: Settings,
) -> None:
    """The audit and the reconciler's every pass read the lag; with the broker down, each
    reading left a started client behind ("Unclosed AIOKafkaConsumer" in the log)."""
    settings = replace(stack, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    said: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, c: said.append(c["message"]))
    reader = LagReader(settings, "nobody")
    for _ in range(2):
        with pytest.raises(Unavailable, match="cannot read consumer lag"):
            await reader.read("reservations")
    gc.collect()
    await asyncio.sleep(0)
    assert not [m for m in said if "Unclosed" in m], said
