"""The Redis key layout. Every key of one SKU shares one hash tag, so each script touches one slot.

A SKU split into B stock buckets (``"buckets": B``) has B such groups of keys: bucket 0 under
the tag ``{<sale>:<sku>}``, bucket b > 0 under ``{<sale>:<sku>:<b>:<salt>}``, the salt being
the first number that puts the bucket's slot b/B of the slot space after bucket 0's (within
``SPREAD_SLOTS``): on a cluster whose primaries hold equal runs of slots, B buckets on B
primaries get one each (:func:`bucket_tag`). Each bucket is a whole allocator of its own
(stock, holds, buyers, idempotency answers, outbox); a buyer always goes to the bucket
:func:`bucket_for` picks.

    fs:{<sale>:<sku>}:meta       hash   sale/SKU configuration copied from Postgres by preload
    fs:{<sale>:<sku>}:stock      hash   total, available, active, paying, sold (units)
    fs:{<sale>:<sku>}:holds      hash   reservation id -> hold record (flashsale.records)
    fs:{<sale>:<sku>}:deadlines  zset   one member per reserve batch (its ids joined by \x1f),
                                        scored by the batch's hold deadline (ms, Redis TIME)
    fs:{<sale>:<sku>}:buyers     hash   buyer id -> units counted against the per-buyer limit
    fs:{<sale>:<sku>}:idem       hash   buyer \x1f idempotency key -> first answer (records)
    fs:{<sale>:<sku>}:outbox     stream reservation events for the relay (flashsale.events)
    fs:{<sale>:<sku>}:transfers  hash   stock lent to another bucket, not yet finished:
                                        transfer id -> "<to bucket>\x1f<units>\x1f<lent at ms>"
    fs:{<sale>:<sku>}:received   hash   transfer id -> units, for every transfer credited to
                                        this bucket (a credit is applied once per id)
    fs:{<sale>}:sale             hash   sale-level configuration, status and pauses (put by
                                        preload; lua/set_status.lua)
    fs:{<sale>}:queue            hash   waiting-room counters: live, pre, tail, sealed,
                                        shuffled, serving, cutoff, sold_out, rates (see
                                        lua/join.lua, lua/put_sale.lua)
    fs:{<sale>}:members          hash   buyer id -> queue position (0: in the pre-queue)
    fs:{<sale>}:steps            zset   admission steps: member "<to>:<at_ms>", score <to>
    fs:{<sale>}:claims           zset   used admissions: a claim member (flashsale.records)
    fs:{<sale>}:lease            string the admission pump's leader lease "<owner>\x1f<token>"
    fs:{<sale>}:fence            string the last fencing token handed out
    fs:rl:{<subject>}            string GCRA theoretical arrival time of one rate-limited subject
    fs:allocator:discovered      string the sales an allocator last read from Postgres (JSON:
                                        live and holding, each sale with its SKUs and buckets),
                                        for an allocator started while Postgres is down
    fs:probe                     string written by each readiness check, kept for a second:
                                        that the server takes writes (flashsale.ops_endpoints)

Archiving an ended sale (``lua/archive.lua``) deletes members, steps, claims and each
bucket's holds, deadlines, buyers, idem and received; the others stay.

Sale and SKU ids are restricted (see :data:`ID_PATTERN`) so no id can break a hash tag.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

PREFIX = "fs"
# \Z, not $: with match(), $ would let a trailing newline through.
ID_CHARACTERS = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # a sale's or a SKU's id
ID_PATTERN = re.compile(ID_CHARACTERS + r"\Z")
MAX_BUCKETS = 64
SPREAD_SLOTS = 8  # how far a bucket's slot may be from its place (see bucket_tag)
DISCOVERED = f"{PREFIX}:allocator:discovered"
PROBE = f"{PREFIX}:probe"  # written by the readiness probes, for a second


@dataclass(frozen=True, slots=True)
class SkuKeys:
    """The keys of one SKU, or of one of its ``buckets`` stock buckets (``bucket`` > 0). The
    number of buckets only places the tag (it is fixed per SKU), so it is not compared."""

    sale_id: str
    sku: str
    bucket: int = 0
    buckets: int = field(default=1, compare=False)

    @property
    def tag(self) -> str:
        if self.bucket:
            return f"{PREFIX}:{{{bucket_tag(self.sale_id, self.sku, self.bucket, self.buckets)}}}"
        return f"{PREFIX}:{{{self.sale_id}:{self.sku}}}"

    @property
    def meta(self) -> str:
        return f"{self.tag}:meta"

    @property
    def stock(self) -> str:
        return f"{self.tag}:stock"

    @property
    def holds(self) -> str:
        return f"{self.tag}:holds"

    @property
    def deadlines(self) -> str:
        return f"{self.tag}:deadlines"

    @property
    def buyers(self) -> str:
        return f"{self.tag}:buyers"

    @property
    def idem(self) -> str:
        return f"{self.tag}:idem"

    @property
    def outbox(self) -> str:
        return f"{self.tag}:outbox"

    @property
    def transfers(self) -> str:
        return f"{self.tag}:transfers"

    @property
    def received(self) -> str:
        return f"{self.tag}:received"

    def all(self) -> list[str]:
        return [
            self.meta,
            self.stock,
            self.holds,
            self.deadlines,
            self.buyers,
            self.idem,
            self.outbox,
        ]


@dataclass(frozen=True, slots=True)
class SaleKeys:
    sale_id: str

    @property
    def tag(self) -> str:
        return f"{PREFIX}:{{{self.sale_id}}}"

    @property
    def sale(self) -> str:
        return f"{self.tag}:sale"

    @property
    def queue(self) -> str:
        return f"{self.tag}:queue"

    @property
    def members(self) -> str:
        return f"{self.tag}:members"

    @property
    def steps(self) -> str:
        return f"{self.tag}:steps"

    @property
    def claims(self) -> str:
        return f"{self.tag}:claims"

    @property
    def lease(self) -> str:
        return f"{self.tag}:lease"

    @property
    def fence(self) -> str:
        return f"{self.tag}:fence"

    def all(self) -> list[str]:
        return [self.sale, self.queue, self.members, self.steps, self.claims, self.lease,
                self.fence]  # fmt: skip


def bucket_keys(sale_id: str, sku: str, buckets: int) -> list[SkuKeys]:
    """The keys of every stock bucket of a SKU, bucket 0 first."""
    return [SkuKeys(sale_id, sku, b, buckets) for b in range(buckets)]


@lru_cache(maxsize=65536)
def bucket_tag(sale_id: str, sku: str, bucket: int, buckets: int) -> str:
    """The hash tag (without braces) of stock bucket ``bucket`` > 0 of ``buckets``:
    ``<sale>:<sku>:<bucket>:<salt>``, the salt being the first number that puts its slot
    within ``SPREAD_SLOTS`` of bucket 0's slot plus ``bucket / buckets`` of the slot space.
    Bucket 0's slot falls anywhere in its primary's run of slots; the others fall at the same
    place in the runs after it, so B buckets on B primaries with equal runs get one primary
    each (two only when bucket 0 sits within ``SPREAD_SLOTS`` of a run's end). About a
    thousand CRC-16 tries, once per bucket and process."""
    base = f"{sale_id}:{sku}"
    target = key_slot(base.encode()) + round(bucket * REDIS_CLUSTER_HASH_SLOTS / buckets)
    for salt in range(1_000_000):
        tag = f"{base}:{bucket}:{salt}"
        gap = (key_slot(tag.encode()) - target) % REDIS_CLUSTER_HASH_SLOTS
        if gap <= SPREAD_SLOTS or gap >= REDIS_CLUSTER_HASH_SLOTS - SPREAD_SLOTS:
            return tag
    raise AssertionError("CRC-16 covers every slot")  # pragma: no cover


def bucket_for(buyer_id: str, buckets: int) -> int:
    """The bucket a buyer reserves from: a stable hash of the buyer id (CRC-32), the same in
    every process and release, so a buyer's per-buyer count lives in one bucket."""
    return zlib.crc32(buyer_id.encode()) % buckets if buckets > 1 else 0


def challenge_key(nonce: str) -> str:
    """A used join challenge (its nonce), in its own slot; it expires with the challenge."""
    return f"{PREFIX}:pow:{{{nonce}}}"


def rate_limit_key(subject: str) -> str:
    """One GCRA key per limited subject (``ip:1.2.3.4``, ``buyer:alice``), in its own slot."""
    return f"{PREFIX}:rl:{{{subject}}}"
