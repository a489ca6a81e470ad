"""Redis Cluster paths on a real cluster (``FLASHSALE_TEST_REDIS_CLUSTER``, ``make test``'s
cluster step and ``make test-cluster``): packed commands grouped by node, redirections
(``MOVED``, ``ASK``) and ``NOSCRIPT`` met while a slot moves or a node forgot its scripts, and
a node that lost a sale's keys (as by ``FLUSHALL``) repaired by the reconciler until the audit
passes. Skipped on a single Redis server."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode

from allocator.queue_scripts import QueueScripts
from allocator.redis_calls import read_packed
from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.clients import pg_pool, redis_client
from flashsale.keys import SaleKeys, SkuKeys, bucket_keys
from flashsale.ops_endpoints import check, memory_used, ping_redis
from flashsale.outages import is_outage
from flashsale.queue_marks import QueueMarks
from flashsale.settings import Settings
from loadtest.processes import engine, wait_healthy
from tests.conftest import Cli
from tests.holds import make_sku, request
from tests.pipeline import SKU, drained, pipeline
from tests.test_reconcile import checked, goes_on

pytestmark = pytest.mark.cluster


@pytest.fixture
async def cluster(stack: Settings) -> AsyncIterator[aioredis.RedisCluster]:
    if not stack.redis_cluster:
        pytest.skip("needs a Redis Cluster (FLASHSALE_REDIS_CLUSTER=1): make test-cluster")
    client = redis_client(stack)
    assert isinstance(client, aioredis.RedisCluster)
    await client.initialize()
    yield client
    await client.aclose()


def node_of(client: aioredis.RedisCluster, key: str) -> ClusterNode:
    node = client.get_node_from_key(key)
    assert node is not None
    return node


async def lose_on(cluster: aioredis.RedisCluster, node: ClusterNode, keys: list[str]) -> None:
    """``node`` loses the ``keys`` it holds, as a FLUSHALL of it would: every key of the
    test's sale there (a FLUSHALL took every other sale's too, on a stack the tests share)."""
    for key in keys:
        if node_of(cluster, key).name == node.name:
            await cluster.delete(key)


async def test_packed_reads_are_grouped_by_node_and_answered_in_order(
    cluster: aioredis.RedisCluster,
) -> None:
    keys = [f"fs:{{test-packed:{i}}}:probe" for i in range(60)]
    nodes = {node_of(cluster, k).name for k in keys}
    assert len(nodes) >= 2, nodes  # the keys spread over the primaries
    for i, key in enumerate(keys):
        await cluster.set(key, i)
    try:
        replies = await read_packed(cluster, [("GET", k) for k in keys], chunk=7)
        assert [int(r) for r in replies] == list(range(60))
    finally:
        for key in keys:
            await cluster.delete(key)


async def _move_slot(
    client: aioredis.RedisCluster,
    slot: int,
    source: ClusterNode,
    target: ClusterNode,
    *,
    finish: bool,
) -> None:
    """Move ``slot`` as ``redis-cli --cluster reshard`` does; with ``finish=False`` leave it
    migrating after its keys moved (the source then answers ``ASK``)."""
    src, dst = direct(client, source), direct(client, target)
    try:
        src_id = await _cmd(src, "CLUSTER", "MYID")
        dst_id = await _cmd(dst, "CLUSTER", "MYID")
        await _cmd(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        await _cmd(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := await _cmd(src, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            password = _password(client)
            await _cmd(src, "MIGRATE", target.host, target.port, "", 0, 5000,
                                      "AUTH", password, "KEYS", *keys)  # fmt: skip
        if finish:
            for node in (dst, src):
                await _cmd(node, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    finally:
        await src.aclose()
        await dst.aclose()


def _password(client: aioredis.RedisCluster) -> str:
    return str(client.get_connection_kwargs()["password"])


def direct(client: aioredis.RedisCluster, node: ClusterNode) -> aioredis.Redis:
    """A plain client on one node of the cluster."""
    return aioredis.Redis(host=node.host, port=int(node.port), password=_password(client))


async def _cmd(client: aioredis.Redis, *args: str | int | bytes) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def test_moved_and_ask_answers_are_followed_by_packed_calls(
    cluster: aioredis.RedisCluster,
) -> None:
    sku = await make_sku(cluster, stock=10, limit=5)
    slot = cluster.keyslot(sku.keys.stock)
    source = node_of(cluster, sku.keys.stock)
    target = next(n for n in cluster.get_primaries() if n.name != source.name)
    [before] = await sku.scripts.reserve(sku.keys, [request("before")])
    try:
        # ASK: the slot is migrating and its keys already left; this client still sends to
        # the source, which redirects for this one command.
        await _move_slot(cluster, slot, source, target, finish=False)
        [asked] = await read_packed(cluster, [("HGET", sku.keys.stock, "available")])
        assert int(asked) == 9
        # A script is served by the side that holds all of its keys (they all moved here);
        # while they are split, Redis answers TRYAGAIN, and the caller has an outage (a
        # buyer: 503 with Retry-After). Never a wrong answer.
        try:
            [during] = await sku.scripts.reserve(sku.keys, [request("during")])
            assert during.outcome == "reserved", during
        except redis.exceptions.RedisError as exc:
            assert is_outage(exc), exc
        # MOVED: the slot now belongs to the target; the client learns it on the way.
        await _move_slot(cluster, slot, source, target, finish=True)
        assert node_of(cluster, sku.keys.stock).name == source.name  # still the stale map
        [moved] = await sku.scripts.reserve(sku.keys, [request("moved")])
        assert (before.outcome, moved.outcome) == ("reserved", "reserved"), moved
        [left, held] = await read_packed(cluster, [("HGET", sku.keys.stock, "available"),
                                                   ("HLEN", sku.keys.holds)])  # fmt: skip
        assert int(left) + int(held) == 10 and int(held) in (2, 3)
        assert node_of(cluster, sku.keys.stock).name == target.name  # learned from MOVED
    finally:
        if node_of(cluster, sku.keys.stock).name != source.name:
            await _move_slot(cluster, slot, target, source, finish=True)


def test_a_cluster_read_as_a_single_server_is_said_so(
    stack: Settings, cluster: aioredis.RedisCluster, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``REDIS_URL`` at a node of a cluster with ``FLASHSALE_REDIS_CLUSTER`` unset: the
    commands whose keys live on another node ended in a MovedError traceback (a 500 in a
    service), and the readiness probe's PING, answered by any node, said ready."""
    created = cli("sale", "create", "--name", "Kind", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    sale = created.out.strip()
    assert created.code == 0 and cli("sale", "preload", sale).code == 0
    node = node_of(cluster, SkuKeys(sale, "A").stock)
    others = [n for n in cluster.get_primaries() if n.name != node.name]
    monkeypatch.setenv("REDIS_URL", re.sub(r"@[^/]+/", f"@{others[0].name}/",
                                           stack.require_redis()))  # fmt: skip
    monkeypatch.setenv("FLASHSALE_REDIS_CLUSTER", "0")
    said = ("REDIS_URL leads to a node of a Redis Cluster, read as a single server: set "
            "FLASHSALE_REDIS_CLUSTER=1")  # fmt: skip
    result = cli("sale", "status", sale)
    assert (result.code, result.err) == (1, f"flashsale: error: {said}\n"), result
    probe = asyncio.run(_probe_redis(Settings.from_env()))
    assert probe == said, probe


def test_a_cluster_url_naming_another_database_is_one_line(
    stack: Settings, cluster: aioredis.RedisCluster, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster has database 0 alone: ``/1`` in REDIS_URL ended every command, ``sale list``
    included, in redis-py's RedisClusterException traceback."""
    monkeypatch.setenv("REDIS_URL", re.sub(r"/0$", "/1", stack.require_redis()))
    result = cli("sale", "list", "--limit", "1")
    assert (result.code, result.err) == (
        1,
        "flashsale: error: REDIS_URL: a Redis Cluster has database 0 alone, the URL names 1\n",
    ), result


def test_a_cluster_node_read_as_a_single_server_of_another_database_is_one_line(
    stack: Settings, cluster: aioredis.RedisCluster, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``REDIS_URL`` at a node with ``/1`` and ``FLASHSALE_REDIS_CLUSTER`` unset: the node
    refused the SELECT ("SELECT is not allowed in cluster mode"), which ended every command
    that read Redis in redis-py's traceback, where ``/99`` of a single server is one line."""
    created = cli("sale", "create", "--name", "Kind", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    monkeypatch.setenv("REDIS_URL", re.sub(r"/0$", "/1", stack.require_redis()))
    monkeypatch.setenv("FLASHSALE_REDIS_CLUSTER", "0")
    said = (
        "REDIS_URL leads to a node of a Redis Cluster, read as a single server: set "
        "FLASHSALE_REDIS_CLUSTER=1, and name database 0 (/0), a cluster's only one"
    )
    result = cli("sale", "status", created.out.strip())
    assert (result.code, result.err) == (1, f"flashsale: error: {said}\n"), result
    probe = asyncio.run(_probe_redis(Settings.from_env()))
    assert probe == said, probe


def test_a_cluster_refusing_the_login_says_so(
    stack: Settings, cluster: aioredis.RedisCluster, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster client wraps the refused login in "Redis Cluster cannot be connected"."""
    monkeypatch.setenv("REDIS_URL", re.sub(r":[^:@/]+@", ":wrong-password@", stack.require_redis()))
    created = cli("sale", "create", "--name", "Login", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    result = cli("sale", "status", created.out.strip())
    assert result.code == 1, result
    assert result.err.startswith("flashsale: error: Redis refused the login of REDIS_URL: "), (
        result.err)  # fmt: skip


async def test_a_cluster_user_not_allowed_cluster_slots_is_told_so(
    cluster: aioredis.RedisCluster, stack: Settings, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py takes any refusal of CLUSTER SLOTS for "cluster mode is not enabled": an ACL
    user without it was told to unset FLASHSALE_REDIS_CLUSTER, as if the server were single."""
    nodes = [direct(cluster, node) for node in cluster.get_nodes()]
    try:
        for node in nodes:
            await node.acl_setuser("slots-user", enabled=True, passwords=["+slots-password-0123"],
                                   keys=["*"], commands=["+@all", "-cluster"])  # fmt: skip
        create = ("sale", "create", "--name", "Slots", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
        created = await asyncio.to_thread(cli, *create)
        url = re.sub(r"//[^@]*@", "//slots-user:slots-password-0123@", stack.require_redis())
        monkeypatch.setenv("REDIS_URL", url)
        result = await asyncio.to_thread(cli, "sale", "status", created.out.strip())
        # Redis 6.2 names the command, 7 its subcommand: 'cluster|slots'
        said = ("Redis refused REDIS_URL's user: this user has no permissions to run the "
                "'cluster")  # fmt: skip
        assert (result.code, result.err.count("\n")) == (1, 1), result
        assert result.err.startswith(f"flashsale: error: {said}"), result.err
        probe = await _probe_redis(replace(stack, redis_url=url))
        assert probe is not None and probe.startswith(said), probe
    finally:
        for node in nodes:
            await node.acl_deluser("slots-user")
            await node.aclose()


async def _probe_redis(settings: Settings) -> str | None:
    client = redis_client(settings)
    try:
        return await check(lambda: ping_redis(client))
    finally:
        await client.aclose()


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru"])
async def test_a_full_node_makes_the_cluster_unready(
    cluster: aioredis.RedisCluster, stack: Settings, policy: str
) -> None:
    """One primary at its ``maxmemory`` refuses every write to the sales in its slots, while
    each node answers a PING: the probe names it. Under a volatile policy (a managed
    service's default) too: the engine's stock, holds and queues have no expiry to evict by,
    and the probe said ready while the node answered OOM. The node holds keys with an expiry
    (rate limits, leases), which such a policy evicts first, a slice at a time, taking writes
    meanwhile: the test expected the first write refused, and failed after a whole suite had
    left many such keys there."""
    node = cluster.get_primaries()[-1]
    one = direct(cluster, node)
    mine = [k for k in (f"fs:{{full-{i}}}:expiring" for i in range(120_000))
            if node_of(cluster, k).name == node.name]  # fmt: skip
    key = mine[0].replace(":expiring", ":stock")
    try:
        assert await _probe_redis(stack) is None
        async with one.pipeline(transaction=False) as expiring:
            for name in mine:
                expiring.set(name, "x" * 64, px=600_000)
            await expiring.execute()
        await one.config_set("maxmemory-policy", policy)
        await one.config_set("maxmemory", "1")
        for _ in range(200):  # each refused write evicts a slice of the keys with an expiry
            try:
                await one.hset(key, "probe", 1)
            except redis.exceptions.OutOfMemoryError:
                break
            assert policy != "noeviction", f"{node.name} took a write past its maxmemory"
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"{node.name} under {policy} still took writes at a maxmemory of 1")
        full = await _probe_redis(stack)
        assert full is not None and "full" in full and node.name in full, full
        assert (await memory_used(cluster))[node.name] >= 1  # what the alert before reads
    finally:
        await one.config_set("maxmemory", "0")
        await one.config_set("maxmemory-policy", "noeviction")
        async with one.pipeline(transaction=False) as made:  # a key a slot: one by one
            for name in [*mine, key]:
                made.unlink(name)
            await made.execute()
        await one.aclose()
    assert await _probe_redis(stack) is None


async def test_a_new_client_reads_the_memory_of_every_primary(
    cluster: aioredis.RedisCluster, stack: Settings
) -> None:
    """Asked before its first command, the cluster client knew only the node REDIS_URL names,
    and redis-py answers a command sent to one node unwrapped, not by node: the allocator
    logged an AttributeError traceback as it started (and a cluster of one primary, as a
    managed service's single shard, would never have been ready)."""
    primaries = [direct(cluster, node) for node in cluster.get_primaries()]
    client = redis_client(stack)
    try:
        for node in primaries:
            await node.config_set("maxmemory", str(8 << 30))
        used = await memory_used(client)
        assert set(used) == {n.name for n in cluster.get_primaries()}, used
        assert all(0 < share < 0.01 for share in used.values()), used
    finally:
        await client.aclose()
        for node in primaries:
            await node.config_set("maxmemory", "0")
            await node.aclose()


async def test_a_cluster_user_not_allowed_the_engines_scripts_is_not_ready(
    cluster: aioredis.RedisCluster, stack: Settings
) -> None:
    """As on a single server: the probe read each primary's memory and wrote nothing, so a
    user who may not run the engine's scripts was ready while every reservation was 503."""
    nodes = [direct(cluster, node) for node in cluster.get_nodes()]
    try:
        for node in nodes:
            await node.acl_setuser("noscript-user", enabled=True, keys=["*"],
                                   passwords=["+noscript-password-0123"],
                                   commands=["+@all", "-evalsha", "-eval"])  # fmt: skip
        url = re.sub(r"//[^@]*@", "//noscript-user:noscript-password-0123@", stack.require_redis())
        probe = await _probe_redis(replace(stack, redis_url=url))
        assert probe is not None and probe.startswith(
            "Redis refused REDIS_URL's user: this user has no permissions to run the 'evalsha'"
        ), probe
    finally:
        for node in nodes:
            await node.acl_deluser("noscript-user")
            await node.aclose()


async def test_a_cluster_user_not_allowed_info_is_ready_on_its_ping(
    cluster: aioredis.RedisCluster, stack: Settings
) -> None:
    """As on a single server: the memory is not read, rather than the probe failing for good."""
    nodes = [direct(cluster, node) for node in cluster.get_nodes()]
    try:
        for node in nodes:
            await node.acl_setuser("probe-user", enabled=True, passwords=["+probe-password-0123"],
                                   keys=["*"], commands=["+@all", "-info"])  # fmt: skip
        url = re.sub(r"//[^@]*@", "//probe-user:probe-password-0123@", stack.require_redis())
        assert await _probe_redis(replace(stack, redis_url=url)) is None
    finally:
        for node in nodes:
            await node.acl_deluser("probe-user")
            await node.aclose()


async def test_a_node_that_forgot_its_scripts_is_taught_again(
    cluster: aioredis.RedisCluster,
) -> None:
    sku = await make_sku(cluster, stock=10, limit=5)
    node = node_of(cluster, sku.keys.stock)
    one = direct(cluster, node)
    try:
        [first] = await sku.scripts.reserve(sku.keys, [request("before")])
        await one.script_flush()
        assert not (await one.script_exists(sku.scripts._reserve.sha))[0]
        [granted] = await sku.scripts.reserve(sku.keys, [request("after")])
        assert (first.outcome, granted.outcome) == ("reserved", "reserved")
        assert granted.reservation_id is not None
        await one.script_flush()
        [paying] = await sku.scripts.transition(
            "begin_payment", [(sku.keys, granted.reservation_id)]
        )
        assert paying.ok, paying
    finally:
        await one.aclose()


async def test_a_node_that_lost_a_sale_is_repaired_and_the_audit_passes(
    cluster: aioredis.RedisCluster, stack: Settings
) -> None:
    async with pipeline(stack) as p, checked(p) as (rec, psp):
        sale = await p.sale(stock=30, limit=1)
        ids = await p.reserve(sale, ["tok_visa"] * 10 + ["tok_decline"] * 2)
        workers = p.start_workers()
        await p.wait_terminal(ids)
        await drained(p)
        sku_node = node_of(cluster, SkuKeys(sale, SKU).stock)
        sale_node = node_of(cluster, SaleKeys(sale).queue)
        others = {n.name for n in cluster.get_primaries()} - {sku_node.name}
        assert others, "a cluster of one primary"
        marks = QueueMarks("gateway:test")  # what every gateway checkpoints each second
        marks.note(sale, (await QueueScripts(p.redis).view(SaleKeys(sale))).mark())
        await marks.flush(p.pool)

        await lose_on(cluster, sku_node, [*SaleKeys(sale).all(), *SkuKeys(sale, SKU).all()])
        assert await cluster.exists(SkuKeys(sale, SKU).stock) == 0
        survived = sale_node.name != sku_node.name
        assert (await cluster.exists(SaleKeys(sale).sale) == 1) is survived

        report = await rec.run_once([sale], wait_for_grace=True)
        kinds = {r.kind for r in report.repairs}
        assert "rebuild_sku" in kinds, report.json()
        assert (await p.counts(sale))["sold"] == 10
        assert await goes_on(p, rec, psp, sale, buyers=4) == 14
        await workers.drain()


async def test_a_spike_on_a_three_bucket_sku_sells_its_stock_and_survives_a_node_flush(
    cluster: aioredis.RedisCluster, stack: Settings, tmp_path: Path
) -> None:
    """3,000 buyers for 300 units of one SKU in 3 stock buckets, through the engine and a
    locust spike; then one bucket's node loses everything and the engine's own reconciler
    rebuilds it until the audit passes again."""
    port = free_ports(UP_PORTS)
    env = {**os.environ, "FLASHSALE_ADMIN_TOKEN": stack.admin_token.current(),
           "FLASHSALE_BUYER_TOKEN_SECRET": stack.buyer_token_secret.reveal()}  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    admin = {"Authorization": f"Bearer {stack.admin_token.current()}"}
    with engine(stack, port, tmp_path / "engine.log"):
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, f"{base}/healthz")
            spike = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "flashsale", "loadtest", "spike", "--host", base,
                "--buyers", "3000", "--stock", "300", "--buckets", "3", "--ramp", "4",
                "--hold", "2", "--out", str(tmp_path), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            raw, _ = await asyncio.wait_for(spike.communicate(), 400)
            out = raw.decode()
            assert spike.returncode == 0, out
            assert "buyers answered: 3000/3000" in out and "sold 300/300, oversold 0" in out, out
            assert "audit: PASSED" in out, out
            found = re.search(r"spike verdict for sale (\S+)", out)
            assert found, out
            sale = found.group(1)

            buckets = bucket_keys(sale, "SPIKE-1", 3)
            nodes = {node_of(cluster, k.stock).name for k in buckets}
            assert len(nodes) >= 2, nodes
            flushed = node_of(cluster, buckets[1].stock)
            await lose_on(
                cluster,
                flushed,
                [
                    *SaleKeys(sale).all(),
                    *(key for b in buckets for key in (*b.all(), b.transfers, b.received)),
                ],
            )
            assert await cluster.exists(buckets[1].stock) == 0
            deadline = asyncio.get_running_loop().time() + 90
            while True:  # the engine's reconciler passes every 5 s
                async with session.get(f"{base}/admin/v1/sales/{sale}/audit",
                                       headers=admin) as response:  # fmt: skip
                    audit = await response.json() if response.status == 200 else {}
                if audit.get("passed"):
                    break
                assert asyncio.get_running_loop().time() < deadline, audit
                await asyncio.sleep(1)
            async with session.get(f"{base}/admin/v1/sales/{sale}", headers=admin) as response:
                [sku] = (await response.json())["skus"]
            assert (sku["confirmed"], sku["sold"], sku["available"]) == (300, 300, 0), sku
    pool = await pg_pool(stack)
    try:
        rebuilt = await pool.fetch(
            "SELECT subject FROM reconcile_events WHERE sale_id = $1 AND kind = 'rebuild_sku'",
            sale,
        )  # fmt: skip
    finally:
        await pool.close()
    assert "bucket 1" in {r["subject"] for r in rebuilt}, rebuilt
