"""schemathesis against a running gateway, in a process of its own (it is synchronous, and its
requests would otherwise share an event loop with the buyers of the spike).

``python -m loadtest.chaos.fuzz BASE_URL SALE DECOY REQUESTS`` draws requests for every
operation of ``BASE_URL/openapi.json``, valid and invalid ones alike (schemathesis's positive
and negative generation), until it has sent ``REQUESTS``; path parameters name the live sale
``SALE`` half the time, so generated bodies get past "unknown sale", except that an admin
request that changes a sale names the sale ``DECOY`` (:func:`sale_for`). Admin routes carry
the admin token (``FLASHSALE_ADMIN_TOKEN``), the others a buyer token signed with
``FLASHSALE_BUYER_TOKEN_SECRET``. Prints one JSON line: ``{"requests", "operations",
"statuses", "no_retry_after", "server_errors", "unpaced"}`` (the last two: examples of
5xx other than 503, and of 429 and 503 without ``Retry-After``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import orjson
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from flashsale.settings import Secret
from flashsale.tokens import Signer


def has_retry_after(headers: Mapping[str, Any]) -> bool:
    """Whether ``headers`` name ``Retry-After``, in any case: schemathesis gives them with
    lowercase names (and list values), ``requests`` in a case-insensitive mapping."""
    return any(name.lower() == "retry-after" for name in headers)


SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


def sale_for(method: str, path: str, sent: int, live: str, decoy: str) -> str | None:
    """The sale a generated request names (None: the one generated), by the count sent so far:
    every other request names the live sale, so generated bodies get past "unknown sale". An
    admin request that changes a sale names ``decoy`` instead: the fuzzer holds the admin
    token, and a generated pause or end of the spike's sale (which the gateway rightly obeys)
    would leave its buyers waiting in a paused queue or turned away."""
    if sent % 2:
        return None
    return decoy if path.startswith("/admin/") and method.upper() not in SAFE else live


def run(base_url: str, sale: str, decoy: str, wanted: int) -> dict[str, Any]:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()
                  if isinstance(result, Ok) and result.ok().path != "/metrics"]  # fmt: skip
    admin = Secret(os.environ["FLASHSALE_ADMIN_TOKEN"]).current()  # the first, during a rotation
    buyer = Signer.from_setting(os.environ["FLASHSALE_BUYER_TOKEN_SECRET"], "buyer").sign(
        {"sub": "fuzzer"}, 3600
    )
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    unpaced: list[str] = []  # 429s and 503s without Retry-After
    missing_retry_after = 0
    sent = 0
    http = requests.Session()

    def send(case: Any) -> None:
        nonlocal sent, missing_retry_after
        if sent >= wanted:
            return
        if case.path_parameters and "sale" in case.path_parameters:
            named = sale_for(case.method, case.path, sent, sale, decoy)
            if named is not None:
                case.path_parameters["sale"] = named
        token = admin if case.path.startswith("/admin/") else buyer
        try:
            response = case.call(
                base_url=base_url,
                session=http,
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
        except (requests.RequestException, ValueError, UnicodeError):
            return  # not sendable as generated (a header the client refuses): not a request
        sent += 1
        statuses[response.status_code] += 1
        if response.status_code in (429, 503) and not has_retry_after(response.headers):
            missing_retry_after += 1
            if len(unpaced) < 20:
                unpaced.append(f"{case.method} {case.formatted_path} -> "
                               f"{response.status_code}: {response.text[:200]}")  # fmt: skip
        if response.status_code >= 500 and response.status_code != 503 and len(errors) < 20:
            errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                          f"{response.text[:200]}")  # fmt: skip

    round_number = 0
    while sent < wanted:
        before = sent
        per_operation = max(10, (wanted - sent) // (2 * len(operations)) + 1)
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                test = given(case=operation.as_strategy(generation_mode=mode))(send)
                test = settings(max_examples=per_operation, deadline=None, database=None,
                                phases=[Phase.generate],
                                suppress_health_check=list(HealthCheck))(test)  # fmt: skip
                with contextlib.suppress(Unsatisfiable):  # nothing (negative) to draw here
                    seed(round_number)(test)()
        round_number += 1
        if sent == before:
            break  # nothing new can be generated
    return {"requests": sent, "operations": len(operations),
            "statuses": {str(code): n for code, n in sorted(statuses.items())},
            "no_retry_after": missing_retry_after, "server_errors": errors,
            "unpaced": unpaced}  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python -m loadtest.chaos.fuzz BASE_URL SALE DECOY REQUESTS")
    report = run(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
