"""The reservations listener: gateway processes that serve only admitted buyers' reservations,
named to buyers by the ``reserve_url`` of an admitted status answer."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from flashsale.errors import ConfigError
from flashsale.event_loop import LoopThread
from flashsale.settings import Secret, Settings
from gateway.app import create_app
from gateway.state import LANE
from tests.harness import ADMIN, TOPICS, Gateway, auth, gateway


@pytest.fixture
async def listener(stack: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """A reservations-only gateway on the test stack, as `flashsale gateway
    --reservations-only` serves it (the lane installed)."""
    settings = dataclasses.replace(stack, topics=TOPICS, admin_token=Secret(ADMIN))
    app = create_app(settings, reservations_only=True)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    assert client.server.runner is not None and client.server.runner.server is not None
    app[LANE].install(client.server.runner.server)
    try:
        yield client
    finally:
        await client.close()


def _origin(client: TestClient[Any, Any]) -> str:
    return f"http://{client.server.host}:{client.server.port}"


async def _admitted(gw: Gateway, buyer: str) -> tuple[str, dict[str, Any]]:
    sale = await gw.create_sale(stock=2)
    gw.pump(sale)
    code, joined = await gw.join(sale, buyer)
    assert code == 200, joined
    return sale, await gw.admitted(sale, joined["ticket"])


async def test_an_admitted_buyer_reserves_at_the_listener_the_status_answer_names(
    stack: Settings, listener: TestClient[Any, Any]
) -> None:
    async with gateway(stack, reservations_url=_origin(listener)) as gw:
        sale, status = await _admitted(gw, "alice")
        url = status["reserve_url"]
        assert url == f"{_origin(listener)}/v1/sales/{sale}/reservations"
        headers = {**auth(gw.token("alice")), "Idempotency-Key": "k1",
                   "X-Admission-Token": status["admission_token"]}  # fmt: skip
        body = {"sku": "SKU-1", "quantity": 1, "payment_token": "tok_ok"}
        answer = await listener.post(url.removeprefix(_origin(listener)), json=body,
                                     headers=headers)  # fmt: skip
        reserved = await answer.json()
        assert answer.status == 201 and reserved["state"] == "ACTIVE", reserved
        # Either listener answers a retry the same: one reservation, one decision in Redis.
        replay = await gw.reserve(sale, "alice", status["admission_token"])
        assert replay == (201, reserved)
        # The buyer's own reservation can be read and cancelled there too.
        rid = reserved["reservation_id"]
        mine = await listener.get(f"/v1/reservations/{rid}", headers=auth(gw.token("alice")))
        assert mine.status == 200 and (await mine.json())["state"] == "ACTIVE"
        gone = await listener.delete(f"/v1/reservations/{rid}", headers=auth(gw.token("alice")))
        assert gone.status == 200 and (await gone.json())["state"] == "RELEASED"


async def test_the_listener_announces_on_its_own_loop_without_a_hop_to_a_thread(
    stack: Settings, listener: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's loop serves no joins or polls, so its producer shares that loop: the
    hop to a thread and back cost each reservation about 55 us of CPU there (that the 201
    still waits for the broker: tests/test_durable_ack.py)."""
    hops = 0
    call = LoopThread.call

    async def counted(self: LoopThread, coro: Coroutine[Any, Any, Any]) -> Any:
        nonlocal hops
        hops += 1
        return await call(self, coro)

    monkeypatch.setattr(LoopThread, "call", counted)
    async with gateway(stack, reservations_url=_origin(listener)) as gw:
        sale, status = await _admitted(gw, "dora")
        hops = 0
        answer = await listener.post(
            f"/v1/sales/{sale}/reservations",
            headers={**auth(gw.token("dora")), "Idempotency-Key": "k1",
                     "X-Admission-Token": status["admission_token"]},
            json={"sku": "SKU-1", "quantity": 1, "payment_token": "tok_ok"},
        )  # fmt: skip
        assert answer.status == 201, await answer.text()
        assert hops == 0
        # The gateway itself, whose loop serves the waiting room, still hands over.
        elsewhere, other = await _admitted(gw, "erin")
        code, _ = await gw.reserve(elsewhere, "erin", other["admission_token"])
        assert code == 201 and hops > 0


async def test_the_listener_serves_nothing_of_the_waiting_room(
    stack: Settings, listener: TestClient[Any, Any]
) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale()
        buyer = auth(gw.token("bob"))
        for method, path in (("POST", f"/v1/sales/{sale}/queue"),
                             ("GET", f"/v1/sales/{sale}/queue/status"),
                             ("GET", f"/v1/sales/{sale}"), ("GET", "/openapi.json"),
                             ("POST", "/admin/v1/sales")):  # fmt: skip
            answer = await listener.request(method, path, headers={**buyer, **auth(ADMIN)}
                                            if path.startswith("/admin") else buyer)  # fmt: skip
            assert answer.status == 404, (method, path)
            error = (await answer.json())["error"]
            assert error["code"] == "not_found" and "reservations only" in error["message"]
        # The probes answer: the listener is checked and scraped like any gateway process.
        for path in ("/healthz", "/livez", "/metrics"):
            assert (await listener.get(path)).status == 200, path
        # A reservation there is judged as anywhere: no admission, no reservation.
        refused = await listener.post(f"/v1/sales/{sale}/reservations", headers={
            **buyer, "Idempotency-Key": "k1"}, json={"sku": "SKU-1", "quantity": 1,
                                                      "payment_token": "tok_ok"})  # fmt: skip
        assert refused.status == 403, await refused.text()


async def test_without_a_listener_the_status_answer_names_none(stack: Settings) -> None:
    async with gateway(stack) as gw:
        _, status = await _admitted(gw, "carol")
        assert status["admission_token"] and "reserve_url" not in status


async def test_the_page_may_call_the_listener_and_no_other_origin(stack: Settings) -> None:
    async with gateway(stack, reservations_url="https://reserve.example") as gw:
        sale = await gw.create_sale()
        page = await gw.http.get(f"/sales/{sale}")
        assert "connect-src 'self' https://reserve.example" in page.headers[
            "Content-Security-Policy"]  # fmt: skip
    async with gateway(stack) as gw:
        sale = await gw.create_sale()
        page = await gw.http.get(f"/sales/{sale}")
        assert "connect-src" not in page.headers["Content-Security-Policy"]


@pytest.mark.parametrize("value", ["reserve.example", "http://reserve.example/desk",
                                   "ftp://reserve.example", "http://"])  # fmt: skip
def test_a_listener_url_that_is_not_an_origin_is_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError, match="FLASHSALE_RESERVATIONS_URL"):
        Settings.from_env({"FLASHSALE_RESERVATIONS_URL": value, "FLASHSALE_HOME": "/nonexistent"})


def test_a_listener_url_is_kept_without_its_trailing_slash() -> None:
    settings = Settings.from_env({"FLASHSALE_RESERVATIONS_URL": "https://reserve.example:8443/",
                                  "FLASHSALE_HOME": "/nonexistent"})  # fmt: skip
    assert settings.reservations_url == "https://reserve.example:8443"
