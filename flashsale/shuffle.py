"""The pre-queue's verifiable order: buyers who joined before the start are ranked by a seeded
hash. The seed's SHA-256 is published before the start and the seed after it, so anyone can
recompute the order."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SHUFFLE_ALGORITHM = "sort pre-queue buyer ids by hex(sha256(seed || 0x00 || buyer_id))"


def seed_commitment(seed: str) -> str:
    """What is published before the start: SHA-256 of the shuffle seed, hex."""
    return hashlib.sha256(seed.encode()).hexdigest()


def shuffle_order(seed: str, buyers: Iterable[str]) -> list[str]:
    """The pre-queue order: position 1 first. Anyone holding the revealed seed and the buyer
    ids can recompute it (see ``SHUFFLE_ALGORITHM``)."""
    prefix = seed.encode() + b"\x00"
    return sorted(buyers, key=lambda b: (hashlib.sha256(prefix + b.encode()).hexdigest(), b))
