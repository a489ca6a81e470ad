"""The join challenge's rule, for the gateway that checks it and the clients that solve it (the
spike's buyers, the benchmarks): a decimal number S such that ``sha256(challenge + ":" + S)``
starts with ``difficulty`` zero bits."""

from __future__ import annotations

import hashlib
import itertools

MAX_SOLUTION_DIGITS = 20
RULE = ("find a decimal number S such that sha256(challenge + ':' + S) starts with "
        "`difficulty` zero bits")  # fmt: skip


def leading_zero_bits(digest: bytes) -> int:
    bits = 0
    for byte in digest:
        if byte:
            return bits + 8 - byte.bit_length()
        bits += 8
    return bits


def solves(challenge: str, solution: str, difficulty: int) -> bool:
    """Whether ``solution`` solves ``challenge`` at ``difficulty`` bits."""
    if not (solution.isdigit() and len(solution) <= MAX_SOLUTION_DIGITS):
        return False
    digest = hashlib.sha256(f"{challenge}:{solution}".encode()).digest()
    return leading_zero_bits(digest) >= difficulty


def solution(challenge: str, difficulty: int) -> str:
    """The least solution of ``challenge`` at ``difficulty`` bits, found as a client finds one
    (about 2^difficulty tries)."""
    return next(str(n) for n in itertools.count() if solves(challenge, str(n), difficulty))
