"""schemathesis against ``/openapi.json`` of a real gateway: no 5xx, no undocumented status,
no response that breaks its documented schema or content type."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from flashsale.settings import Settings
from flashsale.tokens import Signer
from gateway.catalog import INFO_TTL_S, MAX_INFO_TTL_S
from gateway.openapi import document
from tests.harness import ADMIN, create_live_sale, live_gateway, packed_and_revalidated

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclasses.dataclass
class Live:
    base_url: str
    sale_id: str
    buyer_token: str
    admission: str  # the fuzzing buyer's real admission, so bodies get past the 403s


@pytest.fixture(scope="module")
def live(stack: Settings) -> Iterator[Live]:
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, name="schemathesis")
        buyer = Signer.from_setting(gw.settings.buyer_token_secret.reveal(), "buyer").sign(
            {"sub": "fuzzer"}, 3600
        )
        ticket = requests.post(
            f"{gw.base_url}/v1/sales/{sale}/queue",
            headers={"Authorization": f"Bearer {buyer}"},
            timeout=10,
        ).json()["ticket"]
        gw.pump_forever(sale, ["S1"])
        for _ in range(100):
            status = requests.get(
                f"{gw.base_url}/v1/sales/{sale}/queue/status",
                headers={"X-Queue-Ticket": ticket},
                timeout=10,
            ).json()
            if status["state"] != "waiting":
                break
            time.sleep(0.05)
        assert status["state"] == "admitted", status
        yield Live(gw.base_url, sale, buyer, status["admission_token"])


def test_the_served_document_is_the_one_in_the_code(live: Live) -> None:
    served = requests.get(f"{live.base_url}/openapi.json", timeout=10)
    assert served.status_code == 200 and served.json() == document()
    assert served.json()["openapi"] == "3.1.0"


def test_the_document_is_sent_compressed_and_revalidated(live: Live) -> None:
    """86 KB of JSON went out whole to each client generator and each docs page load."""
    packed_and_revalidated(f"{live.base_url}/openapi.json")


def test_every_operation_is_named_tagged_and_says_when_to_retry() -> None:
    """What client generators need: a unique operationId and a declared tag on every
    operation, Retry-After on every 429 and 503, and typed nested objects."""
    doc = document()
    operations = [(path, method, op) for path, item in doc["paths"].items()
                  for method, op in item.items()]  # fmt: skip
    ids = [op.get("operationId") for _, _, op in operations]
    assert all(ids) and len(set(ids)) == len(ids), ids
    declared = {t["name"] for t in doc["tags"]}
    assert all(op.get("tags") and set(op["tags"]) <= declared for _, _, op in operations)
    for path, method, op in operations:
        for status in ("429", "503"):
            answer = op["responses"].get(status)
            if (
                answer is not None
                and "content" in answer
                and answer["content"].get("application/json", {}).get("schema", {}).get("$ref")
            ):  # an error answer
                assert "Retry-After" in answer.get("headers", {}), (path, method, status)
    reservation = doc["paths"]["/v1/reservations/{id}"]["get"]["responses"]["200"]
    order = reservation["content"]["application/json"]["schema"]["properties"]["order"]
    assert order["oneOf"][0]["required"] == ["state", "amount", "currency", "updated_at"]
    sale = doc["paths"]["/admin/v1/sales"]["post"]["responses"]["201"]
    sku = sale["content"]["application/json"]["schema"]["properties"]["skus"]["items"]
    assert {"sku", "price", "currency", "per_buyer_limit"} <= set(sku["required"])
    error = doc["components"]["schemas"]["Error"]["properties"]["error"]
    assert "field" in error["properties"]


def test_the_sale_summary_says_how_long_a_copy_is_kept() -> None:
    """The copy times the public summary's description gives are the gateway's own."""
    said = document()["paths"]["/v1/sales/{sale}"]["get"]["summary"]
    assert f"{INFO_TTL_S:g} s" in said and f"{MAX_INFO_TTL_S:g} s" in said, said


schema = schemathesis.openapi.from_dict(document())


@pytest.mark.serial  # its 35 operations are one test id: pytest-xdist would run one of them
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_matches_its_document(case: Any, live: Live) -> None:
    if case.path == "/metrics":
        return  # plain text, no schema to hold
    if "sale" in (case.path_parameters or {}) and not case.path.endswith(("/end", "/pause")):
        # Fuzz a real, preloaded, live sale (random ids only ever find 404).
        case.path_parameters["sale"] = live.sale_id
    if case.path.endswith("/reservations") and case.headers is not None:
        case.headers["X-Admission-Token"] = live.admission
    token = ADMIN if case.path.startswith("/admin/") else live.buyer_token
    case.call_and_validate(
        base_url=live.base_url,
        headers={"Authorization": f"Bearer {token}"},
        checks=CHECKS,
    )


def test_every_route_of_the_api_is_in_the_document(stack: Settings) -> None:
    """A route added to the gateway and not to the document is invisible to client generators
    and to schemathesis alike: `DELETE /admin/v1/sales/{sale}` was served undocumented."""
    from gateway.app import create_app

    spec = document()
    served = {(route.method.lower(), route.resource.canonical)
              for route in create_app(stack).router.routes()
              if route.resource is not None and route.method not in ("HEAD", "OPTIONS")
              and route.resource.canonical.startswith(("/v1/", "/admin/v1/"))}  # fmt: skip
    documented = {(method, path) for path, item in spec["paths"].items() for method in item
                  if method in ("get", "post", "put", "patch", "delete")}  # fmt: skip
    assert served - documented == set(), served - documented
