"""Provable fairness of the pre-queue: what is published, per-buyer proofs, and the check.

Before the start a sale publishes the commitment to its shuffle seed. Once the pre-queue is
shuffled (:mod:`flashsale.shuffle`), the engine records its members (hashed buyer ids) in
position order, with a Merkle root over them. From then on anyone can fetch:

* the seed (after the start), the commitment, the rule, the members in position order and the
  root, and recompute every position (:func:`problems` says what does not hold);
* a buyer, their own member's Merkle path: proof that the committed order puts them at their
  position (:func:`path_holds`), without the whole list.

The Merkle tree: leaf = sha256(0x00 || member), node = sha256(0x01 || left || right), both as
raw bytes of the hex digests; a node without a partner at the end of a level is carried up
unchanged. The empty tree's root is sha256 of nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import asyncpg

from flashsale.shuffle import SHUFFLE_ALGORITHM, rank_members, seed_commitment
from flashsale.wording import counted

MERKLE_RULE = (
    "leaf = sha256(0x00 || member), node = sha256(0x01 || left || right) over the raw digests, "
    "members in position order; a node without a partner is carried up; empty: sha256()"
)


def _leaf(member: str) -> bytes:
    return hashlib.sha256(b"\x00" + bytes.fromhex(member)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(members: list[str]) -> list[list[bytes]]:
    level = [_leaf(m) for m in members]
    levels = [level]
    while len(level) > 1:
        level = [_node(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]  # fmt: skip
        levels.append(level)
    return levels


def merkle_root(members: list[str]) -> str:
    """The root over ``members`` in position order, hex."""
    if not members:
        return hashlib.sha256(b"").hexdigest()
    return _levels(members)[-1][0].hex()


def merkle_path(members: list[str], position: int) -> list[str]:
    """The sibling digests (hex) from the leaf at ``position`` (1-based) up to the root."""
    index, path = position - 1, []
    for level in _levels(members)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling].hex())
        index //= 2
    return path


def path_holds(member: str, position: int, size: int, path: list[str], root: str) -> bool:
    """Whether ``path`` proves ``member`` at ``position`` of ``size`` members under ``root``."""
    if not 1 <= position <= size:
        return False
    digest, index, width, steps = _leaf(member), position - 1, size, iter(path)
    try:
        while width > 1:
            sibling = index ^ 1
            if sibling < width:
                other = bytes.fromhex(next(steps))
                digest = _node(other, digest) if index % 2 else _node(digest, other)
            index, width = index // 2, (width + 1) // 2
    except (StopIteration, ValueError):
        return False
    return next(steps, None) is None and digest.hex() == root


@dataclass(frozen=True, slots=True)
class Published:
    """A sale's fairness record, as the public endpoint serves it."""

    sale_id: str
    commitment: str
    seed: str | None  # revealed once the sale has started
    members: list[str] | None  # None until the pre-queue is shuffled and recorded
    root: str | None
    size: int | None = None  # as recorded with the root
    ended: bool = False  # the sale ended: a record still missing will never be made
    lost: bool = False  # Redis lost the drawn order before it was recorded: it never will be
    unloaded: bool = False  # open, but never preloaded: nothing is drawn until it is

    @property
    def missing_why(self) -> str:
        """Why ``members`` is None, in words for a buyer or an operator."""
        if self.lost:
            return (
                "Redis lost the waiting room after its pre-queue was drawn and before the "
                "order was recorded: there is no order to verify"
            )
        if self.ended:
            return (
                "the sale ended before its pre-queue order was recorded: there is no order "
                "to verify"
            )
        if self.unloaded:
            return (
                "the pre-queue is not drawn and recorded yet: the sale is open but was "
                "never preloaded (`flashsale sale preload`), and its draw happens then"
            )
        return "the pre-queue is not drawn and recorded yet: that happens at the opening"

    def json(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        members = self.members or []
        end = len(members) if limit is None else min(len(members), offset + limit)
        return {
            "sale_id": self.sale_id, "algorithm": SHUFFLE_ALGORITHM, "merkle": MERKLE_RULE,
            "commitment": self.commitment, "seed": self.seed,
            "recorded": self.members is not None, "ended": self.ended, "lost": self.lost,
            "size": self.size if self.size is not None else len(members), "root": self.root,
            "offset": offset, "members": members[offset:end],
            "next_offset": end if end < len(members) else None,
        }  # fmt: skip


def problems(commitment: str, seed: str | None, members: list[str], root: str | None,
             size: int | None = None) -> list[str]:  # fmt: skip
    """What does not hold in a published shuffle; empty when it all checks out."""
    found = []
    if seed is None:
        return ["the seed is not revealed yet (the sale has not started)"]
    if seed_commitment(seed) != commitment:
        found.append("the revealed seed does not match the commitment published before the start")
    if size is not None and size != len(members):
        found.append(f"the record names {size} members but lists {len(members)}")
    ranked = rank_members(seed, members)
    moved = [i + 1 for i, (a, b) in enumerate(zip(members, ranked, strict=True)) if a != b]
    if moved:
        are = "is" if len(moved) == 1 else "are"
        found.append(f"{counted(len(moved), 'position')} {are} not where the seed puts them "
                     f"(first: position {moved[0]})")  # fmt: skip
    if root is None or merkle_root(members) != root:
        found.append("the members do not hash to the published Merkle root")
    return found


_SALE = """
SELECT shuffle_seed, shuffle_commitment, starts_at <= now() AS started, prequeue_root,
       prequeue_size, (status = 'ended' OR ends_at <= now()) AS ended,
       prequeue_lost_at IS NOT NULL AND prequeue_root IS NULL AS lost,
       starts_at <= now() AND preloaded_at IS NULL AS unloaded
FROM sales WHERE id = $1
"""
_MEMBERS = "SELECT member FROM prequeue_members WHERE sale_id = $1 ORDER BY position"


async def published(pool: asyncpg.Pool, sale_id: str) -> Published | None:
    """The fairness record of ``sale_id`` from Postgres; None for an unknown sale."""
    row = await pool.fetchrow(_SALE, sale_id)
    if row is None:
        return None
    members = None
    if row["prequeue_root"] is not None:
        members = [r["member"] for r in await pool.fetch(_MEMBERS, sale_id)]
    commitment = row["shuffle_commitment"] or seed_commitment(row["shuffle_seed"])
    return Published(sale_id, commitment, row["shuffle_seed"] if row["started"] else None,
                     members, row["prequeue_root"], row["prequeue_size"],
                     row["ended"], row["lost"], row["unloaded"])  # fmt: skip


async def record_lost(pool: asyncpg.Pool, sale_id: str) -> None:
    """Mark the pre-queue's order of ``sale_id`` as never to be recorded (Redis lost the
    drawn positions first); nothing changes once it is recorded."""
    await pool.execute(
        "UPDATE sales SET prequeue_lost_at = coalesce(prequeue_lost_at, now())"
        " WHERE id = $1 AND prequeue_root IS NULL", sale_id,
    )  # fmt: skip


async def record(pool: asyncpg.Pool, sale_id: str, members: list[str]) -> str:
    """Record the pre-queue's members in position order and their root (once: a second
    record of the same sale changes nothing). Returns the root."""
    root = merkle_root(members)
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.fetchval(
            "SELECT prequeue_root FROM sales WHERE id = $1 FOR UPDATE", sale_id
        )
        if done is not None:
            return str(done)
        await conn.execute(
            "INSERT INTO prequeue_members (sale_id, position, member)"
            " SELECT $1, p, m FROM unnest($2::text[]) WITH ORDINALITY AS t(m, p)",
            sale_id, members,
        )  # fmt: skip
        await conn.execute(
            "UPDATE sales SET prequeue_root = $2, prequeue_size = $3 WHERE id = $1",
            sale_id, root, len(members),
        )  # fmt: skip
    return root
