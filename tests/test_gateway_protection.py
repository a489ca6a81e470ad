"""Every bad input gets the right 4xx, changes nothing and is counted by reason; rate limits,
the in-flight cap and the slow-body deadline, over HTTP against the real stack."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from redis.asyncio import RedisCluster

from allocator.pump import AdmissionPump
from allocator.queue_scripts import QueueScripts
from flashsale.cli.devstack.processes import free_port
from flashsale.keys import SaleKeys, SkuKeys
from flashsale.ops_endpoints import Readiness, ops_app, serve_ops
from flashsale.settings import Rate, Settings
from flashsale.tokens import Signer
from gateway.metrics import Metrics
from gateway.middleware import Budgets, edge
from gateway.state import CLIENTS, COUNTERS
from tests.harness import Gateway, auth, gateway, live_gateway

GOOD = {"sku": "SKU-1", "quantity": 1, "payment_token": "tok_ok"}


@pytest.fixture
async def gw(stack: Settings) -> AsyncIterator[Gateway]:
    async with gateway(stack) as harness:
        yield harness


async def _admitted(gw: Gateway, sale: str, buyer: str) -> str:
    _, joined = await gw.join(sale, buyer)
    return str((await gw.admitted(sale, joined["ticket"]))["admission_token"])


async def test_bad_reservation_inputs_are_refused_and_change_nothing(gw: Gateway) -> None:
    sale = await gw.create_sale(stock=3, limit=2)
    other_sale = await gw.create_sale(stock=3)
    gw.pump(sale)
    gw.pump(other_sale)
    admission = await _admitted(gw, sale, "alice")
    bobs = await _admitted(gw, sale, "bob")
    elsewhere = await _admitted(gw, other_sale, "alice")
    own = Signer.from_setting(gw.settings.secret.reveal(), "admission")
    expired = own.sign({"s": sale, "sub": "alice", "p": 1, "d": 0}, ttl_s=-1)
    stranger = Signer(["f" * 32], "admission")
    forged = stranger.sign({"s": sale, "sub": "alice", "p": 1, "d": 9 * 10**12}, 60)
    forged_buyer = Signer(["x" * 32], "buyer").sign({"sub": "alice"}, 60)
    ticket_kind = Signer.from_setting(gw.settings.secret.reveal(), "ticket").sign(
        {"s": sale, "sub": "alice", "p": 1}, 60
    )
    tampered = admission[:-3] + ("AAA" if not admission.endswith("AAA") else "BBB")

    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("malformed json", {"raw": b"{nope"}, 422, "malformed_json"),
        ("body over 16 KiB", {"raw": b'{"sku": "' + b"x" * 20_000 + b'"}'}, 413,
         "body_too_large"),
        ("not an object", {"raw": b"[1]"}, 422, "invalid_input"),
        ("unknown field", {"body": {**GOOD, "coupon": "x"}}, 422, "unknown_field"),
        ("misspelled field", {"body": {**GOOD, "quantiy": 1}}, 422, "unknown_field"),
        ("quantity zero", {"body": {**GOOD, "quantity": 0}}, 422, "invalid_quantity"),
        ("quantity over limit", {"body": {**GOOD, "quantity": 3}}, 422, "invalid_quantity"),
        ("quantity as text", {"body": {**GOOD, "quantity": "1"}}, 422, "invalid_quantity"),
        ("quantity as bool", {"body": {**GOOD, "quantity": True}}, 422, "invalid_quantity"),
        ("quantity fraction", {"body": {**GOOD, "quantity": 1.5}}, 422, "invalid_quantity"),
        # the JSON parser reads an integer past 64 bits as a float (1e+23)
        ("quantity of 24 digits", {"raw": b'{"sku": "SKU-1", "quantity": 1' + b"0" * 23
                                   + b', "payment_token": "tok"}'}, 422, "invalid_quantity"),
        ("sku wrong type", {"body": {**GOOD, "sku": 7}}, 422, "invalid_input"),
        ("unknown sku", {"body": {**GOOD, "sku": "NOPE"}}, 404, "unknown_sku"),
        ("no payment token", {"body": {"sku": "SKU-1", "quantity": 1}}, 422, "invalid_input"),
        ("no idempotency key", {"no_key": True}, 422, "invalid_input"),
        ("empty idempotency key", {"headers": {"Idempotency-Key": ""}}, 422, "invalid_input"),
        ("bad idempotency key", {"headers": {"Idempotency-Key": "a b"}}, 422, "invalid_input"),
        ("no admission", {"admission": None}, 403, "not_admitted"),
        ("tampered admission", {"admission": tampered}, 403, "admission_invalid"),
        ("forged admission", {"admission": forged}, 403, "admission_invalid"),
        ("expired admission", {"admission": expired}, 403, "admission_expired"),
        ("ticket as admission", {"admission": ticket_kind}, 403, "admission_invalid"),
        ("other buyer's admission", {"admission": bobs}, 403, "admission_other_buyer"),
        ("other sale's admission", {"admission": elsewhere}, 403, "admission_other_sale"),
        ("no buyer token", {"no_auth": True}, 401, "missing_token"),
        ("buyer token forged", {"buyer_token": forged_buyer}, 401, "invalid_token"),
        ("admin token as buyer", {"buyer_token": gw.settings.admin_token.current()}, 401,
         "invalid_token"),
        ("unknown sale", {"sale": "no-such-sale"}, 404, "unknown_sale"),
    ]  # fmt: skip
    said: dict[str, str] = {}
    for name, case, status, code in cases:
        headers = {
            "Authorization": f"Bearer {case.get('buyer_token', gw.token('alice'))}",
            "Idempotency-Key": "key-1",
        }
        if case.get("no_auth"):
            del headers["Authorization"]
        if case.get("no_key"):
            del headers["Idempotency-Key"]
        chosen = case.get("admission", admission)
        if chosen is not None:
            headers["X-Admission-Token"] = chosen
        headers.update(case.get("headers", {}))
        target = case.get("sale", sale)
        if "raw" in case:
            response = await gw.http.post(
                f"/v1/sales/{target}/reservations", data=case["raw"],
                headers={**headers, "Content-Type": "application/json"},
            )  # fmt: skip
        else:
            response = await gw.http.post(
                f"/v1/sales/{target}/reservations", json=case.get("body", GOOD), headers=headers
            )
        body = await response.json()
        assert (response.status, body["error"]["code"]) == (status, code), name
        said[name] = body["error"]["message"]
    # A value given and refused is not "required", and is named as sent.
    key_rule = "1..100 of A-Z a-z 0-9 . _ : -"
    assert {name: said[name] for name in (
        "quantity as text", "quantity fraction", "quantity as bool", "quantity of 24 digits",
        "quantity over limit", "sku wrong type",
        "no idempotency key", "empty idempotency key", "bad idempotency key",
        "no payment token", "unknown field", "misspelled field")} == {
        "quantity as text": "quantity: must be an integer, got '1'",
        "quantity fraction": "quantity: must be an integer, got 1.5",
        "quantity of 24 digits": "quantity: must be between 1 and the per-buyer limit 2, got "
                                 "1e+23",
        "quantity over limit": "quantity: must be between 1 and the per-buyer limit 2, got 3",
        "quantity as bool": "quantity: must be an integer, got true",
        "sku wrong type": "sku: must be a SKU id of this sale, got 7",
        "no idempotency key": f"Idempotency-Key: required header: {key_rule}",
        "empty idempotency key": f"Idempotency-Key: is empty: give {key_rule}",
        "bad idempotency key": f"Idempotency-Key: must be {key_rule}, got 'a b'",
        "no payment token": "payment_token: required: printable text of 1..200",
        "unknown field": "coupon: unknown field; the fields are payment_token, quantity, sku",
        "misspelled field": "quantiy: unknown field (did you mean quantity?); the fields are "
                            "payment_token, quantity, sku",
    }  # fmt: skip

    # Nothing was written: stock untouched, the admission never claimed.
    stock = await gw.app[CLIENTS].redis.hmget(SkuKeys(sale, "SKU-1").stock, "available", "active")
    assert [int(v) for v in stock] == [3, 0]
    assert await gw.app[CLIENTS].redis.zcard(SaleKeys(sale).claims) == 0
    # ... and the admission is still good for a real request.
    assert (await gw.reserve(sale, "alice", admission))[0] == 201

    metrics = await (await gw.http.get("/metrics")).text()
    for _, _, _, code in cases:
        assert f'flashsale_gateway_rejections_total{{reason="{code}"}}' in metrics, code


async def test_a_join_before_the_preload_reads_the_sale_row_not_its_skus(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A join the waiting room cannot take (not preloaded yet, or being restored) looks the
    sale up in Postgres to say which. It read the sale with all its SKUs: early joiners of a
    catalogue sale made each join a read of thousands of rows."""
    unloaded = await gw.create_sale(stock=3, preload=False)
    reads: list[str] = []

    async def counted(_conn: Any, sale_id: str) -> list[Any]:
        reads.append(sale_id)
        return []

    monkeypatch.setattr("allocator.sale_reads.fetch_skus", counted)
    for _ in range(3):
        not_open = await gw.http.post(f"/v1/sales/{unloaded}/queue", headers=auth(gw.token("a")))
        assert not_open.status == 409, await not_open.text()
        assert (await not_open.json())["error"]["code"] == "sale_not_open"
    missing = await gw.http.post("/v1/sales/no-such-sale/queue", headers=auth(gw.token("a")))
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "unknown_sale"
    assert reads == []


async def test_bad_queue_inputs(gw: Gateway) -> None:
    sale = await gw.create_sale(stock=3)
    other = await gw.create_sale(stock=3)
    _, joined = await gw.join(sale, "alice")
    ticket = joined["ticket"]
    assert (await gw.http.post(f"/v1/sales/{sale}/queue")).status == 401
    missing = await gw.http.post("/v1/sales/no-such-sale/queue", headers=auth(gw.token("a")))
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "unknown_sale"
    bad_id = await gw.http.post("/v1/sales/bad%20id/queue", headers=auth(gw.token("a")))
    assert bad_id.status == 404
    unloaded = await gw.create_sale(stock=3, preload=False)
    not_open = await gw.http.post(f"/v1/sales/{unloaded}/queue", headers=auth(gw.token("a")))
    assert not_open.status == 409 and (await not_open.json())["error"]["code"] == "sale_not_open"
    # Open, it was "not open for queueing yet", as one whose start is to come.
    said = (await not_open.json())["error"]["message"]
    assert (
        said == f"sale {unloaded} is open but its waiting room is not ready yet (it was "
        "not preloaded); retry shortly"
    ), said
    later = await gw.create_sale(stock=3, preload=False, starts_in=1800)
    early = await gw.http.post(f"/v1/sales/{later}/queue", headers=auth(gw.token("a")))
    said = (await early.json())["error"]["message"]
    assert said == f"sale {later} is not open for queueing yet", said

    for headers, status, code in (
        ({}, 401, "invalid_token"),
        ({"X-Queue-Ticket": ticket[:-2] + "xx"}, 401, "invalid_token"),
        ({"X-Queue-Ticket": gw.token("alice")}, 401, "invalid_token"),  # a buyer token
    ):
        response = await gw.http.get(f"/v1/sales/{sale}/queue/status", headers=headers)
        assert response.status == status and (await response.json())["error"]["code"] == code
    wrong_sale = await gw.http.get(
        f"/v1/sales/{other}/queue/status", headers={"X-Queue-Ticket": ticket}
    )
    assert wrong_sale.status == 403
    assert (await wrong_sale.json())["error"]["code"] == "ticket_other_sale"
    assert await gw.app[CLIENTS].redis.hlen(SaleKeys(other).members) == 0


async def test_a_header_sent_empty_or_of_another_scheme_is_said_as_such(gw: Gateway) -> None:
    """Every one of these said "missing …" or "… is required": a storefront whose variable was
    empty, or that sent Basic credentials, looked for a header it had sent."""
    sale = await gw.create_sale(stock=3)
    join, status = f"/v1/sales/{sale}/queue", f"/v1/sales/{sale}/queue/status"
    reserve = f"/v1/sales/{sale}/reservations"
    buyer = {**auth(gw.token("alice")), "Idempotency-Key": "k-1"}
    said = {}
    for name, method, path, headers in (
        ("no token", "POST", join, {}),
        ("empty token", "POST", join, {"Authorization": "Bearer "}),
        ("basic", "POST", join, {"Authorization": "Basic YWxpY2U6c2VjcmV0"}),
        ("bare", "POST", join, {"Authorization": "s3cr3t-t0ken"}),
        ("odd", "POST", join, {"Authorization": "s3cr3t t0ken"}),
        ("no ticket", "GET", status, {}),
        ("empty ticket", "GET", status, {"X-Queue-Ticket": ""}),
        ("no admission", "POST", reserve, buyer),
        ("empty admission", "POST", reserve, {**buyer, "X-Admission-Token": " "}),
    ):
        response = await gw.http.request(method, path, headers=headers, json={})
        body = await response.json()
        said[name] = (response.status, body["error"]["code"], body["error"]["message"])
    assert said == {
        "no token": (401, "missing_token", "missing bearer token"),
        "empty token": (401, "missing_token", "the bearer token is empty"),
        "basic": (401, "missing_token",
                  "Authorization must be 'Bearer <token>', got the Basic scheme"),
        "bare": (401, "missing_token",  # a token is not echoed: it may be a secret
                 "Authorization must be 'Bearer <token>': the word Bearer is missing"),
        "odd": (401, "missing_token",
                "Authorization must be 'Bearer <token>', got another scheme"),
        "no ticket": (401, "invalid_token", "missing X-Queue-Ticket header"),
        "empty ticket": (401, "invalid_token",
                         "the X-Queue-Ticket header is empty: send the ticket of the join"),
        "no admission": (403, "not_admitted",
                         "an X-Admission-Token is required: wait for admission"),
        "empty admission": (403, "not_admitted", "the X-Admission-Token header is empty: "
                            "send the admission_token of the admitted status answer"),
    }, said  # fmt: skip


async def test_rate_limits_are_429_with_retry_after(stack: Settings) -> None:
    async with gateway(stack, rate_per_buyer=Rate(1.0, 2)) as gw:
        sale = await gw.create_sale(stock=3)
        codes = [(await gw.join(sale, "eager"))[0] for _ in range(3)]
        assert codes == [200, 200, 429]
        response = await gw.http.post(f"/v1/sales/{sale}/queue", headers=auth(gw.token("eager")))
        assert response.status == 429
        assert (await response.json())["error"]["code"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 2
        assert (await gw.join(sale, "patient"))[0] == 200  # per buyer: others are not affected
        await asyncio.sleep(1.1)
        assert (await gw.join(sale, "eager"))[0] == 200  # the limit refills


async def _commands(redis: Any) -> dict[str, int]:
    """Commands the Redis server (every primary of a cluster) has run, by name, those run
    inside scripts included."""
    if isinstance(redis, RedisCluster):
        per_node = await redis.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
        stats_of = list(per_node.values())
    else:
        stats_of = [await redis.info("commandstats")]
    counts: dict[str, int] = {}
    for stats in stats_of:
        for k, v in stats.items():
            name = k.removeprefix("cmdstat_")
            counts[name] = counts.get(name, 0) + v["calls"]
    return counts


# What the servers run on their own or for this measure: INFO itself, a replica's
# acknowledgements, health pings.
HOUSEKEEPING = frozenset({"info", "replconf", "ping"})


def _ran(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The commands run between two :func:`_commands` readings, housekeeping left out."""
    return {k: after[k] - before.get(k, 0) for k in after
            if after[k] != before.get(k, 0) and k not in HOUSEKEEPING}  # fmt: skip


async def test_a_join_is_one_redis_call_counted_against_its_rate_limits(
    stack: Settings,
) -> None:
    """On a single Redis node the join script counts the per-IP and per-buyer limits itself:
    one round trip per join (on a cluster the rate keys live in other slots: one call per
    limit first)."""
    async with gateway(stack, rate_per_ip=Rate(100.0, 50), rate_per_buyer=Rate(1.0, 1)) as gw:
        sale = await gw.create_sale(stock=3)
        c = gw.app[CLIENTS]
        assert (await gw.join(sale, "warm"))[0] == 200  # the counters and the script cache
        before = await _commands(c.redis)
        code, joined = await gw.join(sale, "ann")
        after = await _commands(c.redis)
        assert code == 200, joined
        ran = _ran(before, after)
        calls = 3 if stack.redis_cluster else 1  # each limit and the join, or the join alone
        assert ran.pop("evalsha") == calls, ran
        # What the join script runs inside, and the counters' read (at most every 100 ms)
        # should it fall in between.
        assert set(ran) <= {"hmget", "hexists", "time", "get", "set", "hset", "hincrby",
                            "zrangebyscore", "eval"}, ran  # fmt: skip
        code, refused = await gw.join(sale, "ann")  # over her burst of 1
        assert code == 429 and refused["error"]["code"] == "rate_limited"
        assert (await gw.join(sale, "bea"))[0] == 200


async def test_a_reserve_is_one_redis_call_counted_against_the_buyers_rate_limit(
    stack: Settings,
) -> None:
    """On a single Redis node the rate limits, the admission claim, the decision and the hold
    are one script call (on a cluster the rate limits and the claim go first); the hold is
    never read back; the reserve shares the buyer's limit with the join."""
    async with gateway(stack, rate_per_buyer=Rate(1.0, 2)) as gw:
        sale = await gw.create_sale(stock=3)
        c = gw.app[CLIENTS]
        pump = AdmissionPump(QueueScripts(c.redis), c.pool, sale, ["SKU-1"], "test")
        tickets = {}
        for buyer in ("bob", "alice"):  # alice's join: the first of her burst of 2
            code, joined = await gw.join(sale, buyer)
            assert code == 200
            tickets[buyer] = joined["ticket"]
        for _ in range(20):
            await pump.tick()
            await asyncio.sleep(0.02)
        bobs = (await gw.admitted(sale, tickets["bob"]))["admission_token"]
        admission = (await gw.admitted(sale, tickets["alice"]))["admission_token"]
        code, _ = await gw.reserve(sale, "bob", bobs)  # warms the catalog and the script cache
        assert code == 201
        before = await _commands(c.redis)
        code, reserved = await gw.reserve(sale, "alice", admission)
        after = await _commands(c.redis)
        assert code == 201, reserved
        ran = _ran(before, after)
        # One script call (a script cannot call EVALSHA, so each one is a round trip of its
        # own); the rest is what that script ran inside, and no read of the hold (HGET)
        # after it.
        limits = sum(r.enabled for r in (gw.settings.rate_per_ip, gw.settings.rate_per_buyer))
        calls = limits + 2 if stack.redis_cluster else 1  # each limit, the claim, the reserve
        assert ran.pop("evalsha") == calls, ran
        # lua/claim.lua reads the queue (HEXISTS, one HGET); reading the hold back would be
        # one HGET more.
        claim_reads = {"hexists": 1, "hget": 1} if stack.redis_cluster else {}
        for command, count in claim_reads.items():
            assert ran.pop(command) == count, ran
        assert set(ran) <= {"hmget", "time", "zrangebyscore", "get", "set", "zadd", "hset",
                            "xadd"}, ran  # fmt: skip
        code, limited = await gw.reserve(sale, "alice", admission)  # a replay, over the limit
        assert code == 429 and limited["error"]["code"] == "rate_limited"


async def test_a_spoofed_forwarded_address_buys_no_fresh_rate_limit(stack: Settings) -> None:
    """Behind a proxy that appends the address it saw (nginx, an ALB), the client writes the
    left of X-Forwarded-For: a fresh made-up first hop on every request must not give it a
    fresh per-IP bucket. The address is the rightmost one the trusted proxy added."""
    async with gateway(stack, rate_per_ip=Rate(1.0, 1), trust_forwarded=True) as gw:
        sale = await gw.create_sale(stock=3)
        codes = []
        for i in range(3):
            forwarded = {"X-Forwarded-For": f"203.0.113.{i + 1}, 198.51.100.7"}
            response = await gw.http.post(
                f"/v1/sales/{sale}/queue", headers={**auth(gw.token(f"b{i}")), **forwarded}
            )
            codes.append(response.status)
        assert codes == [200, 429, 429]
        other = {"X-Forwarded-For": "198.51.100.8"}  # another client behind the same proxy
        response = await gw.http.post(
            f"/v1/sales/{sale}/queue", headers={**auth(gw.token("b9")), **other}
        )
        assert response.status == 200


async def test_a_forwarded_line_of_the_clients_own_buys_no_fresh_rate_limit(
    stack: Settings,
) -> None:
    """A proxy may add its X-Forwarded-For as a header line of its own after the client's
    (HAProxy's ``option forwardfor`` does): the lines are one list in their order (RFC 9110
    5.3), so the address the proxy saw is still the rightmost, not the client's first line."""
    async with gateway(stack, rate_per_ip=Rate(1.0, 1), trust_forwarded=True) as gw:
        sale = await gw.create_sale(stock=3)
        codes = []
        for i in range(3):
            headers = CIMultiDict(auth(gw.token(f"b{i}")))
            headers.add("X-Forwarded-For", f"203.0.113.{i + 1}")  # the client's own line
            headers.add("X-Forwarded-For", "198.51.100.17")  # the proxy's
            response = await gw.http.post(f"/v1/sales/{sale}/queue", headers=headers)
            codes.append(response.status)
        assert codes == [200, 429, 429]


@pytest.mark.parametrize(
    "buyer", ["nul\x00byte", "tab\tinside", "", "x" * 129, "séance", "two words"]
)
async def test_a_buyer_id_that_is_not_an_id_is_refused_at_the_edge(gw: Gateway, buyer: str) -> None:
    """The storefront signs whatever ``sub`` it likes: one that could not be stored as it is
    (a NUL byte is a Postgres error later) is a 401 with its own code, and nothing is queued."""
    sale = await gw.create_sale(stock=3)
    token = Signer.from_setting(gw.settings.buyer_token_secret.reveal(), "buyer").sign(
        {"sub": buyer}, 60
    )
    response = await gw.http.post(f"/v1/sales/{sale}/queue", headers=auth(token))
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_buyer_id"
    assert await gw.app[CLIENTS].redis.hlen(SaleKeys(sale).members) == 0


async def test_slow_bodies_time_out_and_the_in_flight_cap_sheds_load(stack: Settings) -> None:
    async with gateway(stack, max_in_flight=1, body_timeout_s=1.0) as gw:
        sale = await gw.create_sale(stock=3)
        server = gw.http.server
        reader, writer = await asyncio.open_connection(server.host, server.port)
        # A request that promises 100 bytes of body and sends one.
        writer.write(
            f"POST /admin/v1/sales HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            f"{gw.settings.admin_token.current()}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{".encode()
        )
        await writer.drain()
        began = time.monotonic()
        await asyncio.sleep(0.2)  # the slow request holds the only slot
        shed = await gw.http.get(f"/v1/sales/{sale}")
        assert shed.status == 503 and (await shed.json())["error"]["code"] == "overloaded"
        assert shed.headers["Retry-After"] == "1"
        assert (await gw.http.get("/healthz")).status == 200  # operators can still look
        head = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert head.split()[1] == b"408"
        assert 0.9 < time.monotonic() - began < 3
        assert (await gw.http.get(f"/v1/sales/{sale}")).status == 200  # the slot is free again
        metrics = await (await gw.http.get("/metrics")).text()
        assert 'flashsale_gateway_rejections_total{reason="body_timeout"}' in metrics
        assert 'flashsale_gateway_rejections_total{reason="overloaded"}' in metrics


async def test_under_a_spike_joins_are_shed_first_and_admitted_buyers_still_find_room() -> None:
    """The in-flight budgets by route class: joins beyond their ceiling, then polls beyond
    theirs, are 503 at once, while a reservation is served up to the total."""
    release = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    middleware = edge(Metrics(CollectorRegistry()), Budgets(4, 1, 2), lambda _r: None,
                      lambda _r, answer: answer)  # fmt: skip
    app = web.Application(middlewares=[middleware])
    app.router.add_post("/v1/sales/{sale}/queue", slow)
    app.router.add_get("/v1/sales/{sale}/queue/status", slow)
    app.router.add_post("/v1/sales/{sale}/reservations", slow)
    async with TestClient(TestServer(app)) as http:

        def send(method: str, path: str) -> asyncio.Task[Any]:
            return asyncio.ensure_future(http.request(method, f"/v1/sales/s1{path}"))

        held = [send("POST", "/queue"), send("GET", "/queue/status"),
                send("GET", "/queue/status")]  # fmt: skip
        await asyncio.sleep(0.2)
        # A request let through would wait for `release`: the timeout turns that into a failure.
        refused = [
            await asyncio.wait_for(http.post("/v1/sales/s1/queue"), 5),
            await asyncio.wait_for(http.get("/v1/sales/s1/queue/status"), 5),
        ]
        for response in refused:
            assert response.status == 503 and response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "overloaded"
        reserving = send("POST", "/reservations")  # the fourth slot: an admitted buyer's
        await asyncio.sleep(0.2)
        beyond = await asyncio.wait_for(http.post("/v1/sales/s1/reservations"), 5)
        assert beyond.status == 503  # the total
        release.set()
        assert [(await t).status for t in [*held, reserving]] == [200] * 4
        assert (await http.post("/v1/sales/s1/queue")).status == 200  # room again


async def test_a_sale_sold_out_for_good_answers_joins_without_asking_redis(stack: Settings) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=1)
        redis = gw.app[CLIENTS].redis
        info = await gw.http.get(f"/v1/sales/{sale}")  # the counters are read with it
        assert info.headers["Cache-Control"] == "public, max-age=1"  # it may still change
        # What the pump writes once no unit is left, available or held.
        await redis.hset(SaleKeys(sale).queue, "sold_out", 1)
        await asyncio.sleep(0.2)  # the summary's read of the counters is due again
        code, first = await gw.join(sale, "late-0")  # reads the counters, and Redis says so
        assert code == 200 and first["state"] == "sold_out"
        gw.app[COUNTERS].refresh_s = 5.0  # that read of the counters serves the test
        before = await _commands(redis)
        answers = [await gw.join(sale, f"late-{i}") for i in range(1, 20)]
        after = await _commands(redis)
        assert all(a == (200, {"ticket": None, "position": None, "state": "sold_out"})
                   for a in answers), answers  # fmt: skip
        assert _ran(before, after) == {}  # not one command for 19 joins
        info = await gw.http.get(f"/v1/sales/{sale}")
        assert info.headers["Cache-Control"] == "public, max-age=30"  # a CDN may keep it


def _raw_exchange(base_url: str, request: bytes) -> tuple[int, str, bytes]:
    """Send ``request`` as it is on a new connection: the status, content type and body."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


@pytest.mark.parametrize(
    "request_bytes",
    [  # a header past aiohttp's 8190 bytes (a bloated cookie), a header no parser reads, and
        # a URL past the same limit
        b"GET /v1/sales/s HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 9000 + b"\r\n\r\n",
        b"GET /v1/sales/s HTTP/1.1\r\nHost: x\r\nNo Colon Here\r\n\r\n",
        b"GET /v1/sales/s?sku=" + b"S" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["long-header", "broken-header", "long-url"],
)
def test_a_request_http_cannot_parse_is_answered_in_json_and_logged_without_alarm(
    stack: Settings, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp answered a request its parser refused in plain text ("Got more than 8190
    bytes when reading: b'…'"), which a storefront's JSON client cannot read, and logged it
    as an ERROR with a traceback: one per malformed request, from anyone."""
    with live_gateway(stack) as gw:
        status, kind, body = _raw_exchange(gw.base_url, request_bytes)
    assert (status, kind) == (400, "application/json"), body
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["message"].startswith("malformed HTTP"), error
    assert b"ccccc" not in body and b"SSSSS" not in body  # the request is not echoed
    alarms = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not alarms, [r.getMessage() for r in alarms]


async def test_answers_do_not_name_the_servers_software_and_pages_are_not_framed_elsewhere(
    stack: Settings,
) -> None:
    """Every answer said ``Server: Python/3.11 aiohttp/3.14.5`` (what a scanner looks up
    known flaws by), and neither the waiting room nor the operators' page said who may frame
    it: another site could show either under its own, inviting a click on "Leave the queue"
    or "End"."""
    async with gateway(stack, cors_origins=("https://shop.example",)) as gw:
        sale = await gw.create_sale()
        answers = {
            "page": await gw.http.get(f"/sales/{sale}"),
            "console": await gw.http.get("/admin/"),
            "summary": await gw.http.get(f"/v1/sales/{sale}"),
            "refusal": await gw.http.get("/v1/sales/nope"),
            "probe": await gw.http.get("/livez"),
        }
        for name, answer in answers.items():
            assert answer.headers["Server"] == "flashsale", (name, answer.headers["Server"])
            # No answer is to be read as another type than it says (a scanner's first flag).
            assert answer.headers["X-Content-Type-Options"] == "nosniff", name
        page_csp = answers["page"].headers["Content-Security-Policy"]
        assert "frame-ancestors 'self' https://shop.example" in page_csp  # a storefront may
        assert "frame-ancestors 'none'" in answers["console"].headers["Content-Security-Policy"]
    with live_gateway(stack) as live:  # refused by aiohttp's parser, before the application
        host, port = live.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nNo Colon Here\r\n\r\n")
            head = conn.recv(65536).split(b"\r\n\r\n")[0].decode()
        assert "\r\nServer: flashsale\r\n" in head, head
        assert "\r\nX-Content-Type-Options: nosniff\r\n" in head, head
    registry = CollectorRegistry()  # and the other services' ops ports
    ops = TestClient(TestServer(ops_app(Readiness({}, registry=registry), registry)))
    await ops.start_server()
    try:
        for path in ("/livez", "/readyz", "/metrics", "/nope"):
            answer = await ops.get(path)
            assert answer.headers["Server"] == "flashsale", path
            assert answer.headers["X-Content-Type-Options"] == "nosniff", path
        for path in ("/", "/nope"):  # was "404: Not Found", as text
            answer = await ops.get(path)
            error = (await answer.json())["error"]
            assert (answer.status, error["code"]) == (404, "not_found"), path
            assert error["message"] == (
                f"nothing at {path}: this address serves the probes /livez, /readyz (also "
                "/healthz) and /metrics"
            ), error
    finally:
        await ops.close()


async def test_the_ops_ports_answer_a_request_http_cannot_parse_in_json_too() -> None:
    """The allocator's, workers' and reconciler's ops ports (probes and /metrics) answered as
    aiohttp does: plain text, and an ERROR with a traceback for each such request."""
    port = free_port()
    registry = CollectorRegistry()
    runner = await serve_ops("127.0.0.1", port, {}, registry)
    try:
        status, kind, body = await asyncio.to_thread(
            _raw_exchange, f"http://127.0.0.1:{port}",
            b"GET /livez HTTP/1.1\r\nHost: x\r\nNo Colon Here\r\n\r\n",
        )  # fmt: skip
    finally:
        await runner.cleanup()
    assert (status, kind) == (400, "application/json"), body
    assert json.loads(body)["error"]["code"] == "bad_request"
