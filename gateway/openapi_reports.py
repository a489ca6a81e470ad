"""The schemas of the admin API's reports in the gateway's OpenAPI document: a sale's status
with its waiting room, its audit and its archiving."""

from __future__ import annotations

from gateway.openapi_schemas import ID, NULLABLE_INT, SALE, TIME, obj

# Points of the live page's curves: [unix seconds, count].
CURVE = {
    "type": "array",
    "items": {
        "type": "array",
        "items": {"type": "number"},
        "minItems": 2,
        "maxItems": 2,
    },
}
# The live page's SKUs without Redis counts, for one reason: how many, the first few named.
UNCOUNTED = obj({"count": {"type": "integer", "minimum": 0},
                 "skus": {"type": "array", "items": ID, "maxItems": 5}},
                ["count", "skus"])  # fmt: skip

# The waiting room as operators read it (allocator.queue_view.QueueView.summary).
ROOM = obj(
    {
        "live": {
            "type": "boolean",
            "description": "the waiting room is open in Redis (preloaded, not lost)",
        },
        "pre_queue": {"type": "integer", "description": "registered for the draw"},
        "waiting": {
            "type": "integer",
            "description": "in line and may still be admitted (none once sold out)",
        },
        "admitted": {"type": "integer", "description": "places admitted so far"},
        "joined": {"type": "integer", "description": "places handed out"},
        "cutoff": {
            "type": ["integer", "null"],
            "description": "the last place the pump will ever admit",
        },
        "sold_out": {"type": "boolean"},
        "sold_out_at": {"type": ["string", "null"], "format": "date-time"},
        "closed_to_newcomers": {
            "type": "boolean",
            "description": "a buyer joining now is told sold_out: sold out, or the line "
            "reaches the cutoff",
        },
        "stranded": {
            "type": "integer",
            "description": "units free that nobody can buy any more: the line reached the "
            "cutoff and nobody in it is left to admit or within a turn",
        },
        "max_queue": {
            "type": "integer",
            "description": "the sale's queue cap: buyers not admitted yet the line holds",
        },
        "full": {
            "type": "boolean",
            "description": "a buyer joining now is turned away with 503 queue_full: the line "
            "holds max_queue buyers not admitted yet (a cap raised by PATCH lets more in)",
        },
    },
    [
        "live",
        "waiting",
        "admitted",
        "joined",
        "sold_out",
        "closed_to_newcomers",
        "stranded",
        "max_queue",
        "full",
    ],
)
# ... and as the live sale page reads it, with the pump's figures.
LIVE_ROOM = {
    **ROOM,
    "properties": {
        **ROOM["properties"],
        "admission_rate": {"type": "integer", "description": "buyers admitted per second"},
        "admitted_per_s": {
            "type": ["number", "null"],
            "description": "admissions per second the pump measured while buyers waited (the "
            "median of its 1 s windows), which the ETAs quote; null while nobody has waited",
        },
        "noshow_ratio": {
            "type": "number",
            "description": "the share of admitted buyers the pump expects not to reserve, "
            "learned from the turns that ended, from 0.2 before any has",
        },
    },
}
ARCHIVE_DUE = {
    "oneOf": [TIME, {"type": "null"}],
    "description": "when the reconciler archives the ended sale (FLASHSALE_ARCHIVE_AFTER after "
    "its end); null before its end, once archived, or never",
}
SALE_STATUS = obj(
    {
        "sale": SALE,
        "skus": {
            "type": "array",
            "items": obj(
                {
                    "sku": ID,
                    "stock_total": {"type": "integer"},
                    "available": NULLABLE_INT,
                    "held": NULLABLE_INT,
                    "sold": NULLABLE_INT,
                    "active": NULLABLE_INT,
                    "paying": NULLABLE_INT,
                    "confirmed": {"type": "integer"},
                    "orders": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "preloaded": {"type": "boolean"},
                    "lost": {"type": "boolean"},
                    "buckets": {"type": "integer"},
                    "by_bucket": {"type": "array", "items": {"type": ["object", "null"]}},
                    "in_transit": {
                        "type": "integer",
                        "description": "a SKU in stock buckets: "
                        "units on their way between two, counted in available",
                    },
                },
                ["sku", "stock_total", "available", "held", "sold", "confirmed", "preloaded"],
            ),
        },
        "revenue": {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "description": "the confirmed orders' amounts by currency, in minor units (of "
            "the SKU asked alone, with ?sku=)",
        },
        "queue": ROOM,
        "archive_due_at": ARCHIVE_DUE,
    },
    ["sale", "skus", "revenue", "queue", "archive_due_at"],
)
ARCHIVED = obj(
    {
        "sale_id": ID,
        "archived_at": TIME,
        "buckets": {"type": "integer", "description": "stock buckets cleared"},
        "already": {
            "type": "boolean",
            "description": "archived before: this call only finished clearing its Redis state",
        },
        "freed_bytes": {
            "type": "integer",
            "description": "what Redis reported the deleted keys used (MEMORY USAGE)",
        },
    },
    ["sale_id", "archived_at", "buckets", "already", "freed_bytes"],
)
AUDIT = obj(
    {
        "passed": {"type": "boolean"},
        "sale_id": ID,
        "invariants": {
            "type": "array",
            "items": obj(
                {"name": {"type": "string"}, "passed": {"type": "boolean"},
                 "details": {"type": "object"}},
                ["name", "passed", "details"],
            ),
        },
        "facts": {"type": "object"},
    },
    ["passed", "invariants"],
)  # fmt: skip
