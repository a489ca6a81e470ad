"""Random interleavings of the hold lifecycle keep every Redis-side invariant (DESIGN §7).

A hypothesis state machine on real Redis: reserve, retry, begin_payment, confirm, release,
expire and clock advance (holds live 30 ms; advancing sleeps past that, since every deadline
comes from Redis TIME and no caller clock is trusted).
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from allocator.redis_calls import source
from flashsale.keys import SkuKeys
from flashsale.records import HoldRecord
from flashsale.settings import Settings

STOCK, LIMIT, TTL_MS = 6, 2, 30
BUYERS = st.sampled_from(["u1", "u2", "u3", "u4", "u5"])
TERMINAL = ("SOLD", "RELEASED")


@pytest.fixture(scope="module")
def redis_url(stack: Settings) -> tuple[str, bool]:
    return stack.require_redis(), stack.redis_cluster


def test_hold_lifecycle_state_machine(redis_url: tuple[str, bool]) -> None:
    url, cluster = redis_url
    kind = redis.RedisCluster if cluster else redis.Redis
    client = kind.from_url(url, decode_responses=True)
    scripts = {
        name: client.register_script(source(name))
        for name in ("preload", "reserve", "begin_payment", "confirm", "release", "expire")
    }

    class Holds(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.keys = SkuKeys(f"sale-{uuid.uuid4().hex[:10]}", "S")
            now = int(time.time() * 1000)
            meta = {
                "sale_id": self.keys.sale_id, "sku": "S", "price": "100", "currency": "EUR",
                "per_buyer_limit": str(LIMIT), "hold_ttl_ms": str(TTL_MS),
                "starts_at_ms": str(now - 1000), "ends_at_ms": str(now + 3_600_000),
                "status": "active",
            }  # fmt: skip
            args: list[str | int] = ["0", STOCK, "1"]  # not forced; a first preload
            for k, v in meta.items():
                args += [k, v]
            scripts["preload"](keys=[self.keys.meta, self.keys.stock], args=args)
            self.answers: dict[tuple[str, str], str] = {}
            self.reservations: list[str] = []
            self.terminal: dict[str, str] = {}

        def call(self, name: str, *args: str | int) -> list[str]:
            result: list[str] = scripts[name](keys=self.keys.all(), args=list(args))
            return result

        def reserve(self, buyer: str, qty: int, key: str) -> None:
            [answer] = self.call("reserve", 1, f"r-{uuid.uuid4().hex}", buyer, qty, "tok",
                                 "adm", f"{buyer}\x1f{key}")  # fmt: skip
            first = self.answers.setdefault((buyer, key), answer)
            assert answer == first, (answer, first)
            if answer.startswith("reserved") and answer.split("\x1f")[1] not in self.reservations:
                self.reservations.append(answer.split("\x1f")[1])

        @rule(buyer=BUYERS, qty=st.integers(1, 2), n=st.integers(0, 3))
        def new_request(self, buyer: str, qty: int, n: int) -> None:
            self.reserve(buyer, qty, f"{buyer}-{qty}-{n}-{len(self.answers)}")

        @rule(data=st.data())
        def retry(self, data: st.DataObject) -> None:
            if self.answers:
                buyer, key = data.draw(st.sampled_from(sorted(self.answers)))
                qty = int(key.split("-")[1])
                self.reserve(buyer, qty, key)

        @rule(data=st.data(), action=st.sampled_from(["begin_payment", "confirm", "release"]))
        def transition(self, data: st.DataObject, action: str) -> None:
            if not self.reservations:
                return
            # One script call moves a batch of holds, a hold possibly twice in it.
            rids = data.draw(st.lists(st.sampled_from(self.reservations), min_size=1, max_size=3))
            args: list[str] = (["cancelled", ""] if action == "release" else []) + rids
            reply = self.call(action, *args)
            assert len(reply) == 3 * len(rids)
            for i, rid in enumerate(rids):
                state = reply[3 * i + 1]
                if rid in self.terminal:
                    # A reservation that reached a terminal state never leaves it.
                    assert state == self.terminal[rid], (rid, state, self.terminal[rid])
                if state in TERMINAL:
                    self.terminal[rid] = state

        @rule(limit=st.integers(1, 5))
        def expire(self, limit: int) -> None:
            _more, *expired = self.call("expire", limit)
            for rid in expired:
                assert rid not in self.terminal, f"{rid} resolved twice"
                self.terminal[rid] = "RELEASED"

        @rule()
        def advance_clock(self) -> None:
            time.sleep(TTL_MS / 1000 + 0.005)

        @invariant()
        def conserved_and_within_limits(self) -> None:
            stock = {k: int(v) for k, v in client.hgetall(self.keys.stock).items()}
            assert stock["total"] == STOCK
            assert stock["total"] == (
                stock["available"] + stock["active"] + stock["paying"] + stock["sold"]
            ), stock
            assert min(stock.values()) >= 0, stock
            holds = [HoldRecord.parse(h) for h in client.hgetall(self.keys.holds).values()]
            by_state: dict[str, int] = {}
            by_buyer: dict[str, int] = {}
            for h in holds:
                by_state[h.state] = by_state.get(h.state, 0) + h.quantity
                if h.state != "RELEASED":
                    by_buyer[h.buyer_id] = by_buyer.get(h.buyer_id, 0) + h.quantity
            assert by_state.get("ACTIVE", 0) == stock["active"]
            assert by_state.get("PAYING", 0) == stock["paying"]
            assert by_state.get("SOLD", 0) == stock["sold"]
            assert all(units <= LIMIT for units in by_buyer.values()), by_buyer
            counted = {str(k): int(v) for k, v in client.hgetall(self.keys.buyers).items()}
            assert counted == by_buyer
            for rid, state in self.terminal.items():
                raw = client.hget(self.keys.holds, rid)
                assert raw is not None and str(raw).split("\x1f")[0] == state

    try:
        run_state_machine_as_test(
            Holds,
            settings=settings(
                max_examples=40,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        client.close()
