"""The Redis key layout. Every key of one SKU shares one hash tag, so each script touches one slot.

    fs:{<sale>:<sku>}:meta       hash   sale/SKU configuration copied from Postgres by preload
    fs:{<sale>:<sku>}:stock      hash   total, available, active, paying, sold (units)
    fs:{<sale>:<sku>}:holds      hash   reservation id -> hold record (flashsale.records)
    fs:{<sale>:<sku>}:deadlines  zset   one member per reserve batch (its ids joined by \x1f),
                                        scored by the batch's hold deadline (ms, Redis TIME)
    fs:{<sale>:<sku>}:buyers     hash   buyer id -> units counted against the per-buyer limit
    fs:{<sale>:<sku>}:idem       hash   buyer \x1f idempotency key -> first answer (records)
    fs:{<sale>:<sku>}:outbox     stream reservation events for the relay (flashsale.events)
    fs:{<sale>}:sale             hash   sale-level configuration and status (put by preload)
    fs:{<sale>}:queue            hash   waiting-room counters: live, pre, tail, sealed,
                                        shuffled, serving, cutoff, sold_out, rates (see
                                        lua/join.lua, lua/put_sale.lua)
    fs:{<sale>}:members          hash   buyer id -> queue position (0: in the pre-queue)
    fs:{<sale>}:steps            zset   admission steps: member "<to>:<at_ms>", score <to>
    fs:{<sale>}:claims           zset   used admissions: a claim member (flashsale.records)
    fs:{<sale>}:lease            string the admission pump's leader lease "<owner>\x1f<token>"
    fs:{<sale>}:fence            string the last fencing token handed out
    fs:rl:{<subject>}            string GCRA theoretical arrival time of one rate-limited subject

Sale and SKU ids are restricted (see :data:`ID_PATTERN`) so no id can break a hash tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "fs"
# \Z, not $: with match(), $ would let a trailing newline through.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@dataclass(frozen=True, slots=True)
class SkuKeys:
    sale_id: str
    sku: str

    @property
    def tag(self) -> str:
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


def rate_limit_key(subject: str) -> str:
    """One GCRA key per limited subject (``ip:1.2.3.4``, ``buyer:alice``), in its own slot."""
    return f"{PREFIX}:rl:{{{subject}}}"
