"""``flashsale bench pipeline``: reservations -> CONFIRMED orders per second, end to end.

For each provider latency (0 ms and 50 ms by default) the run starts a payment simulator
(``flashsale psp``) and one ``flashsale workers`` process on topics of its own, relays the
SKU's outbox from this process, and then:

1. **capacity**: grants ``--reservations`` holds at once (the Lua reserve script, batched) and
   times them until the last order is CONFIRMED: relay, broker, workers, payments, Postgres;
2. **latency**: grants holds at half that rate for ``--paced-seconds`` and reports the p50
   and p99 of reserve -> CONFIRMED (Redis ``TIME`` of the hold to the confirming Postgres
   transaction), so queueing behind a backlog does not count as latency.

The ceiling row, measured in the same run, is the broker alone: the same number of messages
of the same size produced and consumed by one consumer, with no effect behind them. Every run
checks that the orders confirmed equal the holds granted and that nothing was oversold.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from allocator.hold_scripts import HoldScripts, ReserveRequest
from allocator.ids import new_reservation_id
from allocator.pump import quantile
from allocator.relay import OutboxRelay, run_relay
from allocator.relay import log as relay_log
from allocator.sale_admin import SaleAdmin
from flashsale.cli.devstack.processes import free_port
from flashsale.clients import pg_pool, redis_client
from flashsale.kafka import client_options, delete_topics, ensure_topics, producer
from flashsale.keys import SkuKeys
from flashsale.records import HoldRecord
from flashsale.salespec import parse_sale
from flashsale.settings import Settings
from flashsale.topics import Topics
from loadtest.bench import Report, Row, Target, discard_sales, inconsistent, machine, table
from loadtest.processes import Servers, wait_healthy

TARGETS = {0.0: 5_000.0, 50.0: 2_000.0}  # orders/s on this 2-core machine
SKU = "BENCH"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    reservations: int = 20_000
    latencies: tuple[float, ...] = (0.0, 50.0)
    concurrency: int = 1000
    paced_seconds: float = 5.0
    patience_s: float = 300.0

    def command(self) -> str:
        """The command line that reproduces a run with these options."""
        latencies = ",".join(f"{x:g}" for x in self.latencies)
        return (f"flashsale bench pipeline --reservations {self.reservations} --latencies "
                f"{latencies} --concurrency {self.concurrency} --paced-seconds "
                f"{self.paced_seconds:g}")  # fmt: skip


@dataclass
class _Run:
    """One provider latency: a fresh sale, topics, psp and worker process."""

    settings: Settings
    sale_id: str
    keys: SkuKeys
    holds: HoldScripts
    servers: Servers
    granted: list[str] = field(default_factory=list)


def _requests(count: int) -> list[ReserveRequest]:
    """``count`` reserve requests, one new buyer each: what gateways would send. Made before
    the clock starts; the buyers' side is not the pipeline's work."""
    return [
        ReserveRequest(new_reservation_id(), f"b-{uuid.uuid4().hex[:12]}", 1,
                       uuid.uuid4().hex[:16], "tok_visa", "bench")
        for _ in range(count)
    ]  # fmt: skip


async def _reserve(run: _Run, requests: list[ReserveRequest]) -> list[str]:
    """Grant the holds of ``requests`` (script calls of 256, as the allocator batches them);
    their ids."""
    chunks = [requests[i : i + 256] for i in range(0, len(requests), 256)]
    results = await asyncio.gather(*(run.holds.reserve(run.keys, c) for c in chunks))
    ids = [r.reservation_id for batch in results for r in batch if r.reservation_id]
    if len(ids) != len(requests):
        raise RuntimeError(f"only {len(ids)} of {len(requests)} holds were granted")
    run.granted += ids
    return ids


async def _confirmed(pool: object, sale_id: str) -> int:
    return int(await pool.fetchval(  # type: ignore[attr-defined]
        "SELECT count(*) FROM orders WHERE sale_id = $1 AND state = 'CONFIRMED'", sale_id
    ))  # fmt: skip


async def _sold(pool: object, sale_id: str) -> int:
    return int(await pool.fetchval(  # type: ignore[attr-defined]
        "SELECT sold FROM sale_skus WHERE sale_id = $1 AND sku = $2", sale_id, SKU
    ))  # fmt: skip


async def _wait_confirmed(pool: object, sale_id: str, total: int, patience: float) -> float:
    """Monotonic time at which ``total`` orders of the sale were CONFIRMED. Polls the SKU's
    sold counter (one row, moved in the confirming transaction; every order is one unit):
    counting the orders themselves every 20 ms took a large share of Postgres from the
    pipeline it measures. The orders are counted once at the end."""
    deadline = time.monotonic() + patience
    while True:
        if await _sold(pool, sale_id) >= total:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"orders not all confirmed within {patience:g}s")
        await asyncio.sleep(0.02)


async def _latencies_ms(run: _Run, pool: object, ids: list[str]) -> list[float]:
    raw = await run.holds.holds([(run.keys, rid) for rid in ids])
    reserved = {rid: HoldRecord.parse(r).created_ms for rid, r in zip(ids, raw, strict=True)
                if r is not None}  # fmt: skip
    rows = await pool.fetch(  # type: ignore[attr-defined]
        "SELECT id, (extract(epoch FROM updated_at) * 1000)::bigint AS at FROM orders "
        "WHERE id = ANY($1) AND state = 'CONFIRMED'", ids,
    )  # fmt: skip
    return [float(r["at"] - reserved[r["id"]]) for r in rows if r["id"] in reserved]


async def _one_latency(settings: Settings, latency_ms: float, options: Options,
                       progress: Progress) -> Row:  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    topics = Topics(f"bench{tag}-reservations", f"bench{tag}-order-events",
                    f"bench{tag}-dead-letter")  # fmt: skip
    psp_port = free_port()
    settings = replace(settings, topics=topics, consumer_group=f"bench-{tag}",
                       psp_url=f"http://127.0.0.1:{psp_port}")  # fmt: skip
    await ensure_topics(settings)
    redis = redis_client(settings)
    pool = await pg_pool(settings, min_size=1, max_size=4)
    out = producer(settings)
    servers = Servers()
    stop = asyncio.Event()
    made: list[str] = []
    level = relay_log.level  # the relay's own, set again at the end
    try:
        await out.start()
        total = options.reservations * 2 + 100
        now = datetime.now(UTC)
        spec = {"name": f"bench pipeline {latency_ms:g} ms",
                "starts_at": (now - timedelta(seconds=1)).isoformat(),
                "ends_at": (now + timedelta(hours=1)).isoformat(), "max_queue": 10_000_000,
                "skus": [{"sku": SKU, "stock": total, "price": 100, "currency": "EUR",
                          "per_buyer_limit": 1, "hold_ttl_seconds": 600}]}  # fmt: skip
        admin = SaleAdmin.build(pool, redis)
        sale_id = str((await admin.create(parse_sale(spec)))["id"])
        made.append(sale_id)
        await admin.preload(sale_id)
        keys = SkuKeys(sale_id, SKU)
        run = _Run(settings, sale_id, keys, HoldScripts(redis), servers)
        env = {
            **topics.env(),
            "FLASHSALE_CONSUMER_GROUP": settings.consumer_group,
            "FLASHSALE_PSP_URL": settings.psp_url or "", "FLASHSALE_LOG_LEVEL": "WARNING",
        }  # fmt: skip
        python = sys.executable
        servers.start([python, "-m", "flashsale", "psp", "--port", str(psp_port),
                       "--latency-ms", str(latency_ms)], env)  # fmt: skip
        servers.start([python, "-m", "flashsale", "workers", "--concurrency",
                       str(options.concurrency)], env)  # fmt: skip
        relay = OutboxRelay(redis, out, topics.reservations, topics.dead_letter, f"bench-{tag}")

        async def skus() -> list[SkuKeys]:
            return [keys]

        # As quiet as the run's worker and provider processes: at INFO the relay says each
        # reservation it relays, 40,000 lines of a default run between the progress lines.
        relay_log.setLevel(max(logging.WARNING, relay_log.getEffectiveLevel()))  # until the end
        relay_task = asyncio.get_running_loop().create_task(run_relay(relay, skus, stop=stop))
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, f"{settings.psp_url}/healthz", patience=20)
        # Warm-up: the worker has joined its group and every connection is open.
        await _reserve(run, _requests(100))
        await _wait_confirmed(pool, sale_id, 100, options.patience_s)

        progress(f"  provider latency {latency_ms:g} ms: {options.reservations:,} holds at once")
        burst = _requests(options.reservations)
        began = time.monotonic()
        await _reserve(run, burst)
        ended = await _wait_confirmed(pool, sale_id, 100 + options.reservations,
                                      options.patience_s)  # fmt: skip
        capacity = options.reservations / (ended - began)
        progress(f"    capacity {capacity:,.0f} orders/s")

        # Half the capacity, within the stock left for this phase.
        rate = min(capacity / 2, options.reservations / options.paced_seconds)
        progress(f"    paced at {rate:,.0f} holds/s for {options.paced_seconds:g}s")
        paced: list[str] = []
        pending = _requests(options.reservations)
        tick = 0.02
        started = time.monotonic()
        while time.monotonic() - started < options.paced_seconds:
            due = min(int((time.monotonic() - started) * rate), options.reservations) - len(paced)
            if due > 0:
                paced += await _reserve(run, pending[len(paced) : len(paced) + due])
            await asyncio.sleep(tick)
        await _wait_confirmed(pool, sale_id, 100 + options.reservations + len(paced),
                              options.patience_s)  # fmt: skip
        latencies = await _latencies_ms(run, pool, paced)
        confirmed = await _confirmed(pool, sale_id)
        sold_pg = await pool.fetchval(
            "SELECT sold FROM sale_skus WHERE sale_id = $1 AND sku = $2", sale_id, SKU
        )
        counts = [int(v or 0) for v in await redis.hmget(keys.stock, "sold", "total")]
        consistent = confirmed == len(run.granted) == sold_pg == counts[0]
        row = Row(f"pipeline_{latency_ms:g}ms", f"reserve -> CONFIRMED, provider {latency_ms:g} ms",
                  capacity, options.reservations, ended - began)  # fmt: skip
        row.extra.update(
            provider_latency_ms=latency_ms,
            sale_id=sale_id,
            p50_ms=round(quantile(latencies, 0.5), 1),
            p99_ms=round(quantile(latencies, 0.99), 1),
            paced_per_second=round(rate, 1),
            paced_orders=len(paced),
            consistent=consistent,
            oversold=max(0, int(sold_pg) - counts[1]),
        )
        progress(f"    reserve -> confirmed p50 {row.extra['p50_ms']} ms, "
                 f"p99 {row.extra['p99_ms']} ms; consistent: {consistent}")  # fmt: skip
        stop.set()
        await relay_task
        return row
    finally:
        stop.set()
        relay_log.setLevel(level)
        servers.stop()
        await out.stop()
        # Nothing of the run is left for an engine to do: the sale ended, its Redis state
        # deleted (kept for its orders, recorded as cleared: no service visits it, and the
        # archive, whose audit it could never pass, leaves it), the order events its workers
        # left unpublished (to its own topics), and its topics.
        await pool.execute("DELETE FROM outbox WHERE topic = ANY($1::text[])", topics.all())
        await pool.close()
        await redis.aclose()
        await discard_sales(settings, made, [SKU])
        await delete_topics(settings, topics.all())


async def _broker_ceiling(settings: Settings, count: int, progress: Progress) -> Row:
    """The broker alone: ``count`` messages of a reservation's size, produced then consumed."""
    topic = f"bench{uuid.uuid4().hex[:8]}-ceiling"
    own = Topics(topic, topic + "-e", topic + "-d")
    await ensure_topics(replace(settings, topics=own))
    out = producer(settings)
    await out.start()
    value = b"x" * 420
    began = time.monotonic()
    try:
        sends = [await out.send(topic, key=b"k%d" % (i % 64), value=value) for i in range(count)]
        await asyncio.gather(*sends)
    finally:
        await out.stop()
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False,
                                auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p)
                         for p in consumer.partitions_for_topic(topic) or []])  # fmt: skip
        await consumer.seek_to_beginning()
        seen = 0
        while seen < count:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            seen += sum(len(v) for v in batch.values())
    finally:
        await consumer.stop()
    elapsed = time.monotonic() - began
    await delete_topics(settings, own.all())
    progress(f"  broker ceiling: {count / elapsed:,.0f} messages/s produced and consumed")
    return Row("broker_ceiling", "produce + consume only, no effects", count / elapsed, count,
               elapsed)  # fmt: skip


FAILURE = "confirmed orders disagree with the holds granted in"


def failed(report: Report) -> list[str]:
    """The rows whose check failed (named after ``FAILURE``)."""
    return inconsistent(report)


async def run(settings: Settings, options: Options, progress: Progress, command: str) -> Report:
    described = machine()  # before the run: the load average is the machine's, not ours
    progress(f"bench pipeline: {options.reservations:,} reservations per latency, worker "
             f"concurrency {options.concurrency}")  # fmt: skip
    rows = [await _broker_ceiling(settings, options.reservations, progress)]
    for latency in options.latencies:
        rows.append(await _one_latency(settings, latency, options, progress))
    ceiling = rows[0].per_second
    for row in rows:
        row.extra["ratio_to_ceiling"] = round(row.per_second / ceiling, 3)
    targets = [
        Target(f"orders/s at {r.extra['provider_latency_ms']:g} ms",
               f">= {TARGETS[r.extra['provider_latency_ms']]:,.0f}", f"{r.per_second:,.0f}",
               r.per_second >= TARGETS[r.extra["provider_latency_ms"]])
        for r in rows[1:] if r.extra["provider_latency_ms"] in TARGETS
    ]  # fmt: skip
    return Report("pipeline", command, rows, targets, described, {
        "reservations": options.reservations, "latencies_ms": list(options.latencies),
        "concurrency": options.concurrency, "paced_seconds": options.paced_seconds,
        "worker_processes": 1,
    })  # fmt: skip


def render(report: Report) -> str:
    rows = [
        (r.name, r.per_second, r.extra.get("p50_ms"), r.extra.get("p99_ms"),
         r.extra.get("ratio_to_ceiling"), r.extra.get("consistent"), r.extra.get("oversold"))
        for r in report.rows
    ]  # fmt: skip
    targets = [(t.name, t.goal, t.measured, "met" if t.met else "MISSED") for t in report.targets]
    return "\n\n".join([
        table(("row", "orders/s", "p50 ms", "p99 ms", "x ceiling", "consistent", "oversold"),
              rows),
        table(("target", "goal", "measured", ""), targets),
    ])  # fmt: skip
