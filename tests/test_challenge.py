"""The proof-of-work join challenge through the real gateway and Redis: refused without a
solution, with a wrong one, with another buyer's, and a second time; accepted once solved."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from flashsale.errors import InvalidInput
from flashsale.salespec import parse_sale
from flashsale.settings import Settings
from gateway.challenge import leading_zero_bits, solves
from tests.harness import Gateway, auth, gateway


def solve(challenge: str, bits: int) -> tuple[str, float]:
    """A solution and the seconds it took, as a client would find it."""
    began = time.perf_counter()
    n = 0
    while not solves(challenge, str(n), bits):
        n += 1
    return str(n), time.perf_counter() - began


def test_the_rule_counts_leading_zero_bits() -> None:
    assert leading_zero_bits(bytes([0, 0, 0x10, 0xFF])) == 19
    assert leading_zero_bits(bytes([0x80])) == 0 and leading_zero_bits(bytes(4)) == 32
    assert not solves("c", "12a", 0) and not solves("c", "1" * 21, 0) and solves("c", "7", 0)
    with pytest.raises(InvalidInput) as refused:
        parse_sale({"name": "x", "join_challenge": 25})
    assert refused.value.field == "join_challenge"


@pytest.fixture
async def gw(stack: Settings) -> AsyncIterator[Gateway]:
    async with gateway(stack) as harness:
        yield harness


async def _challenge(gw: Gateway, sale: str, buyer: str) -> dict[str, object]:
    answer = await gw.http.get(f"/v1/sales/{sale}/queue/challenge", headers=auth(gw.token(buyer)))
    assert answer.status == 200, await answer.text()
    return dict(await answer.json())


async def test_a_join_needs_a_fresh_solution_of_its_own_challenge(gw: Gateway) -> None:
    sale = await gw.create_sale(stock=5, join_challenge=10)
    join = f"/v1/sales/{sale}/queue"

    async def attempt(buyer: str, challenge: str | None, solution: str = "") -> tuple[int, str]:
        headers = auth(gw.token(buyer))
        if challenge is not None:
            headers |= {"X-Challenge": challenge, "X-Challenge-Solution": solution}
        answer = await gw.http.post(join, headers=headers)
        body = await answer.json()
        return answer.status, body.get("error", {}).get("code", body.get("state", ""))

    assert await attempt("alice", None) == (403, "challenge_required")
    offer = await _challenge(gw, sale, "alice")
    assert offer["difficulty"] == 10
    challenge = str(offer["challenge"])
    solution, _ = solve(challenge, 10)
    wrong = next(str(n) for n in range(10**6) if not solves(challenge, str(n), 10))
    assert await attempt("alice", challenge, wrong) == (403, "challenge_invalid")
    assert await attempt("mallory", challenge, solution) == (403, "challenge_invalid")  # alice's
    status, state = await attempt("alice", challenge, solution)
    assert status == 200 and state in ("waiting", "admitted")
    assert await attempt("alice", challenge, solution) == (403, "challenge_used")
    # A sale that asks nothing says so, and joins need nothing.
    plain = await gw.create_sale(stock=5)
    assert (await _challenge(gw, plain, "bob"))["challenge"] is None
    answer = await gw.http.post(f"/v1/sales/{plain}/queue", headers=auth(gw.token("bob")))
    assert answer.status == 200
