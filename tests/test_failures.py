"""What buyers and the pipeline get while a dependency fails: an outage is a 503 with
Retry-After at the edge and is waited out by the workers, never a 500, never a dead letter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.exceptions

from flashsale.orders import OrderStore
from flashsale.settings import Settings
from gateway.state import SALES
from tests.harness import Gateway, gateway
from tests.pipeline import pipeline


@pytest.fixture
async def gw(stack: Settings) -> AsyncIterator[Gateway]:
    async with gateway(stack) as harness:
        yield harness


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.InternalClientError("unexpected connection_lost() call"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_an_outage_is_a_503_with_retry_after(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    sale = await gw.create_sale(stock=3)

    async def down(_sale_id: str) -> None:
        raise error

    monkeypatch.setattr(gw.app[SALES], "status", down)
    response = await gw.http.get(f"/v1/sales/{sale}")
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert (await response.json())["error"]["code"] == "unavailable"


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_workers_wait_out_an_outage_and_park_nothing(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """The order insert fails four times with an outage (more than the three attempts a bad
    event gets): the batch waits, every order is confirmed, nothing reaches the dead letters."""
    left = {"failures": 4}
    create = OrderStore.create

    async def flaky(self: OrderStore, *args: Any, **kwargs: Any) -> Any:
        if left["failures"]:
            left["failures"] -= 1
            raise error
        return await create(self, *args, **kwargs)

    monkeypatch.setattr(OrderStore, "create", flaky)
    async with pipeline(stack) as p:
        sale = await p.sale(stock=10)
        ids = await p.reserve(sale, ["tok_visa"] * 3)
        workers = p.start_workers()
        states = await p.wait_terminal(ids)
        assert set(states.values()) == {"CONFIRMED"}
        assert left["failures"] == 0
        metrics = workers.service.metrics
        assert metrics.retries._value.get() >= 4
        dead = metrics.dead_letters.collect()
        assert sum(s.value for m in dead for s in m.samples if s.name.endswith("_total")) == 0
        await workers.drain()
