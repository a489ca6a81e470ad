"""What ``flashsale bench gateway`` drives its rows with: the sales (a plain one and one
with a join challenge), buyers queued and admitted through the waiting room's scripts, waiting
buyers' tickets, solved challenges and a storefront's ES256 tokens."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from allocator.queue_scripts import MAX_JOIN_BATCH, QueueScripts
from flashsale.clients import redis_client
from flashsale.errors import FlashsaleError
from flashsale.keys import SaleKeys
from flashsale.proof_of_work import solution
from flashsale.settings import Settings
from flashsale.tokens import Signer, Signers
from gateway.waiting_room import TICKET_GRACE_S
from loadtest import admin_api

SKU = "B1"  # the one SKU of every bench sale
SALE_S = 3600  # each bench sale ends this long after it is made


async def _live_sale(session: aiohttp.ClientSession, base: str, settings: Settings, name: str,
                     **options: int) -> str:  # fmt: skip
    """A preloaded sale that started a second ago, with room for every join and a million
    units of one SKU (``options``: more fields of the sale, e.g. its join challenge)."""
    now = datetime.now(UTC)
    spec = {
        "name": name, "starts_at": (now - timedelta(seconds=1)).isoformat(),
        "ends_at": (now + timedelta(seconds=SALE_S)).isoformat(), "max_queue": 100_000_000,
        "skus": [{"sku": SKU, "stock": 1_000_000, "price": 100, "currency": "EUR"}], **options,
    }  # fmt: skip
    return await admin_api.create_sale(session, base, settings.admin_token.current(), spec)


async def prepare_sale(session: aiohttp.ClientSession, base: str, settings: Settings) -> str:
    """A live, preloaded sale with room for every join, joined once through the gateway."""
    sale_id = await _live_sale(session, base, settings, "bench gateway")
    token = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer").sign(
        {"sub": "bench-status"}, 600
    )
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{base}/v1/sales/{sale_id}/queue", headers=headers) as response:
        if response.status != 200 or not (await response.json()).get("ticket"):
            raise FlashsaleError(f"the gateway refused a join: {response.status} "
                                 f"{await response.text()}")  # fmt: skip
    return sale_id


CHALLENGE_BITS = 8


async def guarded_sale(session: aiohttp.ClientSession, base: str, settings: Settings) -> str:
    """A live, preloaded sale that asks a CHALLENGE_BITS proof of work at join."""
    return await _live_sale(session, base, settings, "bench gateway, guarded",
                            join_challenge=CHALLENGE_BITS)  # fmt: skip


def solved_join(buyers: Signer, challenges: Signer, sale_id: str, buyer: str) -> dict[str, str]:
    """A new buyer's join headers with a solved challenge, as a browser would send them."""
    challenge = challenges.sign(
        {"s": sale_id, "sub": buyer, "n": os.urandom(12).hex(), "d": CHALLENGE_BITS}, 120
    )
    return {"Authorization": "Bearer " + buyers.sign({"sub": buyer}, 600), "X-Challenge": challenge,
            "X-Challenge-Solution": solution(challenge, CHALLENGE_BITS)}  # fmt: skip


def storefront_key() -> tuple[Any, str]:
    """A storefront's ES256 signing key, and a JWKS file with its public half for the
    gateway (``FLASHSALE_BUYER_JWKS``)."""
    import json  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import jwt  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"keys": [{**public, "kid": "bench", "alg": "ES256"}]}, handle)
    return key, handle.name


def storefront_jwt(key: Any, buyer: str) -> str:
    import jwt  # noqa: PLC0415

    return jwt.encode({"sub": buyer, "exp": int(time.time()) + 600}, key, algorithm="ES256",
                      headers={"kid": "bench"})  # fmt: skip


async def admitted_buyers(settings: Settings, sale_id: str, count: int
                    ) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:  # fmt: skip
    """``count`` buyers queued and admitted straight through the waiting room's scripts, and
    for each the headers and body of its one reservation request (buyer token, admission
    token as the gateway signs it, a fresh idempotency key)."""
    client = redis_client(settings)
    queue, keys = QueueScripts(client), SaleKeys(sale_id)
    try:
        buyers = [f"bench-reserver-{os.urandom(6).hex()}" for _ in range(count)]
        positions: list[int] = []
        for start in range(0, count, MAX_JOIN_BATCH):
            joined = await queue.join(keys, buyers[start : start + MAX_JOIN_BATCH])
            positions += [j.position or 0 for j in joined]
        token = await queue.acquire(keys, "bench-gateway", 60_000)
        await queue.advance(keys, token, serving=max(positions), cutoff=None, sold_out=False,
                            published={})  # fmt: skip
    finally:
        await client.aclose()
    signers = Signers.from_settings(settings)
    deadline = int(time.time() * 1000) + 3_600_000
    body = {"sku": SKU, "quantity": 1, "payment_token": "tok_bench"}
    return iter([
        ({"Authorization": "Bearer " + signers.buyer.sign({"sub": buyer}, 3600),
          "X-Admission-Token": signers.admission.sign(
              {"s": sale_id, "sub": buyer, "p": position, "d": deadline}, 3600),
          "Idempotency-Key": f"k{position}"}, body)
        for buyer, position in zip(buyers, positions, strict=True)
    ])  # fmt: skip


async def waiting_tickets(settings: Settings, sale_id: str, count: int) -> Iterator[str]:
    """The tickets of ``count`` buyers queued behind the admitted ones (still waiting: a poll
    is answered with a position and an ETA, no admission token), polled in turn. They join
    through the waiting room's script and their tickets are signed as the gateway signs them,
    lasting until the sale's end and its grace (what a poll costs does not depend on whether
    the join went through this client; a ticket that ends sooner is signed again at each
    poll, as only a sale moved later makes a buyer's poll)."""
    client = redis_client(settings)
    queue = QueueScripts(client)
    try:
        buyers = [f"bench-poller-{os.urandom(6).hex()}" for _ in range(count)]
        positions: list[int] = []
        for start in range(0, count, MAX_JOIN_BATCH):
            joined = await queue.join(SaleKeys(sale_id), buyers[start : start + MAX_JOIN_BATCH])
            positions += [j.position or 0 for j in joined]
    finally:
        await client.aclose()
    signer = Signer.from_setting(settings.secret.reveal(), "ticket")
    claims = [{"s": sale_id, "sub": buyer, "p": position}
              for buyer, position in zip(buyers, positions, strict=True)]  # fmt: skip
    return itertools.cycle([signer.sign(c, SALE_S + TICKET_GRACE_S) for c in claims])
