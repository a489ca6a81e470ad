"""The pre-queue's verifiable order.

Buyers who joined before the start are ranked by a seeded hash. The seed's SHA-256 is
published before the start (the commitment) and the seed after it. A buyer is published only
as their *member* hash, ``sha256(sale_id || 0x00 || buyer_id)``: the rank is computed from the
member, so anyone can recompute every position from the seed and the members without learning
another buyer's id, and a buyer finds their own member from their own id. The members in
position order are committed to by a Merkle root (:mod:`flashsale.fairness`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SHUFFLE_ALGORITHM = (
    "member = hex(sha256(sale_id || 0x00 || buyer_id)); the pre-queue's members are ranked by "
    "hex(sha256(seed || 0x00 || member)), ties by member; position 1 first"
)


def seed_commitment(seed: str) -> str:
    """What is published before the start: SHA-256 of the shuffle seed, hex."""
    return hashlib.sha256(seed.encode()).hexdigest()


def member_of(sale_id: str, buyer_id: str) -> str:
    """How a buyer is published: hex SHA-256 of the sale id, a zero byte and the buyer id."""
    return hashlib.sha256(f"{sale_id}\0{buyer_id}".encode()).hexdigest()


def rank_members(seed: str, members: Iterable[str]) -> list[str]:
    """Members in position order (see ``SHUFFLE_ALGORITHM``)."""
    prefix = seed.encode() + b"\x00"
    return sorted(members, key=lambda m: (hashlib.sha256(prefix + m.encode()).hexdigest(), m))


def shuffle_order(seed: str, sale_id: str, buyers: Iterable[str]) -> list[str]:
    """The pre-queue's buyers in position order: position 1 first."""
    by_member = {member_of(sale_id, b): b for b in buyers}
    return [by_member[m] for m in rank_members(seed, by_member)]
