"""A Redis Cluster on loopback for the embedded stack, from the same ``redis-server`` binary:
N primaries (``--redis-cluster N``), each with R replicas (``--replicas R``).

Every node runs with ``cluster-enabled yes`` and keeps its own ``nodes.conf``, so a cluster
stopped by ``dev down`` forms again by itself on the next ``dev up`` (its nodes come back on
the ports they had). A new cluster is formed here as ``redis-cli --cluster create`` would:
``CLUSTER MEET`` every node, ``CLUSTER ADDSLOTS`` an even share of the 16,384 slots on each
primary, ``CLUSTER REPLICATE`` each replica to its primary, then wait for ``cluster_state:ok``
and every slot assigned on every node. ``cluster-require-full-coverage no``: while one
primary is down, the slots of the others keep serving.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from flashsale.cli.devstack.errors import StackError
from flashsale.cli.devstack.files import read_json, write_json

SLOTS = 16_384
# A node's cluster bus listens this far above its port (Redis 6; fixed, not configurable).
BUS_OFFSET = 10_000
# How long a node may stay silent before the others count it failed and promote its replica.
NODE_TIMEOUT_MS = 3_000


@dataclass(frozen=True)
class Layout:
    """How many primaries, and replicas of each: kept in ``<home>/redis-cluster.json``."""

    primaries: int
    replicas: int = 0

    @property
    def nodes(self) -> int:
        return self.primaries * (1 + self.replicas)

    def names(self) -> list[str]:
        """The servers' names in the stack: ``redis`` (the node REDIS_URL names), then
        ``redis-2`` and on; the first ``primaries`` are made primaries."""
        return ["redis"] + [f"redis-{i}" for i in range(2, self.nodes + 1)]

    @classmethod
    def load(cls, path: Path) -> Layout | None:
        return read_json(path, cls.parse)

    @classmethod
    def parse(cls, raw: Any) -> Layout:
        layout = cls(**raw)
        if not (isinstance(layout.primaries, int) and isinstance(layout.replicas, int)
                and layout.primaries >= 1 and layout.replicas >= 0):  # fmt: skip
            raise ValueError(f"not a layout: {raw}")
        return layout

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))


def node_config(port: int, data: Path, password: str) -> str:
    """The lines a cluster node adds to a single server's configuration."""
    return (
        "cluster-enabled yes\n"
        f"cluster-config-file {data / 'nodes.conf'}\n"
        f"cluster-node-timeout {NODE_TIMEOUT_MS}\n"
        "cluster-require-full-coverage no\n"
        f"masterauth {password}\n"
        f"cluster-announce-ip 127.0.0.1\ncluster-announce-port {port}\n"
    )


def configured_port(data: Path) -> int | None:
    """The port a node ran on before, from the configuration file in its data folder."""
    conf = data / "redis.conf"
    if not conf.is_file():
        return None
    for line in conf.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "port" and value.strip().isdigit():
            return int(value)
    return None


def _slot_ranges(primaries: int) -> list[range]:
    bounds = [round(i * SLOTS / primaries) for i in range(primaries + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(primaries)]


async def _node(port: int, password: str) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=port, password=password, decode_responses=True,
                          socket_timeout=5, socket_connect_timeout=2)  # fmt: skip


async def form(layout: Layout, ports: list[int], password: str, deadline: float) -> bool:
    """Make the running nodes on ``ports`` one cluster of ``layout`` unless they already are
    one; wait until every node says ``cluster_state:ok`` and knows every slot. True when it
    formed a new one."""
    clients = [await _node(port, password) for port in ports]
    try:
        first = clients[0]
        infos = [await c.cluster("INFO") for c in clients]
        formed = all(_field(info, "cluster_slots_assigned") == str(SLOTS) for info in infos)
        if not formed:
            if any(_field(info, "cluster_known_nodes") != "1" for info in infos):
                raise StackError(
                    "the embedded Redis Cluster is half formed (some nodes know each other but "
                    "not every slot is assigned); run `flashsale dev down --purge` to start "
                    "afresh"
                )
            for port in ports[1:]:
                await _cmd(first, "CLUSTER", "MEET", "127.0.0.1", port)
            await _until(deadline, "the nodes to meet",
                         lambda: _all_known(clients, len(ports)))  # fmt: skip
            for client, slots in zip(clients, _slot_ranges(layout.primaries), strict=False):
                await _cmd(client, "CLUSTER", "ADDSLOTS", *slots)
            ids = [await _cmd(c, "CLUSTER", "MYID") for c in clients]
            for i in range(layout.primaries, layout.nodes):
                primary = (i - layout.primaries) % layout.primaries
                await _until(deadline, "a replica to learn its primary",
                             lambda i=i, p=primary: _knows(clients[i], ids[p]))  # fmt: skip
                await _cmd(clients[i], "CLUSTER", "REPLICATE", ids[primary])
        await _until(deadline, "every node to know every slot", lambda: _all_ok(clients))
        return not formed
    finally:
        for client in clients:
            await client.aclose()


async def describe(port: int, password: str) -> str:
    """``primary, slots 0-5460`` or ``replica of 127.0.0.1:PORT``, as the node itself says."""
    client = await _node(port, password)
    try:
        for line in (await _cmd(client, "CLUSTER", "NODES")).splitlines():
            fields = line.split()
            if "myself" not in fields[2]:
                continue
            if "master" in fields[2]:
                slots = ",".join(fields[8:]) or "none"
                return f"primary, slots {slots}"
            primary = fields[3]
            for other in (await _cmd(client, "CLUSTER", "NODES")).splitlines():
                if other.startswith(primary):
                    return f"replica of {other.split()[1].split('@')[0]}"
            return "replica"
        return "not a cluster node"
    finally:
        await client.aclose()


async def _cmd(client: aioredis.Redis, *args: str | int) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _field(info: object, name: str) -> str:
    if isinstance(info, dict):
        return str(info.get(name, ""))
    for line in str(info).splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


async def _all_known(clients: list[aioredis.Redis], count: int) -> bool:
    infos = [await c.cluster("INFO") for c in clients]
    return all(_field(info, "cluster_known_nodes") == str(count) for info in infos)


async def _knows(client: aioredis.Redis, node_id: str) -> bool:
    return node_id in await _cmd(client, "CLUSTER", "NODES")


async def _all_ok(clients: list[aioredis.Redis]) -> bool:
    """Every node says ``cluster_state:ok`` and knows every slot assigned: with
    ``cluster-require-full-coverage no`` a node says ok before gossip told it another
    primary's slots, and a client reading the slot map from it found no node for them."""
    infos = [await c.cluster("INFO") for c in clients]
    return all(
        _field(info, "cluster_state") == "ok"
        and _field(info, "cluster_slots_assigned") == str(SLOTS)
        for info in infos
    )


async def _until(deadline: float, what: str, check: object) -> None:
    assert callable(check)
    while True:
        if await check():
            return
        if time.monotonic() >= deadline:
            raise StackError(f"the embedded Redis Cluster timed out waiting for {what}")
        await asyncio.sleep(0.1)
