"""The post-sale audit: every invariant of DESIGN §7 for one sale, against Redis, Postgres, the
broker (consumer lag) and the payment provider.

Each invariant is reported by name with ``passed`` and ``details`` (counts, and the offending
ids, at most :data:`reconciler.report.SHOWN` of them). ``passed`` for the whole report only
when every one holds.
Checks that need the pipeline drained (Redis sold equal to Postgres confirmed, every hold with
its order) fail with "not drained" while events are still in flight: run it after the sale.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import orjson

from allocator.ids import hold_keys
from allocator.redis_calls import Command, hash_pairs, read_packed
from allocator.stock_buckets import BucketScripts
from flashsale.clients import RedisClient
from flashsale.errors import PaymentError, Unavailable
from flashsale.kafka import consumer_lag
from flashsale.keys import SaleKeys, bucket_keys
from flashsale.orders import HOLD_FOR, TERMINAL
from flashsale.payments import Charge, PaymentProvider
from flashsale.queue_marks import highest
from flashsale.records import ClaimMember, HoldRecord, text
from flashsale.sales import fetch_sale, fetch_skus, sale_state, unknown_sale
from flashsale.settings import ENGINE_ENV_FILE, Settings
from flashsale.timefmt import iso
from flashsale.wording import counted
from reconciler.reconcile import would_repair
from reconciler.report import AuditReport, Invariant

COUNTERS = ("total", "available", "active", "paying", "sold")
READ_SKUS = 5000  # SKUs read from Redis at a time

_ORDERS = """
SELECT o.id, o.sale_id, o.sku, o.buyer_id, o.quantity, o.state, o.admission_id, o.idempotency_key,
       o.payment_token, p.state AS payment,
       (SELECT count(*) FROM order_events e WHERE e.order_id = o.id
          AND e.to_state IN ('CONFIRMED', 'PAYMENT_FAILED', 'EXPIRED', 'CANCELLED')
          AND e.from_state IS DISTINCT FROM e.to_state) AS terminal_events
FROM orders o LEFT JOIN payments p ON p.idempotency_key = o.id
WHERE o.sale_id = $1
"""


async def audit_sale(
    pool: asyncpg.Pool,
    client: RedisClient,
    provider: PaymentProvider | None,
    settings: Settings,
    sale_id: str,
    *,
    stage: Callable[[str], None] = lambda doing: None,
) -> AuditReport:
    """Check DESIGN §7 for ``sale_id``, naming each stage to ``stage`` as it begins (13 s for
    a sale of 200,000 SKUs); an archived sale's is the report recorded when it was archived
    (reconciler/archive.py: Redis no longer has what it read). Raises NotFound for an unknown
    sale."""
    sale = await fetch_sale(pool, sale_id)
    if sale is None:
        raise await unknown_sale(pool, sale_id)
    if sale["archived_at"] is not None:
        report = AuditReport.parse(orjson.loads(sale["archive_audit"]))
        report.facts["archived_at"] = iso(sale["archived_at"], "seconds")
        report.facts["audited"] = "when archived (Redis no longer holds the per-buyer state)"
        return report
    # A benchmark's sale kept for its orders (loadtest/bench.py): what only Redis held, its
    # counters and admission claims, cannot be checked, and the audit says so.
    cleared = iso(sale["redis_cleared_at"], "seconds")
    unchecked = f"its Redis state was deleted on purpose at {cleared}" if cleared else None
    stage("reading its SKUs and orders")
    skus = {r["sku"]: r for r in await fetch_skus(pool, sale_id)}
    orders = list(await pool.fetch(_ORDERS, sale_id))
    stage("reading Redis")
    redis = await _redis_state(client, sale_id, list(skus.values()))
    stage("asking the payment provider for the sale's charges")
    charges, provider_note = await _charges(provider, sale_id, settings)
    stage("reading the consumer lag")
    try:
        lag: int | None = await consumer_lag(
            settings, settings.topics.reservations, settings.consumer_group
        )
    except Unavailable:
        lag = None
    open_orders = [o["id"] for o in orders if o["state"] not in TERMINAL]
    outbox = sum(r["outbox"] for r in redis["skus"].values())
    paying = sum((r["stock"].get("paying") or 0) for r in redis["skus"].values())
    drained = not open_orders and outbox == 0 and paying == 0 and lag == 0
    facts = {
        "sale_state": sale_state(sale),
        "orders": len(orders), "open_orders": len(open_orders), "outbox_entries": outbox,
        "consumer_lag": lag if lag is not None else "broker unreachable",
        "drained": drained, "provider_charges": len(charges) if charges is not None
        else provider_note,
    }  # fmt: skip
    by_sku: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for order in orders:
        by_sku[order["sku"]].append(order)
    not_drained = (f"pipeline not drained: {len(open_orders)} open orders, {outbox} outbox "
                   f"entries, {paying} paying units, consumer lag {lag}")  # fmt: skip
    stage("checking that every reservation traces back to an admission")
    admission = await _admission(pool, sale_id, orders, redis, unchecked)
    stage("checking that a reconcile pass now would change nothing")
    converges = await _converges(pool, client, sale_id)
    invariants = [
        _no_oversell(skus, by_sku, redis),
        _conservation(skus, by_sku, redis, drained, not_drained, unchecked=unchecked),
        _one_terminal_state(orders, redis, drained, not_drained),
        _payments(orders, charges, provider_note),
        _buyer_limit(skus, by_sku, redis),
        _nothing_lost(orders, redis, drained, not_drained),
        admission,
        converges,
    ]
    if cleared:
        facts["redis_cleared_at"] = cleared
        facts["audited"] = ("without its Redis state, deleted on purpose (a benchmark's sale, "
                            "kept for its orders): its counters and admission claims cannot be "
                            "checked")  # fmt: skip
    return AuditReport(sale_id, invariants, facts)


async def _redis_state(client: RedisClient, sale_id: str,
                       skus: list[asyncpg.Record]) -> dict[str, Any]:  # fmt: skip
    """Every SKU's Redis state, its stock buckets merged (``skus``) and one by one
    (``buckets``: counters), and for a SKU in buckets its buckets' totals and the units lent
    and not yet credited, read as of one moment (``moving``). The buckets, in other slots (on
    a cluster, other nodes), are each read at their own moment: a transfer made whole
    between the reads of its two buckets would be in neither, or in both."""
    groups = {r["sku"]: bucket_keys(sale_id, r["sku"], r["buckets"]) for r in skus}
    out: dict[str, Any] = {"skus": {}, "buckets": {}, "moving": {}}
    listed = list(groups.items())
    # Packed in C (through redis-py's pipeline, parsing the answers was most of the 14 s of
    # CPU an audit of a 100,000-SKU sale took), a few thousand SKUs at a time: the raw
    # answers of them all were 150 MB more at once.
    for start in range(0, len(listed), READ_SKUS):
        part = listed[start : start + READ_SKUS]
        commands: list[Command] = []
        for _, group in part:
            for keys in group:
                commands += [("HGETALL", keys.stock), ("HGETALL", keys.holds),
                             ("HGETALL", keys.buyers), ("XLEN", keys.outbox)]  # fmt: skip
        replies = iter(await read_packed(client, commands))
        for sku, group in part:
            out["skus"][sku], out["buckets"][sku] = _sku_state(replies, len(group))
    sale = SaleKeys(sale_id)
    (serving, live), claims = await read_packed(
        client, [("HMGET", sale.queue, "serving", "live"), ("ZRANGE", sale.claims, 0, -1)]
    )
    out["serving"] = int(serving or 0)
    out["live"] = live is not None
    out["claims"] = {text(m) for m in claims}
    spread = {sku: group for sku, group in groups.items() if len(group) > 1}
    cuts = await BucketScripts(client).snapshots(list(spread.values())) if spread else []
    for sku, cut in zip(spread, cuts, strict=True):
        totals = sum(b.counts.total for b in cut.buckets if b.counts is not None)
        out["moving"][sku] = (totals, cut.in_transfer)
    return out


def _sku_state(replies: Iterator[Any], buckets: int) -> tuple[dict[str, Any], list[Any]]:
    """One SKU's state from the next answers of :func:`_redis_state`'s read: its buckets
    merged, and each bucket's counters."""
    merged: dict[str, Any] = {"stock": {}, "holds": {}, "buyers": {}, "outbox": 0}
    per_bucket = []
    for _ in range(buckets):
        stock, holds, buyers, outbox = (next(replies) for _ in range(4))
        counters = {text(k): int(v) for k, v in hash_pairs(stock) if text(k) in COUNTERS}
        per_bucket.append(counters)
        merged["holds"].update({text(k): HoldRecord.parse(v) for k, v in hash_pairs(holds)})
        merged["buyers"].update({text(k): int(v) for k, v in hash_pairs(buyers)})
        merged["outbox"] += int(outbox)
    if buckets == 1 and len(per_bucket[0]) == len(COUNTERS):
        merged["stock"] = per_bucket[0]  # the same counters, not a copy per SKU
    elif all(per_bucket):
        merged["stock"] = {n: sum(b.get(n, 0) for b in per_bucket) for n in COUNTERS}
    return merged, per_bucket


async def _charges(provider: PaymentProvider | None, sale_id: str,
                   settings: Settings) -> tuple[dict[str, Charge] | None, str]:  # fmt: skip
    if provider is None:
        return None, (
            "no payment provider: set FLASHSALE_PSP_URL to the provider's URL, or run the audit "
            f"beside `flashsale up` (it records its simulator in {settings.home / ENGINE_ENV_FILE})"
        )
    charges: dict[str, Charge] = {}
    after = None
    try:
        while True:
            page, more = await provider.list_charges(f"{sale_id}~", after, 1000)
            for charge in page:
                charges[charge.key] = charge
            if page:
                after = page[-1].key
            if not more:
                return charges, ""
    except PaymentError as exc:
        return None, f"provider unreachable: {exc}"


def _no_oversell(skus: dict[str, Any], by_sku: dict[str, list[Any]],
                 redis: dict[str, Any]) -> Invariant:  # fmt: skip
    inv = Invariant("1. no oversell: confirmed units <= stock total, in Postgres and Redis")
    over, counter, redis_over = [], [], []
    for sku, row in skus.items():
        confirmed = sum(o["quantity"] for o in by_sku[sku] if o["state"] == "CONFIRMED")
        if confirmed > row["stock_total"]:
            over.append(sku)
        if row["sold"] != confirmed:
            counter.append(f"{sku} (sold {row['sold']}, confirmed {confirmed})")
        stock = redis["skus"][sku]["stock"]
        if stock and stock.get("sold", 0) > stock.get("total", 0):
            redis_over.append(sku)
        if row["buckets"] > 1:
            confirmed_in = _by_bucket(by_sku[sku], "CONFIRMED")
            for bucket, counters in enumerate(redis["buckets"][sku]):
                if counters and counters.get("sold", 0) > counters.get("total", 0):
                    redis_over.append(f"{sku} bucket {bucket}")
                if counters and confirmed_in.get(bucket, 0) > counters.get("total", 0):
                    over.append(f"{sku} bucket {bucket} (confirmed {confirmed_in[bucket]} > "
                                f"bucket total {counters.get('total', 0)})")  # fmt: skip
    inv.check("oversold_skus_postgres", over)
    inv.check("sold_counter_differs_from_confirmed_orders", counter)
    inv.check("oversold_skus_redis", redis_over)
    return inv


def _by_bucket(orders: list[Any], state: str) -> dict[int, int]:
    """Units of ``orders`` in ``state`` per stock bucket (the bucket their id carries)."""
    units: dict[int, int] = defaultdict(int)
    for order in orders:
        if order["state"] == state:
            units[hold_keys(order["sale_id"], order["sku"], order["id"]).bucket] += order[
                "quantity"
            ]
    return units


def _conservation(skus: dict[str, Any], by_sku: dict[str, list[Any]], redis: dict[str, Any],
                  drained: bool, not_drained: str, *,
                  unchecked: str | None) -> Invariant:  # fmt: skip
    inv = Invariant("2. conservation: total = available + held + sold; Redis sold = Postgres "
                    "confirmed once drained")  # fmt: skip
    if unchecked is not None:
        inv.fail("not_checked", unchecked)
        return inv
    broken, lost, differs = [], [], []
    for sku, row in skus.items():
        stock = redis["skus"][sku]["stock"]
        if row["preloaded_at"] is None:
            continue
        if not stock:
            lost.append(sku)
            continue
        parts = [stock.get(n, 0) for n in ("available", "active", "paying", "sold")]
        total, in_transfer = redis["moving"].get(sku, (stock.get("total", 0), 0))
        if stock.get("total") != sum(parts) or total + in_transfer != row["stock_total"]:
            broken.append(f"{sku} {stock}" + (f" + {in_transfer} in transfer" if in_transfer
                                              else ""))  # fmt: skip
        confirmed = sum(o["quantity"] for o in by_sku[sku] if o["state"] == "CONFIRMED")
        if drained and stock.get("sold", 0) != confirmed:
            differs.append(f"{sku} (redis {stock.get('sold', 0)}, postgres {confirmed})")
        if row["buckets"] > 1:
            confirmed_in = _by_bucket(by_sku[sku], "CONFIRMED")
            for bucket, counters in enumerate(redis["buckets"][sku]):
                parts = [counters.get(n, 0) for n in ("available", "active", "paying", "sold")]
                if counters.get("total") != sum(parts):
                    broken.append(f"{sku} bucket {bucket} {counters}")
                if drained and counters.get("sold", 0) != confirmed_in.get(bucket, 0):
                    differs.append(f"{sku} bucket {bucket} (redis {counters.get('sold', 0)}, "
                                   f"postgres {confirmed_in.get(bucket, 0)})")  # fmt: skip
    inv.check("skus_missing_in_redis", lost)
    inv.check("counters_do_not_add_up", broken)
    inv.check("redis_sold_differs_from_postgres", differs)
    if not drained:
        inv.fail("cannot_compare", not_drained)
    return inv


def _one_terminal_state(orders: list[Any], redis: dict[str, Any], drained: bool,
                        not_drained: str) -> Invariant:  # fmt: skip
    inv = Invariant("3. every reservation ends in exactly one terminal state")
    open_, twice, disagree = [], [], []
    holds = {rid: h for s in redis["skus"].values() for rid, h in s["holds"].items()}
    for order in orders:
        if order["state"] not in TERMINAL:
            open_.append(order["id"])
        elif order["terminal_events"] != 1:
            twice.append(order["id"])
        hold = holds.get(order["id"])
        if hold is not None and HOLD_FOR.get(order["state"], hold.state) != hold.state:
            disagree.append(f"{order['id']} (order {order['state']}, hold {hold.state})")
    unfinished = [rid for rid, h in holds.items() if h.state in ("ACTIVE", "PAYING")]
    inv.check("orders_not_terminal", open_)
    inv.check("orders_with_other_than_one_terminal_event", twice)
    inv.check("hold_and_order_disagree", disagree)
    inv.check("holds_not_terminal", unfinished)
    if not drained and not (open_ or unfinished):
        inv.fail("cannot_conclude", not_drained)
    return inv


def _payments(orders: list[Any], charges: dict[str, Charge] | None, note: str) -> Invariant:
    inv = Invariant("4. at most one capture per reservation; every capture confirmed or "
                    "refunded; every confirmed order captured")  # fmt: skip
    state = {o["id"]: o for o in orders}
    confirmed = {o["id"] for o in orders if o["state"] == "CONFIRMED"}
    recorded_capture = {o["id"] for o in orders if o["payment"] == "CAPTURED"}
    if charges is None:
        inv.fail("provider", note)
        missing = confirmed - recorded_capture
        if missing:
            inv.fail("confirmed_without_recorded_capture", sorted(missing))
        return inv
    captured = {k for k, c in charges.items() if c.status == "captured"}
    refunded = {k for k, c in charges.items() if c.status == "refunded"}
    orphans = sorted(k for k in captured if k not in confirmed)
    unrecorded = sorted(k for k in refunded
                        if k not in state or state[k]["payment"] != "REFUNDED")  # fmt: skip
    uncaptured = sorted(confirmed - captured)
    double = sorted(k for k in refunded & confirmed)
    inv.check("captures_without_confirmed_order", orphans)
    inv.check("refunds_not_recorded", unrecorded)
    inv.check("confirmed_orders_without_capture", uncaptured)
    inv.check("confirmed_orders_refunded", double)
    inv.details.setdefault("captures", len(captured))
    inv.details.setdefault("refunds", len(refunded))
    return inv


def _buyer_limit(skus: dict[str, Any], by_sku: dict[str, list[Any]],
                 redis: dict[str, Any]) -> Invariant:  # fmt: skip
    inv = Invariant("5. per-buyer limit holds")
    over = []
    for sku, row in skus.items():
        units: dict[str, int] = defaultdict(int)
        for order in by_sku[sku]:
            if order["state"] in ("CONFIRMED", "PAYING", "PENDING"):
                units[order["buyer_id"]] += order["quantity"]
        for rid, hold in redis["skus"][sku]["holds"].items():
            if hold.state == "ACTIVE" and rid not in {o["id"] for o in by_sku[sku]}:
                units[hold.buyer_id] += hold.quantity
        limit = row["per_buyer_limit"]
        over += [f"{sku}/{b} ({n} > {limit})" for b, n in units.items() if n > limit]
        over += [f"{sku}/{b} (redis {n} > {limit})"
                 for b, n in redis["skus"][sku]["buyers"].items() if n > limit]  # fmt: skip
    inv.check("buyers_over_limit", over)
    return inv


def _nothing_lost(orders: list[Any], redis: dict[str, Any], drained: bool,
                  not_drained: str) -> Invariant:  # fmt: skip
    inv = Invariant("6. nothing acknowledged is lost: every granted reservation has its order")
    known = {o["id"] for o in orders}
    holds = {rid for s in redis["skus"].values() for rid in s["holds"]}
    missing = sorted(holds - known)
    if missing and drained:
        inv.fail("holds_without_order", missing)
    elif missing:
        inv.fail(
            "cannot_conclude", f"{counted(len(missing), 'hold')} not yet orders; {not_drained}"
        )
    inv.details.setdefault("reservations", len(holds | known))
    return inv


async def _admission(pool: asyncpg.Pool, sale_id: str, orders: list[Any],
                     redis: dict[str, Any], unchecked: str | None) -> Invariant:  # fmt: skip
    inv = Invariant("7. every reservation traces back to a valid admission")
    if unchecked is not None:  # only an admission that is no queue position can be told
        inv.check("reservations_beyond_admission",
                  [f"{o['id']} (admission {o['admission_id']!r})" for o in orders
                   if not o["admission_id"].isdigit()])  # fmt: skip
        inv.fail("not_checked", unchecked)
        return inv
    serving = max(redis["serving"], (await highest(pool, sale_id)).serving)
    beyond, unclaimed = [], []
    for order in orders:
        admission = order["admission_id"]
        if not admission.isdigit():
            beyond.append(f"{order['id']} (admission {admission!r})")
            continue
        if int(admission) > serving:
            beyond.append(f"{order['id']} (position {admission} > serving {serving})")
        member = ClaimMember.of(int(admission), order["idempotency_key"], order["sku"],
                                order["quantity"], order["payment_token"])  # fmt: skip
        if order["idempotency_key"] and member.encode() not in redis["claims"]:
            unclaimed.append(order["id"])
    inv.check("reservations_beyond_admission", beyond)
    inv.check("reservations_without_claim", unclaimed)
    return inv


async def _converges(pool: asyncpg.Pool, client: RedisClient, sale_id: str) -> Invariant:
    inv = Invariant("8. reconciliation converges: a pass now would change nothing")
    inv.check("would_repair", await would_repair(pool, client, [sale_id]))
    return inv
