"""The payment provider client, its circuit breaker and the simulator's Stripe-like rules,
over real HTTP (the simulator served on loopback)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flashsale.cli.devstack.processes import free_port
from flashsale.errors import PaymentConflict, PaymentUnknown, ProviderDown
from flashsale.payments import Charge, ChargeRequest, CircuitBreaker, HttpProvider
from tests.conftest import Cli
from workers.payment_simulator import Knobs, Simulator


@pytest.fixture
async def psp() -> AsyncIterator[tuple[Simulator, str]]:
    simulator = Simulator(Knobs(hang_s=1.0))
    server = TestServer(simulator.app())
    await server.start_server()
    yield simulator, str(server.make_url("")).rstrip("/")
    await server.close()


async def test_same_key_same_charge_other_parameters_refused(psp: tuple[Simulator, str]) -> None:
    simulator, url = psp
    async with HttpProvider(url) as provider:
        first = await provider.charge("r-1", 1500, "EUR", "tok_visa")
        again = await provider.charge("r-1", 1500, "EUR", "tok_visa")
        assert first == again and first.status == "captured"
        with pytest.raises(PaymentConflict):
            await provider.charge("r-1", 9900, "EUR", "tok_visa")
        declined = await provider.charge("r-2", 1500, "EUR", "tok_decline_always")
        assert declined.status == "declined" and declined.decline_code == "card_declined"
        assert await provider.lookup("r-404") is None
        assert (await provider.lookup("r-1")) == first
        refunded = await provider.refund("r-1")
        assert refunded.status == "refunded" and (await provider.refund("r-1")) == refunded
    assert simulator.captures["r-1"] == 1 and simulator.refunds == 1


async def test_an_address_the_simulator_does_not_serve_names_those_it_does(
    psp: tuple[Simulator, str],
) -> None:
    """Its port answered "404: Not Found" as text; an ops port's message would name only the
    probes, and this one serves the charges too."""
    _, url = psp
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/charge") as answer:
        error = (await answer.json())["error"]
    assert (answer.status, error["code"]) == (404, "not_found")
    assert error["message"].startswith(
        "nothing at /v1/charge: this payment simulator serves "
        "/v1/charges (POST a charge; GET lists them)"
    ), error
    assert error["message"].endswith("/metrics"), error


async def test_unknown_outcomes_are_reported_never_guessed(psp: tuple[Simulator, str]) -> None:
    simulator, url = psp
    async with HttpProvider(url, timeout_s=0.3) as provider:
        with pytest.raises(PaymentUnknown):  # 500 before charging
            await provider.charge("r-e", 100, "EUR", "tok_error")
        assert "r-e" not in simulator.charges
        assert (await provider.charge("r-e", 100, "EUR", "tok_error")).status == "captured"
        with pytest.raises(PaymentUnknown):  # captured, but the answer comes too late
            await provider.charge("r-t", 100, "EUR", "tok_timeout")
        assert simulator.charges["r-t"]["status"] == "captured"
        assert (await provider.charge("r-t", 100, "EUR", "tok_timeout")).status == "captured"
    assert simulator.captures["r-t"] == 1


async def test_a_provider_nobody_answers_for_is_said_in_words() -> None:
    """The audit and the workers' logs quoted aiohttp's repr: "no definite answer
    (ClientConnectorError(ConnectionKey(host='127.0.0.1', port=1, is_ssl=False, ssl=True,
    proxy=None, proxy_auth=None, proxy_headers_hash=None, ...)))"."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with HttpProvider(url, timeout_s=2) as provider:
        with pytest.raises(PaymentUnknown) as refused:
            await provider.lookup("r-1")
    said = str(refused.value)
    assert said.startswith("GET /v1/charges/r-1: no definite answer (ClientConnectorError: "), said
    assert "ConnectionKey" not in said and "Cannot connect to host 127.0.0.1" in said, said


async def test_a_journaled_simulator_forgets_nothing_when_it_restarts(tmp_path: Path) -> None:
    """Killed and started again (as ``flashsale chaos`` does), the simulator still knows every
    charge: a retried key replays its charge, a refund stays refunded, the next id is new."""
    journal = tmp_path / "charges.jsonl"
    first = Simulator(Knobs(), journal=journal)
    server = TestServer(first.app())
    await server.start_server()
    async with HttpProvider(str(server.make_url("")).rstrip("/")) as provider:
        kept = await provider.charge("j-1", 1500, "EUR", "tok_visa")
        await provider.charge("j-2", 1500, "EUR", "tok_visa")
        await provider.refund("j-2")
        await provider.charge("j-3", 1500, "EUR", "tok_decline")
    await server.close()
    first.close()  # every line was flushed as it was written: as good as killed here
    with journal.open("ab") as torn:
        torn.write(b'{"key": "j-4", "par')  # a line cut short by the kill
    again = Simulator(Knobs(), journal=journal)
    server = TestServer(again.app())
    await server.start_server()
    try:
        async with HttpProvider(str(server.make_url("")).rstrip("/")) as provider:
            assert await provider.charge("j-1", 1500, "EUR", "tok_visa") == kept
            with pytest.raises(PaymentConflict):
                await provider.charge("j-1", 999, "EUR", "tok_visa")
            assert (await provider.lookup("j-2")).status == "refunded"  # type: ignore[union-attr]
            assert (await provider.lookup("j-3")).status == "declined"  # type: ignore[union-attr]
            fresh = await provider.charge("j-5", 100, "EUR", "tok_visa")
            assert fresh.provider_ref != kept.provider_ref and fresh.status == "captured"
        assert again.captures == {"j-1": 1, "j-2": 1, "j-5": 1} and again.refunds == 1
    finally:
        await server.close()
        again.close()


async def test_knobs_change_while_it_runs(psp: tuple[Simulator, str]) -> None:
    _simulator, url = psp
    async with HttpProvider(url) as provider, aiohttp.ClientSession() as session:
        changed = await session.put(f"{url}/v1/knobs", json={"error_rate": 1})
        assert changed.status == 200 and (await changed.json())["error_rate"] == 1
        with pytest.raises(PaymentUnknown):
            await provider.charge("k-1", 100, "EUR", "tok_visa")
        bad_knobs: list[object] = [{"error_rate": 2}, {"seed": 1}, {"latency_ms": -1},
                                   {"nope": 1}, []]  # fmt: skip
        for bad in bad_knobs:
            async with session.put(f"{url}/v1/knobs", json=bad) as refused:
                assert refused.status == 400, bad
                assert (await refused.json())["error"]["code"] == "invalid_request"
        async with session.put(f"{url}/v1/knobs", json={"error_rate": 0}) as calm:
            assert calm.status == 200
        assert (await provider.charge("k-1", 100, "EUR", "tok_visa")).status == "captured"


async def test_batch_route_answers_item_by_item(psp: tuple[Simulator, str]) -> None:
    simulator, url = psp
    async with HttpProvider(url, batch_size=2) as provider:
        await provider.charge("b-0", 100, "EUR", "tok_visa")
        answers = await provider.charge_many([
            ChargeRequest("b-0", 999, "EUR", "tok_visa"),  # same key, other amount
            ChargeRequest("b-1", 100, "EUR", "tok_visa"),
            ChargeRequest("b-2", 100, "EUR", "tok_decline"),
            ChargeRequest("b-3", 100, "EUR", "tok_error"),
            ChargeRequest("b-1", 100, "EUR", "tok_visa"),  # a repeat in the same call
        ])  # fmt: skip
    assert isinstance(answers[0], PaymentConflict)
    assert isinstance(answers[1], Charge) and answers[1].status == "captured"
    assert isinstance(answers[2], Charge) and answers[2].status == "declined"
    assert isinstance(answers[3], PaymentUnknown)
    assert answers[4] == answers[1]
    assert simulator.captures["b-1"] == 1


async def test_a_provider_without_the_batch_route_is_called_per_charge() -> None:
    simulator = Simulator(Knobs())
    plain = web.Application()
    plain.router.add_post("/v1/charges", simulator.charge)  # no /v1/charges/batch
    server = TestServer(plain)
    await server.start_server()
    try:
        async with HttpProvider(str(server.make_url("")).rstrip("/")) as provider:
            answers = await provider.charge_many([ChargeRequest(f"p-{i}", 100, "EUR", "tok")
                                                  for i in range(3)])  # fmt: skip
            assert all(isinstance(a, Charge) and a.status == "captured" for a in answers)
            assert provider.batch is False
    finally:
        await server.close()


async def test_breaker_fails_fast_while_the_provider_is_down() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown_s=0.2)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with HttpProvider(url, timeout_s=0.5, breaker=breaker) as provider:
        for _ in range(3):
            with pytest.raises(PaymentUnknown) as caught:
                await provider.charge("r", 1, "EUR", "tok")
            assert not isinstance(caught.value, ProviderDown)
        assert breaker.state == "open"
        with pytest.raises(ProviderDown):
            await provider.charge("r", 1, "EUR", "tok")
        await asyncio.sleep(0.25)
        assert breaker.state == "half_open"
        with pytest.raises(PaymentUnknown):  # the one trial call, still failing
            await provider.charge("r", 1, "EUR", "tok")
        assert breaker.state == "open"


def test_breaker_closes_after_a_successful_trial() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=0.0)
    breaker.failed()
    assert breaker.state == "half_open"
    breaker.before()  # the trial
    with pytest.raises(ProviderDown):
        breaker.before()  # only one trial at a time
    breaker.succeeded()
    assert breaker.state == "closed"
    breaker.before()


def test_psp_and_workers_refuse_bad_options(run_cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    for flag, value in (("--decline-rate", "2"), ("--latency-ms", "-1"), ("--port", "0")):
        result = run_cli("psp", flag, value)
        assert result.code == 2, result
        assert result.err.startswith(f"flashsale: error: {flag}:"), result.err
    monkeypatch.delenv("FLASHSALE_PSP_URL", raising=False)
    result = run_cli("workers", "--concurrency", "0")
    assert result.code == 2 and "concurrency" in result.err
    result = run_cli("bench", "pipeline", "--latencies", "fast")
    assert result.code == 2 and "latencies" in result.err


async def test_charges_are_listed_by_prefix_page_by_page(tmp_path: Path) -> None:
    """Listing a sale's charges reads that sale's only (keys "<sale>~<sku>~r-..."), in the
    order they were made, page by page after a cursor; a prefix without "~" still works, and
    so does all of it after the simulator started again from its journal."""
    journal = tmp_path / "charges.jsonl"
    first = Simulator(Knobs(), journal=journal)
    server = TestServer(first.app())
    await server.start_server()
    keys = [f"{sale}~S~r-{i}" for i in range(7) for sale in ("s1", "s2", "s10")]
    async with HttpProvider(str(server.make_url("")).rstrip("/")) as provider:
        for key in [*keys, "plain"]:
            await provider.charge(key, 100, "EUR", "tok_visa")
    await server.close()
    first.close()
    again = Simulator(Knobs(), journal=journal)
    server = TestServer(again.app())
    await server.start_server()
    try:
        async with HttpProvider(str(server.make_url("")).rstrip("/")) as provider:
            for prefix in ("s1~", "s1~S~r-", "s1", ""):
                expected = [k for k in [*keys, "plain"] if k.startswith(prefix)]
                listed, after, pages = [], None, 0
                while True:
                    page, more = await provider.list_charges(prefix, after, limit=3)
                    listed += [c.key for c in page]
                    pages += 1
                    if not more:
                        break
                    after = page[-1].key
                assert listed == expected, prefix
                assert pages == max(1, -(-len(expected) // 3)), prefix
            assert await provider.list_charges("s3~") == ([], False)
            assert await provider.list_charges("s1~", "s10~S~r-6") == ([], False)
    finally:
        await server.close()
        again.close()


@asynccontextmanager
async def serving(simulator: Simulator) -> AsyncIterator[HttpProvider]:
    """The simulator on loopback, and a provider client talking to it; closed on the way out
    (every journal line was flushed as it was written: as good as a kill)."""
    server = TestServer(simulator.app())
    await server.start_server()
    try:
        async with HttpProvider(str(server.make_url("")).rstrip("/")) as provider:
            yield provider
    finally:
        await server.close()
        simulator.close()


async def test_a_charge_made_after_a_torn_line_survives_the_next_restart(tmp_path: Path) -> None:
    """A kill mid-write leaves a line cut short. The charge made after the restart must not be
    glued to it: a third start still knows it (a forgotten capture would be charged again)."""
    journal = tmp_path / "charges.jsonl"
    async with serving(Simulator(Knobs(), journal=journal)) as provider:
        await provider.charge("t-1", 1500, "EUR", "tok_visa")
    with journal.open("ab") as torn:
        torn.write(b'{"key": "t-2", "par')
    async with serving(Simulator(Knobs(), journal=journal)) as provider:
        made = await provider.charge("t-3", 700, "EUR", "tok_visa")
    third = Simulator(Knobs(), journal=journal)
    third.close()
    assert set(third.charges) == {"t-1", "t-3"}
    assert third.charges["t-3"]["id"] == made.provider_ref
    assert third.captures == {"t-1": 1, "t-3": 1}


async def test_the_journal_forgets_charges_older_than_it_keeps_and_ids_stay_new(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At start, charges made more than ``keep_days`` ago are dropped and the journal is
    rewritten with one line per charge kept; charge ids go on from the highest ever made, and
    a journal with nothing to drop is left as it is."""
    journal = tmp_path / "charges.jsonl"
    async with serving(Simulator(Knobs(), journal=journal)) as provider:
        for key in ("old-1", "old-2", "new-1", "new-2"):
            await provider.charge(key, 100, "EUR", "tok_visa")
        await provider.refund("new-2")
    lines = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
    assert len(lines) == 5
    for line in lines:
        if line["key"].startswith("old"):
            line["at"] = time.time() - 8 * 86400
        if line["key"] == "new-1":
            del line["at"]  # a journal written before entries had a time: as old as the file
    journal.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))

    with caplog.at_level(logging.INFO, "flashsale.psp"):
        second = Simulator(Knobs(), journal=journal, keep_days=7)
    assert "2 charges kept, 2 older than 7 days forgotten" in caplog.text
    assert set(second.charges) == {"new-1", "new-2"} and second.refunds == 1
    assert second.charges["new-2"]["status"] == "refunded"
    assert second.captures == {"new-1": 1, "new-2": 1}
    async with serving(second) as provider:
        fresh = await provider.charge("next", 100, "EUR", "tok_visa")
    assert fresh.provider_ref == "ch_00000005"  # not ch_00000003 again: old-* had 1 and 2
    kept = journal.read_bytes()
    assert len(kept.splitlines()) == 4  # the id floor, new-1, new-2 as refunded, next

    async with serving(Simulator(Knobs(), journal=journal, keep_days=7)) as provider:
        assert (await provider.lookup("new-1")) is not None
        assert (await provider.lookup("old-1")) is None
        assert journal.read_bytes() == kept  # nothing to drop: not rewritten
        assert (await provider.charge("later", 1, "EUR", "tok_visa")).provider_ref \
            == "ch_00000006"  # fmt: skip


def test_the_simulators_knobs_read_as_words() -> None:
    """`flashsale psp` and `flashsale up` said "(Knobs(latency_ms=0.0, jitter_ms=0.0, ...))",
    a Python repr, on the line that announces the simulator."""
    said = str(Knobs(latency_ms=40, jitter_ms=10, decline_rate=0.1, seed=7))
    assert said == (
        "latency 40 ms ± 10 ms, 10% declined, 0% failing with 5xx, 0% answered "
        "after a timeout (30 s late), seed 7"
    ), said


async def test_a_provider_answering_a_redirect_is_not_followed() -> None:
    """A provider URL that redirects (http:// to https://, a moved path) was followed: a 301
    turned a charge's POST into a GET, whose answer was read as the charge's, and the
    error said "unexpected answer 405" or "unreadable provider answer". A redirect is now an
    unknown outcome naming where it points, and nothing is sent there."""
    followed: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/elsewhere" + request.path)

    async def elsewhere(request: web.Request) -> web.Response:
        followed.append(f"{request.method} {request.path}")
        return web.json_response({"data": [], "has_more": False})

    app = web.Application()
    app.router.add_route("*", "/elsewhere/{tail:.*}", elsewhere)
    app.router.add_route("*", "/v1/{tail:.*}", moved)
    server = TestServer(app)
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    try:
        async with HttpProvider(base) as provider:
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: provider.charge("k-1", 100, "EUR", "tok_visa"),
                lambda: provider.refund("k-1"),
                lambda: provider.lookup("k-1"),
                lambda: provider.list_charges("k-"),
            ]
            for call in calls:
                with pytest.raises(PaymentUnknown, match="answered 301, a redirect to ") as said:
                    await call()
                assert f"{base}/elsewhere/v1/charges" in str(said.value), said.value
            with pytest.raises(PaymentUnknown, match="answered 301"):  # as a 5xx: the batch's
                await provider.charge_many([ChargeRequest("k-2", 100, "EUR", "tok")])
        # A redirect is an answer: the circuit breaker's trial call that meets one closes it
        # (left half-open, it failed every later call fast until a restart).
        breaker = CircuitBreaker(threshold=1, cooldown_s=0.0)
        breaker.failed()
        async with HttpProvider(base, breaker=breaker) as provider:
            for _ in range(2):
                with pytest.raises(PaymentUnknown, match="answered 301"):
                    await provider.lookup("k-1")
        assert breaker.state == "closed"
    finally:
        await server.close()
    assert followed == []
