"""The abuse scenarios: hostile requests sent beside a spike of real buyers. They count requests
rather than faults. The gateway must answer every one of them with a 4xx (or a 503 carrying
``Retry-After``), never a 5xx, never accept what it should refuse, and keep serving the buyers.

* ``abuse-fuzz``: schemathesis generates requests from ``/openapi.json``
  (:mod:`loadtest.chaos.fuzz`, in its own process);
* ``abuse-slow`` and ``abuse-oversized``: connections that send their headers or their body a
  byte at a time, and huge headers, URLs and bodies (:mod:`loadtest.chaos.abuse_raw`);
* ``abuse-tokens``: forged, expired, tampered, replayed and cross-sale buyer tokens, queue
  tickets and admission tokens;
* ``abuse-forwarded``: spoofed ``X-Forwarded-For`` behind a trusted proxy, against a gateway
  with a small per-IP limit;
* ``abuse-floods``: ``/healthz``, ``/readyz``, ``/metrics`` and unknown sale ids, as fast as
  they are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from flashsale.cli.devstack.processes import free_port
from flashsale.tokens import Signer
from loadtest.chaos.rig import FaultFailed, Rig


@dataclass
class Target:
    rig: Rig
    sale: str  # the spike's sale
    other: str  # a second sale, for cross-sale tokens and the per-IP probe
    seconds: float  # how long to keep at it
    quick: bool


@dataclass
class AbuseResult:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    no_retry_after: int = 0  # 429 or 503 without Retry-After
    accepted: list[str] = field(default_factory=list)  # what should have been refused
    notes: list[str] = field(default_factory=list)

    def answer(self, status: int, retry_after: str | None) -> None:
        self.requests += 1
        self.statuses[status] += 1
        if status in (429, 503) and retry_after is None:
            self.no_retry_after += 1

    @property
    def non_503_5xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500 and s != 503)


Abuse = Callable[[Target], Coroutine[Any, Any, AbuseResult]]


def buyer_token(rig: Rig, name: str) -> str:
    signer = Signer.from_setting(rig.settings.buyer_token_secret.reveal(), "buyer")
    return signer.sign({"sub": name}, 3600)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _send(session: aiohttp.ClientSession, result: AbuseResult, method: str, url: str,
                **kwargs: Any) -> tuple[int, Any]:  # fmt: skip
    async with session.request(method, url, **kwargs) as response:
        body = await response.read()
        result.answer(response.status, response.headers.get("Retry-After"))
        try:
            return response.status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return response.status, None


# -- schemathesis --------------------------------------------------------------------------


async def fuzz(target: Target) -> AbuseResult:
    """schemathesis against the served ``/openapi.json``, in its own process."""
    rig = target.rig
    wanted = 1000 if target.quick else 5000
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.chaos.fuzz", rig.base_url, target.sale, target.other,
        str(wanted),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "FLASHSALE_ADMIN_TOKEN": rig.settings.admin_token.current(),
             "FLASHSALE_BUYER_TOKEN_SECRET": rig.settings.buyer_token_secret.reveal()},
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        raise FaultFailed(f"the fuzzer failed (exit {process.returncode}): "
                          f"{err.decode(errors='replace')[-2000:]}")  # fmt: skip
    report = orjson.loads(out.splitlines()[-1])
    result = AbuseResult(requests=report["requests"], no_retry_after=report["no_retry_after"])
    result.statuses.update({int(k): v for k, v in report["statuses"].items()})
    result.notes += [f"5xx: {e}" for e in report["server_errors"][:5]]
    result.notes += [f"no Retry-After: {e}" for e in report["unpaced"][:5]]
    result.notes.append(f"{report['requests']:,} generated requests over "
                        f"{report['operations']} operations")  # fmt: skip
    return result


# -- tokens --------------------------------------------------------------------------------


async def _admitted(session: aiohttp.ClientSession, rig: Rig, sale: str, token: str, *,
                    result: AbuseResult, patience: float = 120) -> tuple[str, str]:  # fmt: skip
    """Join ``sale`` as the buyer of ``token`` and wait for the admission: (ticket, admission)."""
    url = f"{rig.base_url}/v1/sales/{sale}"
    status, body = await _send(session, result, "POST", f"{url}/queue", headers=_bearer(token))
    if status != 200:
        raise FaultFailed(f"joining {sale} for the token checks failed: {status} {body}")
    ticket = body["ticket"]
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        status, body = await _send(session, result, "GET", f"{url}/queue/status",
                                   headers={"X-Queue-Ticket": ticket})  # fmt: skip
        if status == 200 and body.get("admission_token"):
            return body.get("ticket", ticket), body["admission_token"]
        await asyncio.sleep(0.2)
    raise FaultFailed(f"the token checks' buyer was not admitted to {sale} in {patience:g}s")


def _tampered(token: str) -> str:
    head, _, signature = token.rpartition(".")
    return f"{head}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


async def tokens(target: Target) -> AbuseResult:
    """Every token the gateway trusts, forged, expired, tampered with, replayed and carried
    to another sale: each must be refused with a 4xx."""
    rig, result = target.rig, AbuseResult()
    settings = rig.settings
    real = buyer_token(rig, "token-checker")
    wrong_key = Signer(["not-the-storefront-secret-at-all"], "buyer").sign({"sub": "x"}, 3600)
    expired = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer").sign(
        {"sub": "late"}, -60
    )
    own = settings.secret.reveal()
    old_ticket = Signer.from_setting(own, "ticket").sign(
        {"s": target.sale, "sub": "token-checker", "p": 1}, -7200
    )
    as_ticket = Signer.from_setting(settings.buyer_token_secret.reveal(), "ticket").sign(
        {"s": target.sale, "sub": "token-checker", "p": 1}, 3600
    )  # a ticket made with the storefront's secret
    async with aiohttp.ClientSession() as session:
        ticket, admission = await _admitted(session, rig, target.other, real, result=result)
        other_url = f"{rig.base_url}/v1/sales/{target.other}"
        sale_url = f"{rig.base_url}/v1/sales/{target.sale}"

        def reserve(url: str, buyer: str, admission_token: str, key: str) -> dict[str, Any]:
            return {
                "method": "POST",
                "url": f"{url}/reservations",
                "headers": {
                    **_bearer(buyer),
                    "X-Admission-Token": admission_token,
                    "Idempotency-Key": key,
                },
                "json": {"sku": "CHAOS-OTHER", "quantity": 1, "payment_token": "tok_visa"},
            }

        first_key = uuid.uuid4().hex
        status, _ = await _send(session, result, **reserve(other_url, real, admission, first_key))
        if status not in (201, 409):
            raise FaultFailed(f"the token checks' own reservation answered {status}")
        refused = {
            "a buyer token signed with another key": {
                "method": "POST", "url": f"{sale_url}/queue", "headers": _bearer(wrong_key)},
            "an expired buyer token": {
                "method": "POST", "url": f"{sale_url}/queue", "headers": _bearer(expired)},
            "a tampered buyer token": {
                "method": "POST", "url": f"{sale_url}/queue", "headers": _bearer(_tampered(real))},
            "a buyer token with no signature": {
                "method": "POST", "url": f"{sale_url}/queue",
                "headers": _bearer(real.rpartition(".")[0] + ".")},
            "a tampered ticket": {
                "method": "GET", "url": f"{other_url}/queue/status",
                "headers": {"X-Queue-Ticket": _tampered(ticket)}},
            "an expired ticket": {
                "method": "GET", "url": f"{sale_url}/queue/status",
                "headers": {"X-Queue-Ticket": old_ticket}},
            "a ticket signed with the storefront's secret": {
                "method": "GET", "url": f"{sale_url}/queue/status",
                "headers": {"X-Queue-Ticket": as_ticket}},
            "a ticket carried to another sale": {
                "method": "GET", "url": f"{sale_url}/queue/status",
                "headers": {"X-Queue-Ticket": ticket}},
            "a buyer token used as a ticket": {
                "method": "GET", "url": f"{other_url}/queue/status",
                "headers": {"X-Queue-Ticket": real}},
            "an admission replayed under a new key": reserve(other_url, real, admission,
                                                             uuid.uuid4().hex),
            "an admission carried to another sale": reserve(sale_url, real, admission,
                                                            uuid.uuid4().hex),
            "an admission of another buyer": reserve(other_url, buyer_token(rig, "thief"),
                                                     admission, uuid.uuid4().hex),
            "a tampered admission": reserve(other_url, real, _tampered(admission),
                                            uuid.uuid4().hex),
            "a ticket used as an admission": reserve(other_url, real, ticket, uuid.uuid4().hex),
        }  # fmt: skip
        rounds = 3 if target.quick else 25
        for _ in range(rounds):
            for label, request in refused.items():
                status, body = await _send(session, result, **request)
                if not 400 <= status < 500:
                    result.accepted.append(f"{label}: answered {status} {body}")
        # The one legitimate replay: same key, same body, same admission gives the same answer
        # (once the buyer's rate limit, spent on the forgeries above, lets it through).
        for _ in range(30):
            status, _ = await _send(session, result,
                                    **reserve(other_url, real, admission, first_key))  # fmt: skip
            if status != 429:
                break
            await asyncio.sleep(1.0)
        if status not in (201, 409):
            result.accepted.append(f"the legitimate replay answered {status}")
    result.notes.append(f"{len(refused)} kinds of forged or misused token, {rounds} times each")
    return result


# -- spoofed forwarded addresses -----------------------------------------------------------


async def forwarded(target: Target) -> AbuseResult:
    """Behind a trusted proxy (127.0.0.1), one client writes a fresh ``X-Forwarded-For`` first
    hop on every join: the per-IP limit must still count it as the address the proxy saw."""
    rig, result = target.rig, AbuseResult()
    port = free_port()
    rate, burst = 5, 10
    gateway = rig.spawn(["gateway", "--port", str(port)], {
        "FLASHSALE_RATE_PER_IP": f"{rate},{burst}", "FLASHSALE_TRUSTED_PROXIES": "127.0.0.1/32",
        "FLASHSALE_RATE_PER_BUYER": "off"})  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/livez") as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise FaultFailed("the per-IP probe's gateway did not start")
                await asyncio.sleep(0.2)
            count = 60 if target.quick else 300
            began = time.monotonic()
            let_through = 0
            for i in range(count):
                status, _ = await _send(
                    session, result, "POST",
                    f"http://127.0.0.1:{port}/v1/sales/{target.other}/queue",
                    headers={**_bearer(buyer_token(rig, f"spoofer-{i}")),
                             "X-Forwarded-For": f"203.0.113.{i % 250}, 198.51.100.7"},
                )  # fmt: skip
                let_through += status != 429
            allowed = burst + rate * (time.monotonic() - began) + 1
    finally:
        gateway.terminate()
        await asyncio.to_thread(gateway.wait)
        rig.extras.remove(gateway)
    result.notes.append(f"{count} joins with spoofed first hops: {let_through} let through, "
                        f"at most {allowed:.0f} allowed to 198.51.100.7")  # fmt: skip
    if let_through > allowed:
        result.accepted.append(f"{let_through - allowed:.0f} joins beyond the per-IP limit")
    return result


# -- floods --------------------------------------------------------------------------------


async def floods(target: Target) -> AbuseResult:
    """Probes, metrics and unknown sale ids, 50 at a time, for the scenario's length."""
    rig, result = target.rig, AbuseResult()
    token = buyer_token(rig, "flooder")
    base = rig.base_url
    kinds: list[tuple[str, str, dict[str, str], bool]] = [
        ("GET", "/healthz", {}, False), ("GET", "/readyz", {}, False),
        ("GET", "/livez", {}, False), ("GET", "/metrics", {}, False),
        ("GET", "/v1/sales/no-such-sale-{n}", {}, True),
        ("POST", "/v1/sales/no-such-sale-{n}/queue", _bearer(token), True),
        ("GET", "/v1/sales/no-such-sale-{n}/queue/status", {"X-Queue-Ticket": "x"}, True),
    ]  # fmt: skip
    deadline = time.monotonic() + target.seconds
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            n = next(counter)
            method, path, headers, unknown = kinds[n % len(kinds)]
            status, body = await _send(session, result, method, base + path.format(n=n),
                                       headers=headers)  # fmt: skip
            if unknown and status < 400:
                result.accepted.append(f"{method} {path}: answered {status} {body}")

    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(50)))
    result.notes.append(f"{result.requests:,} flood requests in {target.seconds:.0f}s")
    return result
