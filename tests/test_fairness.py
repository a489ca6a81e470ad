"""Provable fairness of the pre-queue: the Merkle tree and the check on their own, then a real
pre-queue shuffled by the pump, published by the gateway, proven per buyer and verified by
``flashsale fairness verify``, which fails on each kind of tampering."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from allocator import pump as pump_module
from flashsale import fairness
from flashsale.fairness import merkle_path, merkle_root, path_holds, problems
from flashsale.keys import SaleKeys
from flashsale.settings import Settings
from flashsale.shuffle import member_of, rank_members, seed_commitment
from gateway.state import CLIENTS
from tests.conftest import Cli
from tests.harness import Gateway, calls_to, gateway

SEED = "4f" * 32


def members(count: int) -> list[str]:
    return [member_of("sale-x", f"buyer-{i}") for i in range(count)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_every_position_has_a_path_and_no_other(size: int) -> None:
    leaves = members(size)
    root = merkle_root(leaves)
    for position, member in enumerate(leaves, start=1):
        path = merkle_path(leaves, position)
        assert path_holds(member, position, size, path, root)
        assert not path_holds(member, position % size + 1, size, path, root) or size == 1
        assert not path_holds(leaves[position % size], position, size, path, root) or size == 1
        assert not path_holds(member, position, size, [*path, path[0]] if path else ["00"], root)
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()


def test_the_check_finds_each_kind_of_tampering() -> None:
    ranked = rank_members(SEED, members(20))
    root, commitment = merkle_root(ranked), seed_commitment(SEED)
    assert problems(commitment, SEED, ranked, root, 20) == []
    swapped = [ranked[1], ranked[0], *ranked[2:]]
    assert any("not where the seed puts them" in p
               for p in problems(commitment, SEED, swapped, merkle_root(swapped)))  # fmt: skip
    replaced = [*ranked[:-1], member_of("sale-x", "intruder")]
    assert any("Merkle root" in p for p in problems(commitment, SEED, replaced, root))
    assert any("commitment" in p for p in problems(commitment, "5e" * 32, ranked, root))
    assert any("names 21 members" in p for p in problems(commitment, SEED, ranked, root, 21))
    assert problems(commitment, None, ranked, root) == [
        "the seed is not revealed yet (the sale has not started)"
    ]


@pytest.fixture
async def gw(stack: Settings) -> AsyncIterator[Gateway]:
    async with gateway(stack) as harness:
        yield harness


async def _shuffled(gw: Gateway, buyers: list[str]) -> tuple[str, dict[str, str]]:
    """A sale whose pre-queue of ``buyers`` was shuffled and recorded; their placed tickets."""
    sale = await gw.create_sale(stock=100, starts_in=1.5)
    tickets = {}
    for buyer in buyers:
        code, body = await gw.join(sale, buyer)
        assert code == 200 and body["pre_queue"] is True
        tickets[buyer] = body["ticket"]
    early = await gw.http.get(f"/v1/sales/{sale}/fairness")
    assert early.status == 200
    before = await early.json()
    assert (before["recorded"], before["seed"], before["members"]) == (False, None, [])
    proof = await gw.http.get(f"/v1/sales/{sale}/fairness/proof",
                              headers={"X-Queue-Ticket": tickets[buyers[0]]})  # fmt: skip
    assert proof.status == 404  # not drawn yet, and said when it will be
    assert "that happens at the opening" in (await proof.json())["error"]["message"]
    gw.pump(sale)
    for _ in range(200):
        doc = await (await gw.http.get(f"/v1/sales/{sale}/fairness")).json()
        if doc["recorded"]:
            break
        await asyncio.sleep(0.05)
    assert doc["recorded"] and doc["size"] == len(buyers), doc
    for buyer in buyers:  # the placed ticket the next poll hands out
        _, status = await gw.status(sale, tickets[buyer])
        tickets[buyer] = status.get("ticket", tickets[buyer])
    return sale, tickets


async def test_a_shuffled_pre_queue_is_published_and_proven_per_buyer(
    gw: Gateway, cli: Cli
) -> None:
    buyers = [f"early-{i}" for i in range(30)]
    sale, tickets = await _shuffled(gw, buyers)
    doc = await (await gw.http.get(f"/v1/sales/{sale}/fairness")).json()
    assert doc["commitment"] == seed_commitment(doc["seed"])
    assert problems(doc["commitment"], doc["seed"], doc["members"], doc["root"], doc["size"]) == []
    assert "early-0" not in str(doc)  # members are hashes, never buyer ids
    page = await (await gw.http.get(f"/v1/sales/{sale}/fairness?offset=10&limit=5")).json()
    assert page["members"] == doc["members"][10:15] and page["next_offset"] == 15
    for query in ("offset=%C2%B2", "limit=" + "9" * 5000):  # were a 500: int() refused them
        refused = await gw.http.get(f"/v1/sales/{sale}/fairness?{query}")
        assert refused.status == 422, query

    for buyer in buyers:
        answer = await gw.http.get(f"/v1/sales/{sale}/fairness/proof",
                                   headers={"X-Queue-Ticket": tickets[buyer]})  # fmt: skip
        assert answer.status == 200, await answer.text()
        proof = await answer.json()
        assert proof["member"] == member_of(sale, buyer)
        assert path_holds(proof["member"], proof["position"], proof["size"], proof["path"],
                          doc["root"])  # fmt: skip
        assert doc["members"][proof["position"] - 1] == proof["member"]
    unplaced = await gw.http.get(f"/v1/sales/{sale}/fairness/proof")
    assert unplaced.status == 401

    verified = await asyncio.to_thread(cli, "fairness", "verify", sale, "--buyer", "early-3",
                                       "--commitment", doc["commitment"])  # fmt: skip
    assert verified.code == 0, verified.out + verified.err
    assert "VERIFIED" in verified.out and "buyer early-3" in verified.out
    over_http = await asyncio.to_thread(cli, "fairness", "verify", sale, "--url",
                                        str(gw.http.make_url("")))  # fmt: skip
    assert over_http.code == 0 and "VERIFIED" in over_http.out, over_http.out + over_http.err
    other = await asyncio.to_thread(cli, "fairness", "verify", sale, "--commitment", "ab" * 32)
    assert other.code == 1 and "not the one given" in other.out

    # Right after the start a gateway is busy: its 503 and 429 are waited out, not a failure.
    async with busy_front(str(gw.http.make_url("")), [503, 429]) as (url, shed):
        busy = await asyncio.to_thread(cli, "fairness", "verify", sale, "--url", url)
    assert shed == [503, 429] and busy.code == 0, busy.out + busy.err
    assert "VERIFIED" in busy.out


async def test_verify_takes_the_address_of_the_sales_page(gw: Gateway, cli: Cli) -> None:
    """A buyer has the waiting room's address, http://HOST/sales/SALE: given as --url, it was
    told "unknown sale" of a sale the gateway serves (the record was asked for under the
    page's path), as was any address that is not a gateway's."""
    sale, _ = await _shuffled(gw, ["early-0", "early-1"])
    base = str(gw.http.make_url("")).rstrip("/")

    def verify(url: str) -> Any:
        return cli("fairness", "verify", sale, "--url", url)

    page = await asyncio.to_thread(verify, f"{base}/sales/{sale}")
    assert page.code == 0 and "VERIFIED" in page.out, page.out + page.err
    other = await asyncio.to_thread(verify, f"{base}/sales/sale-other")
    assert (other.code, other.err.strip()) == (
        2,
        f"flashsale: error: --url: is the page of 'sale-other', not of {sale}",
    ), other.err
    elsewhere = await asyncio.to_thread(verify, f"{base}/shop")
    assert (elsewhere.code, elsewhere.err.strip().splitlines()[-1]) == (
        1,
        (
            f"flashsale: error: {base}/shop answered 404 to /v1/sales/{sale}/fairness: give a "
            "flashsale gateway's address, http://HOST:PORT, or a sale's page on it"
        ),
    ), elsewhere.err


@contextlib.asynccontextmanager
async def busy_front(base: str, statuses: list[int]) -> AsyncIterator[tuple[str, list[int]]]:
    """An HTTP front to ``base`` answering its first requests with ``statuses`` (Retry-After
    0), then passing each request on: a gateway shedding load, as its middleware does."""
    shed: list[int] = []

    async def front(request: web.Request) -> web.Response:
        if len(shed) < len(statuses):
            shed.append(statuses[len(shed)])
            return web.json_response({"error": {"code": "overloaded", "message": "busy"}},
                                     status=shed[-1], headers={"Retry-After": "0"})  # fmt: skip
        async with ClientSession() as session, session.get(base.rstrip("/") + request.path_qs) as r:
            return web.Response(body=await r.read(), status=r.status,
                                content_type=r.content_type)  # fmt: skip

    app = web.Application()
    app.router.add_get("/{tail:.*}", front)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")), shed
    finally:
        await server.close()


async def test_verify_fails_on_a_tampered_list_order_or_seed(gw: Gateway, cli: Cli) -> None:
    sale, _ = await _shuffled(gw, [f"early-{i}" for i in range(12)])
    pool = gw.app[CLIENTS].pool

    async def verify() -> str:
        result = await asyncio.to_thread(cli, "fairness", "verify", sale)
        assert result.code == 1, result.out + result.err
        return result.out

    first = await pool.fetchval(
        "SELECT member FROM prequeue_members WHERE sale_id = $1 AND position = 1", sale
    )
    await pool.execute("UPDATE prequeue_members SET member = $2 WHERE sale_id = $1 AND "
                       "position = 1", sale, member_of(sale, "intruder"))  # fmt: skip
    assert "Merkle root" in await verify()
    await pool.execute("UPDATE prequeue_members SET member = $2 WHERE sale_id = $1 AND "
                       "position = 1", sale, first)  # fmt: skip

    await pool.execute(
        "UPDATE prequeue_members SET position = CASE position WHEN 1 THEN 2 ELSE 1 END + 1000"
        " WHERE sale_id = $1 AND position IN (1, 2)", sale)  # fmt: skip
    await pool.execute("UPDATE prequeue_members SET position = position - 1000 WHERE "
                       "sale_id = $1 AND position > 1000", sale)  # fmt: skip
    assert "not where the seed puts them" in await verify()
    await pool.execute(
        "UPDATE prequeue_members SET position = CASE position WHEN 1 THEN 2 ELSE 1 END + 1000"
        " WHERE sale_id = $1 AND position IN (1, 2)", sale)  # fmt: skip
    await pool.execute("UPDATE prequeue_members SET position = position - 1000 WHERE "
                       "sale_id = $1 AND position > 1000", sale)  # fmt: skip
    clean = await asyncio.to_thread(cli, "fairness", "verify", sale)
    assert clean.code == 0, clean.out

    await pool.execute("UPDATE sales SET shuffle_seed = $2 WHERE id = $1", sale, "5e" * 32)
    assert "does not match the commitment" in await verify()


async def test_a_sale_ended_before_it_opened_says_it_has_no_order(gw: Gateway, cli: Cli) -> None:
    """Ended before its start, a sale's pre-queue is never shuffled: verify says so once the
    start has passed, instead of "not shuffled yet", which would never change."""
    sale = await gw.create_sale(stock=10, starts_in=0.4)
    code, body = await gw.join(sale, "early-0")
    assert code == 200 and body["pre_queue"] is True
    ended = await asyncio.to_thread(cli, "sale", "end", sale)
    assert ended.code == 0, ended.out + ended.err
    await asyncio.sleep(0.6)  # past the start it never reached
    doc = await (await gw.http.get(f"/v1/sales/{sale}/fairness")).json()
    assert (doc["recorded"], doc["ended"]) == (False, True), doc
    proof = await gw.http.get(f"/v1/sales/{sale}/fairness/proof",
                              headers={"X-Queue-Ticket": body["ticket"]})  # fmt: skip
    assert proof.status == 404
    assert "ended before" in (await proof.json())["error"]["message"]
    for where in ([], ["--url", str(gw.http.make_url(""))]):
        result = await asyncio.to_thread(cli, "fairness", "verify", sale, *where)
        assert result.code == 1, result.out + result.err
        assert "ended before its pre-queue order was recorded" in result.err, result.err
        assert "not drawn and recorded yet" not in result.err


async def test_a_sale_open_but_never_preloaded_says_what_its_draw_waits_for(
    gw: Gateway, cli: Cli
) -> None:
    """Its opening past, verify said the draw "happens at the opening": it happens once the
    sale is preloaded."""
    sale = await gw.create_sale(stock=10, preload=False)
    result = await asyncio.to_thread(cli, "fairness", "verify", sale)
    assert result.code == 1, result.out + result.err
    assert "never preloaded" in result.err and "sale preload" in result.err, result.err
    assert "happens at the opening" not in result.err


async def test_a_pre_queue_redis_lost_before_its_order_was_recorded_says_so(
    gw: Gateway, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drawn, then lost by Redis before the record was written (here: Postgres refused the
    first write, and the restored room lacks the positions): the record can never be made.
    The sale said "not drawn and recorded yet", for good, to buyers and to verify."""
    real, refused = fairness.record, asyncio.Event()

    async def first_write_fails(*args: Any) -> str:
        if not refused.is_set():
            refused.set()
            raise ConnectionRefusedError("postgres is down")
        return await real(*args)

    monkeypatch.setattr(pump_module, "record", first_write_fails)
    sale = await gw.create_sale(stock=10, starts_in=0.5)
    tickets = [(await gw.join(sale, f"early-{i}"))[1]["ticket"] for i in range(4)]
    gw.pump(sale)
    await asyncio.wait_for(refused.wait(), 10)
    await gw.app[CLIENTS].redis.hdel(SaleKeys(sale).members, "early-0")
    for _ in range(100):
        doc = await (await gw.http.get(f"/v1/sales/{sale}/fairness")).json()
        if doc.get("lost"):
            break
        await asyncio.sleep(0.05)
    assert (doc["recorded"], doc.get("lost")) == (False, True), doc
    proof = await gw.http.get(f"/v1/sales/{sale}/fairness/proof",
                              headers={"X-Queue-Ticket": tickets[1]})  # fmt: skip
    assert proof.status == 404
    assert "lost" in (await proof.json())["error"]["message"]
    for where in ([], ["--url", str(gw.http.make_url(""))]):
        result = await asyncio.to_thread(cli, "fairness", "verify", sale, *where)
        assert result.code == 1, result.out + result.err
        assert "no order to verify" in result.err and "lost" in result.err, result.err


async def test_a_record_not_complete_yet_is_read_once_for_many_requests(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the draw the record is not complete, and each request read it from Postgres
    again: on a public route, every call of a crowd waiting for the opening was a query."""
    sale = await gw.create_sale(stock=10, starts_in=30)
    reads = calls_to(monkeypatch, "gateway.sale_info.published")
    path = f"/v1/sales/{sale}/fairness"
    together = await asyncio.gather(*(gw.http.get(path) for _ in range(50)))
    assert [a.status for a in together] == [200] * 50
    for _ in range(20):
        answer = await gw.http.get(path)
        assert answer.status == 200 and (await answer.json())["recorded"] is False
    assert len(reads) == 1


@pytest.mark.parametrize(
    "url",
    [
        "notaurl",
        "ftp://gw.example",
        "http://",
        "http://127.0.0.1:99999",
        "http://[::1",
        # numbers that are no IPv4 address: aiohttp refuses them when it connects
        "http://999.1.1.1:8080",
        "http://127.1:8080",
        "http://2130706433",
    ],
)
def test_verify_refuses_a_url_that_is_not_one_in_a_line(run_cli: Cli, url: str) -> None:
    """aiohttp's own exception reached the terminal as a traceback."""
    result = run_cli("fairness", "verify", "sale-x", "--url", url)
    assert result.code == 2, result
    assert result.err.strip() == (
        f"flashsale: error: --url: must be an http(s)://host[:port] URL, got '{url}'"
    ), result.err


def test_verify_at_a_gateway_that_does_not_answer_names_it(run_cli: Cli) -> None:
    """It said "a server is unavailable", leaving the operator to find which in the text."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the socket is closed
    result = run_cli("fairness", "verify", "sale-x", "--url", f"http://127.0.0.1:{port}")
    assert result.code == 1, result
    assert result.err.startswith(
        f"flashsale: error: the server at 127.0.0.1:{port} is unavailable: "
    ), result.err
