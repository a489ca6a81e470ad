"""The proof-of-work join challenge through the real gateway and Redis: refused without a
solution, with a wrong one, with another buyer's, and a second time; accepted once solved."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from allocator.queue_view import QueueView
from flashsale.errors import InvalidInput
from flashsale.proof_of_work import leading_zero_bits, solution, solves
from flashsale.salespec import parse_sale
from flashsale.settings import Settings
from gateway.challenge import difficulty
from tests.harness import ADMIN, Gateway, auth, gateway


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

    async def attempt(buyer: str, challenge: str | None, given: str = "") -> tuple[int, str]:
        headers = auth(gw.token(buyer))
        if challenge is not None:
            headers |= {"X-Challenge": challenge, "X-Challenge-Solution": given}
        answer = await gw.http.post(join, headers=headers)
        body = await answer.json()
        return answer.status, body.get("error", {}).get("code", body.get("state", ""))

    assert await attempt("alice", None) == (403, "challenge_required")
    offer = await _challenge(gw, sale, "alice")
    assert offer["difficulty"] == 10
    challenge = str(offer["challenge"])
    solved = solution(challenge, 10)
    wrong = next(str(n) for n in range(10**6) if not solves(challenge, str(n), 10))
    assert await attempt("alice", challenge, wrong) == (403, "challenge_invalid")
    assert await attempt("mallory", challenge, solved) == (403, "challenge_invalid")  # alice's
    status, state = await attempt("alice", challenge, solved)
    assert status == 200 and state in ("waiting", "admitted")
    assert await attempt("alice", challenge, solved) == (403, "challenge_used")
    # A sale that asks nothing says so, and joins need nothing.
    plain = await gw.create_sale(stock=5)
    assert (await _challenge(gw, plain, "bob"))["challenge"] is None
    answer = await gw.http.post(f"/v1/sales/{plain}/queue", headers=auth(gw.token("bob")))
    assert answer.status == 200


async def test_a_proof_of_work_is_turned_on_while_the_sale_runs(gw: Gateway) -> None:
    """Bots flooding a live sale: the operator could not ask a proof of work of the next joins
    (409 sale_started: "join_challenge cannot change once the sale has started"), although it
    changes nothing for the buyers already in line. It now can, and off again."""
    sale = await gw.create_sale(stock=5)
    early = await gw.http.post(f"/v1/sales/{sale}/queue", headers=auth(gw.token("early")))
    assert early.status == 200
    changed = await gw.http.patch(f"/admin/v1/sales/{sale}", headers=auth(ADMIN),
                                  json={"join_challenge": 6, "join_challenge_max": 10})  # fmt: skip
    assert changed.status == 200, await changed.text()
    await asyncio.sleep(0.25)  # the gateway reads the sale's counters every 100 ms
    late = await gw.http.post(f"/v1/sales/{sale}/queue", headers=auth(gw.token("late")))
    assert (late.status, (await late.json())["error"]["code"]) == (403, "challenge_required")
    assert (await _challenge(gw, sale, "late"))["difficulty"] == 6
    kept = await gw.http.post(f"/v1/sales/{sale}/queue", headers=auth(gw.token("early")))
    assert kept.status == 403  # a join again pays too; the place it holds is unchanged
    # Raised while a buyer solved the last price: said so, not "not this buyer's".
    offer = await _challenge(gw, sale, "late")
    raised = await gw.http.patch(f"/admin/v1/sales/{sale}", headers=auth(ADMIN),
                                 json={"join_challenge": 8})  # fmt: skip
    assert raised.status == 200, await raised.text()
    await asyncio.sleep(0.25)
    stale = str(offer["challenge"])
    late = await gw.http.post(f"/v1/sales/{sale}/queue", headers={
        **auth(gw.token("late")), "X-Challenge": stale,
        "X-Challenge-Solution": solution(stale, 6)})  # fmt: skip
    assert (await late.json())["error"] == {"code": "challenge_invalid", "message": "this "
        "challenge asks 6 bits and the sale now asks at least 8: ask for a new one"}  # fmt: skip
    off = await gw.http.patch(f"/admin/v1/sales/{sale}", headers=auth(ADMIN),
                              json={"join_challenge": 0, "join_challenge_max": 0})  # fmt: skip
    assert off.status == 200, await off.text()
    await asyncio.sleep(0.25)
    again = await gw.http.post(f"/v1/sales/{sale}/queue", headers=auth(gw.token("late")))
    assert again.status == 200, await again.text()


async def test_a_change_of_the_proof_of_work_refused_names_the_field_changed(gw: Gateway) -> None:
    """A sale asking 8 bits, up to 12: `{"join_challenge": 14}` alone was refused as
    "join_challenge_max: must be at least join_challenge", naming a field the request did not
    send, and neither value."""
    sale = await gw.create_sale(stock=5, join_challenge=8, join_challenge_max=12)
    refusals = {
        '{"join_challenge": 14}': ("join_challenge", "must be at most join_challenge_max, 12 "
                                   "(the most the sale asks as the joins rise), got 14"),
        '{"join_challenge": 0}': ("join_challenge", "0 (off) turns off its rise too: give "
                                  "join_challenge_max 0 with it (it is 12)"),
        '{"join_challenge_max": 4}': ("join_challenge_max", "must be at least join_challenge, "
                                      "8, or 0 to keep the difficulty fixed, got 4"),
        '{"join_challenge": 14, "join_challenge_max": 12}': (
            "join_challenge_max", "must be at least join_challenge, 14, or 0 to keep the "
            "difficulty fixed, got 12"),
        '{"join_challenge": 0, "join_challenge_max": 12}': (
            "join_challenge_max", "must be 0 while join_challenge is 0 (off), got 12"),
    }  # fmt: skip
    for body, (field, message) in refusals.items():
        refused = await gw.http.patch(f"/admin/v1/sales/{sale}", headers=auth(ADMIN), data=body)
        assert refused.status == 422, (body, await refused.text())
        error = (await refused.json())["error"]
        assert (error["field"], error["message"]) == (field, f"{field}: {message}"), body
    unchanged = await (await gw.http.get(f"/admin/v1/sales/{sale}", headers=auth(ADMIN))).json()
    assert (unchanged["sale"]["join_challenge"], unchanged["sale"]["join_challenge_max"]) == (8, 12)


def test_the_difficulty_rises_a_bit_per_doubling_of_the_join_rate_over_admission() -> None:
    v = QueueView(
        preloaded=True, status="active", starts_at_ms=0, ends_at_ms=1, admission_rate=100,
        window_ms=1, capacity=1, serving=0, cutoff=None, tail=0, pre=0, sealed=True,
        shuffled=True, sold_out=False, rate_p50=0, rate_p10=0, noshow=0, outstanding=0,
        beat_ms=0, live=True, challenge=10, challenge_max=14,
    )  # fmt: skip
    assert [difficulty(v, rate) for rate in (0, 100, 199, 200, 399, 400, 800, 10**6)] == [
        10, 10, 10, 11, 11, 12, 13, 14]  # fmt: skip
    assert difficulty(dataclasses.replace(v, challenge_max=0), 10**6) == 10  # fixed
    assert difficulty(dataclasses.replace(v, challenge=0, challenge_max=0), 10**6) == 0
    for bad in ({"join_challenge": 8, "join_challenge_max": 6}, {"join_challenge_max": 6},
                {"join_challenge": 8, "join_challenge_max": 25}):  # fmt: skip
        with pytest.raises(InvalidInput) as refused:
            parse_sale({"name": "x", **bad})
        assert refused.value.field == "join_challenge_max"


async def test_a_flood_of_joins_raises_the_price_of_the_next_place(gw: Gateway) -> None:
    sale = await gw.create_sale(stock=5, admission_rate=1, join_challenge=4, join_challenge_max=8)
    info = await (await gw.http.get(f"/v1/sales/{sale}")).json()
    assert (info["join_challenge"], info["join_challenge_max"]) == (4, 8)
    early = await _challenge(gw, sale, "early")
    assert early["difficulty"] == 4  # nobody has joined yet
    for i in range(60):  # 60 joins in well under 4 s: more than 16 times the admission rate
        offer = await _challenge(gw, sale, f"b{i}")
        solved = solution(str(offer["challenge"]), int(str(offer["difficulty"])))
        headers = {**auth(gw.token(f"b{i}")), "X-Challenge": str(offer["challenge"]),
                   "X-Challenge-Solution": solved}  # fmt: skip
        assert (await gw.http.post(f"/v1/sales/{sale}/queue", headers=headers)).status == 200
    await asyncio.sleep(0.15)  # the next read of the counters sees the queue's growth
    assert (await _challenge(gw, sale, "late"))["difficulty"] == 8
    # A challenge solved at the base difficulty before the flood is still good.
    headers = {**auth(gw.token("early")), "X-Challenge": str(early["challenge"]),
               "X-Challenge-Solution": solution(str(early["challenge"]), 4)}  # fmt: skip
    assert (await gw.http.post(f"/v1/sales/{sale}/queue", headers=headers)).status == 200
