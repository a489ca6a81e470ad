"""The gateway's admin API, health and metrics, over HTTP against the real stack."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from flashsale.keys import SaleKeys
from flashsale.settings import Secret, Settings
from flashsale.tokens import Signer
from gateway.app import create_app
from gateway.state import CLIENTS, PROBES

ADMIN = "test-admin-token-0123456789"
SALE = {
    "name": "Gateway test drop",
    "skus": [{"sku": "SNK-1", "stock": 5, "price": 12000, "currency": "EUR", "per_buyer_limit": 2}],
}


@pytest.fixture
async def http(stack: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    settings = dataclasses.replace(stack, admin_token=Secret(ADMIN))
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client
    await client.close()


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_code(response: Any) -> str:
    body = await response.json()
    return str(body["error"]["code"])


async def test_admin_paths_need_the_admin_token_before_anything_else(
    http: TestClient[Any, Any],
) -> None:
    buyer = Signer(["b" * 32], "buyer").sign({"sub": "alice"}, ttl_s=60)
    for headers in ({}, auth("wrong"), auth(buyer), {"Authorization": f"Basic {ADMIN}"}):
        for method, path in (
            ("POST", "/admin/v1/sales"),
            ("GET", "/admin/v1/sales/nope"),
            ("GET", "/admin/v1/no/such/path"),  # unknown paths too
            ("DELETE", "/admin/v1/sales"),  # and wrong methods
            ("GET", "/admin"),
        ):
            response = await http.request(method, path, headers=headers, json=SALE)
            assert response.status == 401, (method, path, headers)
            assert await error_code(response) in ("unauthorized", "missing_token")


async def test_create_preload_stock_and_lifecycle(http: TestClient[Any, Any]) -> None:
    created = await http.post("/admin/v1/sales", json=SALE, headers=auth())
    assert created.status == 201
    sale_id = (await created.json())["id"]

    loaded = await http.post(f"/admin/v1/sales/{sale_id}/preload", headers=auth())
    assert loaded.status == 200
    [result] = (await loaded.json())["results"]
    assert (result["sku"], result["outcome"], result["available"]) == ("SNK-1", "loaded", 5)

    more = await http.post(
        f"/admin/v1/sales/{sale_id}/stock", json={"sku": "SNK-1", "add": 3}, headers=auth()
    )
    assert more.status == 200
    [row] = (await more.json())["skus"]
    assert (row["stock_total"], row["available"]) == (8, 8)

    public = await http.get(f"/v1/sales/{sale_id}")
    assert public.status == 200
    info = await public.json()
    assert info["skus"][0]["remaining"] == 8 and info["skus"][0]["sold_out"] is False

    for action, status in (("pause", "paused"), ("resume", "active"), ("end", "ended")):
        answer = await http.post(f"/admin/v1/sales/{sale_id}/{action}", headers=auth())
        assert answer.status == 200
        assert (await answer.json())["status"] == status
    again = await http.post(f"/admin/v1/sales/{sale_id}/resume", headers=auth())
    assert again.status == 409 and await error_code(again) == "sale_ended"
    final = await http.get(f"/admin/v1/sales/{sale_id}", headers=auth())
    assert (await final.json())["sale"]["status"] == "ended"


async def test_the_admission_rate_changes_while_the_sale_runs(http: TestClient[Any, Any]) -> None:
    app = http.app
    assert app is not None
    c = app[CLIENTS]
    sale_id = (await (await http.post("/admin/v1/sales", json=SALE, headers=auth())).json())["id"]
    path = f"/admin/v1/sales/{sale_id}"
    assert (await http.post(f"{path}/preload", headers=auth())).status == 200
    changed = await http.patch(path, json={"admission_rate": 40}, headers=auth())
    assert changed.status == 200 and (await changed.json())["admission_rate"] == 40
    # Postgres (the truth), then the sale hash the pump reads each step.
    assert await c.pool.fetchval("SELECT admission_rate FROM sales WHERE id = $1", sale_id) == 40
    assert await c.redis.hget(SaleKeys(sale_id).sale, "admission_rate") == b"40"
    for body, field in (({"admission_rate": 0}, "admission_rate"),
                        ({"admission_rate": "fast"}, "admission_rate"), ({}, "admission_rate"),
                        ({"admission_rate": 5, "name": "x"}, "name")):  # fmt: skip
        refused = await http.patch(path, json=body, headers=auth())
        assert refused.status == 422, body
        assert (await refused.json())["error"]["field"] == field
    assert await c.pool.fetchval("SELECT admission_rate FROM sales WHERE id = $1", sale_id) == 40
    missing = await http.patch("/admin/v1/sales/nope", json={"admission_rate": 5}, headers=auth())
    assert missing.status == 404
    await http.post(f"{path}/end", headers=auth())
    ended = await http.patch(path, json={"admission_rate": 5}, headers=auth())
    assert ended.status == 409 and await error_code(ended) == "sale_ended"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "malformed_json"),
        (b"[1, 2]", "invalid_input"),
        (b'{"name": ""}', "invalid_input"),
        (b'{"name": "x", "colour": "red"}', "invalid_input"),
        (b'{"name": "x", "skus": [{"sku": "A", "stock": 0, "price": 1, "currency": "EUR"}]}',
         "invalid_input"),
        # text Postgres cannot store was a 500 (found by flashsale chaos, abuse-fuzz)
        (b'{"name": "x\\u0000y"}', "invalid_input"),
        (b'{"name": "x\\ud800y"}', "malformed_json"),  # orjson refuses a lone surrogate
        (b'{"name": "x", "skus": [{"sku": "A", "title": "a\\u0000", "stock": 1, "price": 1, '
         b'"currency": "EUR"}]}', "invalid_input"),
    ],
)  # fmt: skip
async def test_bad_sale_bodies_are_422_and_write_nothing(
    http: TestClient[Any, Any], body: bytes, code: str
) -> None:
    app = http.app
    assert app is not None
    pool = app[CLIENTS].pool
    before = await pool.fetchval("SELECT count(*) FROM sales")
    response = await http.post(
        "/admin/v1/sales", data=body, headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status == 422
    assert await error_code(response) == code
    assert "message" in (await response.json())["error"]
    assert await pool.fetchval("SELECT count(*) FROM sales") == before


async def test_bad_stock_and_unknown_sale(http: TestClient[Any, Any]) -> None:
    sale_id = (await (await http.post("/admin/v1/sales", json=SALE, headers=auth())).json())["id"]
    cases = [
        ({"sku": "SNK-1", "add": 0}, 422),
        ({"sku": "SNK-1", "add": 1.5}, 422),
        ({"sku": "SNK-1", "add": "many"}, 422),
        ({"sku": "SNK-1", "add": True}, 422),
        ({"sku": "NOPE", "add": 1}, 404),
        ({"sku": "SNK-1", "add": 1, "extra": True}, 422),
        ({"add": 1}, 422),
        ({"sku": 5, "add": 1}, 422),
        ({"sku": "SNK-1\u0000", "add": 1}, 422),  # was a 500: Postgres cannot take a NUL
    ]
    for body, status in cases:
        response = await http.post(f"/admin/v1/sales/{sale_id}/stock", json=body, headers=auth())
        assert response.status == status, body
    # An error about one field names it, so a client can put the message next to it.
    for body, field in (({"sku": "SNK-1", "add": 0}, "add"), ({"add": 1}, "sku"),
                        ({"sku": "SNK-1", "add": 1, "extra": True}, "extra")):  # fmt: skip
        response = await http.post(f"/admin/v1/sales/{sale_id}/stock", json=body, headers=auth())
        assert (await response.json())["error"]["field"] == field, body
    bad_sku = await http.post("/admin/v1/sales", json={**SALE, "skus": [{"sku": "A"}]},
                              headers=auth())  # fmt: skip
    assert (await bad_sku.json())["error"]["field"] == "skus[0].stock"
    unknown = await http.post(f"/admin/v1/sales/{sale_id}/stock", json={"sku": "NOPE", "add": 1},
                              headers=auth())  # fmt: skip
    assert "field" not in (await unknown.json())["error"]  # not about the input's shape
    status = await (await http.get(f"/admin/v1/sales/{sale_id}", headers=auth())).json()
    assert status["skus"][0]["stock_total"] == 5  # nothing written
    missing = await http.get("/admin/v1/sales/no-such-sale", headers=auth())
    assert missing.status == 404 and await error_code(missing) == "unknown_sale"
    assert (await http.get("/v1/sales/no-such-sale")).status == 404


async def test_body_limit_and_unknown_routes(http: TestClient[Any, Any]) -> None:
    big = b'{"name": "' + b"x" * 20_000 + b'"}'
    response = await http.post(
        "/admin/v1/sales", data=big, headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status == 413 and await error_code(response) == "body_too_large"
    missing = await http.get("/v1/nothing-here")
    assert missing.status == 404 and await error_code(missing) == "not_found"
    wrong = await http.delete("/healthz")
    assert wrong.status == 405 and await error_code(wrong) == "method_not_allowed"


async def test_healthz_pings_every_dependency(stack: Settings) -> None:
    healthy = TestClient(TestServer(create_app(stack)))
    await healthy.start_server()
    try:
        response = await healthy.get("/healthz")
        body = await response.json()
        assert response.status == 200, body
        assert body["checks"] == {"redis": "ok", "postgres": "ok", "kafka": "ok"}
    finally:
        await healthy.close()
    # Point the broker at a closed port: the same gateway must say which dependency is down.
    broken = dataclasses.replace(stack, kafka_bootstrap="127.0.0.1:1")
    client = TestClient(TestServer(create_app(broken)))
    await client.start_server()
    try:
        response = await client.get("/healthz")
        body = await response.json()
        assert response.status == 503
        assert body["checks"]["redis"] == "ok" and body["checks"]["kafka"].startswith("down")
        assert body["error"]["message"] == "down: kafka"
    finally:
        await client.close()


async def test_a_flood_of_probes_pings_the_dependencies_once_a_second(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz (and /healthz, its alias) answers from a check made at most about once a second
    and shared by concurrent callers; /livez checks the process only. 300 probes at once must
    not take 300 Postgres connections."""
    client = TestClient(TestServer(create_app(stack)))
    await client.start_server()
    try:
        pings = {"postgres": 0}
        probes = client.app[PROBES]
        postgres = probes["postgres"]

        async def counted() -> object:
            pings["postgres"] += 1
            return await postgres()

        monkeypatch.setitem(probes, "postgres", counted)
        answers = await asyncio.gather(
            *(client.get("/readyz" if i % 2 else "/healthz") for i in range(300))
        )
        assert {a.status for a in answers} == {200}
        assert pings["postgres"] <= 2
        live = await client.get("/livez")
        assert live.status == 200 and (await live.json())["status"] == "ok"
        assert pings["postgres"] <= 2
    finally:
        await client.close()


async def test_metrics_count_requests_by_route_and_status(http: TestClient[Any, Any]) -> None:
    await http.get("/admin/v1/sales/x")  # 401
    await http.get("/v1/sales/no-such-sale")  # 404
    text = await (await http.get("/metrics")).text()
    assert 'route="/admin/v1/sales/{sale}",status="401"' in text
    assert 'route="/v1/sales/{sale}",status="404"' in text
    assert 'flashsale_gateway_rejections_total{reason="unknown_sale"}' in text
    assert "flashsale_gateway_request_seconds_bucket" in text
