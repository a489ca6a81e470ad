"""The join challenge: a small proof of work that makes a bot pay for each place in the queue.

A sale with ``join_challenge`` = B asks every join for a solution: a decimal number S such
that ``sha256(challenge + ":" + S)`` starts with B zero bits (about 2^B tries: a fraction of a
second in a browser for B = 16, measured in docs/BENCHMARKS.md). The challenge is a token the
engine signs (``GET /v1/sales/{sale}/queue/challenge``) naming the sale, the buyer, a random
nonce, the difficulty and a two-minute expiry, so a solution is good for that buyer and sale
only; the nonce is spent in Redis on first use, so it is good once. Checking it is one
signature check, one SHA-256 and one ``SET NX``.

With ``join_challenge_max`` set, the difficulty follows the join rate: one more bit (twice
the work) for each doubling of the joins per second over the sale's admission rate, up to the
maximum. A bot flooding the queue raises the price of every place while the flood lasts; a
person joining then pays the same, once. A join is accepted with a solved challenge of at
least the base difficulty: the difficulty a challenge asked is signed into it, so nobody who
solved one is turned away because the rate rose meanwhile.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from aiohttp import web

from allocator.queue_view import QueueView
from flashsale.errors import Forbidden, InvalidToken
from flashsale.keys import challenge_key
from flashsale.proof_of_work import RULE, solves
from gateway.http import buyer_of, json_response, sale_of
from gateway.state import CLIENTS, COUNTERS, SIGNERS

CHALLENGE_TTL_S = 120


def difficulty(view: QueueView, join_rate: float) -> int:
    """The bits a challenge issued now asks: the sale's base, plus one per doubling of the
    join rate over the admission rate when the sale lets it rise."""
    base, ceiling = view.challenge, view.challenge_max
    if not base or ceiling <= base or join_rate <= view.admission_rate:
        return base
    return min(ceiling, base + int(math.log2(join_rate / view.admission_rate)))


async def issue(request: web.Request) -> web.Response:
    """``GET /v1/sales/{sale}/queue/challenge``: a challenge for the caller to solve before
    joining (``difficulty`` 0 and no challenge when the sale asks none)."""
    app = request.app
    buyer, sale_id = await buyer_of(request), sale_of(request)
    counters = await app[COUNTERS].get(sale_id)
    bits = difficulty(counters.view, counters.join_rate)
    body: dict[str, Any] = {"difficulty": bits, "challenge": None, "rule": RULE}
    if bits:
        claims = {"s": sale_id, "sub": buyer, "n": secrets.token_hex(12), "d": bits}
        body["challenge"] = app[SIGNERS].challenge.sign(claims, CHALLENGE_TTL_S)
        body["expires_in_s"] = CHALLENGE_TTL_S
    return json_response(body)


async def check(request: web.Request, sale_id: str, buyer: str, bits: int) -> None:
    """Refuse a join without a fresh, unused solution of this buyer's challenge (403)."""
    raw = request.headers.get("X-Challenge")
    solution = request.headers.get("X-Challenge-Solution", "")
    if not raw:
        raise Forbidden("this sale asks a challenge at join: GET .../queue/challenge, solve "
                        "it and send X-Challenge and X-Challenge-Solution",
                        code="challenge_required")  # fmt: skip
    try:
        claims = request.app[SIGNERS].challenge.verify(raw)
    except InvalidToken as exc:
        code = "challenge_expired" if exc.reason == "expired" else "challenge_invalid"
        raise Forbidden(f"challenge refused ({exc.reason})", code=code) from None
    bound = claims.get("s") == sale_id and claims.get("sub") == buyer
    difficulty = claims.get("d")
    if not bound or not isinstance(difficulty, int):
        raise Forbidden("this challenge is not this buyer's for this sale",
                        code="challenge_invalid")  # fmt: skip
    if difficulty < bits:  # the sale's base was raised since it was issued
        raise Forbidden(f"this challenge asks {difficulty} bits and the sale now asks at least "
                        f"{bits}: ask for a new one", code="challenge_invalid")  # fmt: skip
    if not solves(raw, solution, difficulty):
        raise Forbidden("the solution does not solve the challenge", code="challenge_invalid")
    spent = await request.app[CLIENTS].redis.set(
        challenge_key(str(claims["n"])), 1, nx=True, ex=CHALLENGE_TTL_S + 60
    )
    if not spent:
        raise Forbidden("this challenge was used already: ask for a new one",
                        code="challenge_used")  # fmt: skip


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/sales/{sale}/queue/challenge", issue)
