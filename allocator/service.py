"""The allocator service (``flashsale allocator``): admission pumps, the hold sweeper and the
outbox relay.

It finds live sales in Postgres (preloaded, not ended) and runs one :class:`AdmissionPump` per
sale (a no-op on every replica but the sale's lease holder, so several services may run for
availability). For every sale in which a hold can still live (live, or ended less than its
longest hold TTL and a minute ago) it sweeps expired holds and relays the outbox streams to
the ``reservations`` topic (:mod:`allocator.relay`; replicas share the streams
through a consumer group). Its ``/healthz`` pings Redis, Postgres and the broker, and its
``/metrics`` shows what the pumps, the sweeper and the relay do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import socket
import time
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.exceptions import NoPermissionError

from allocator.discovery import SkuSets, not_preloaded
from allocator.hold_scripts import HoldScripts
from allocator.pacing import SaleRounds
from allocator.pump import AdmissionPump
from allocator.queue_scripts import QueueScripts
from allocator.queue_view import still_waiting
from allocator.redis_calls import Command, read_packed
from allocator.relay import OutboxRelay, run_relay
from allocator.service_metrics import ServiceMetrics
from allocator.settled import ScopeKeys, SettledSkus
from allocator.stock_count import Count
from allocator.sweeper import run_sweeper
from flashsale.clients import RedisClient, pg_pool, redis_client
from flashsale.heap import settle_heap
from flashsale.kafka import producer_when_up
from flashsale.keys import DISCOVERED, SkuKeys
from flashsale.ops_endpoints import KafkaProbe, dependency_probes, memory_read, serve_ops
from flashsale.outages import log_failure
from flashsale.queue_marks import QueueMarks
from flashsale.settings import Settings

log = logging.getLogger("flashsale.allocator")

# How long the sales an allocator last listed stay in Redis for one started while Postgres is
# down: a day, longer than any outage worth riding out this way.
DISCOVERED_KEPT_S = 86_400
# After a change of the sales served: long enough for the keys, counts and schedules a new
# sale brings to be made, before the heap is settled (flashsale/heap.py).
SETTLE_AFTER_S = 10.0


class AllocatorService:
    def __init__(
        self,
        settings: Settings,
        *,
        tick_s: float = 0.1,
        discover_s: float = 2.0,
        sweep_s: float = 0.25,
        idle_tick_s: float = 1.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.tick_s = tick_s
        self.idle_tick_s = idle_tick_s
        self.discover_s = discover_s
        self.sweep_s = sweep_s
        self.metrics = ServiceMetrics(registry or CollectorRegistry())
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{time.monotonic_ns()}"
        self.pumps: dict[str, AdmissionPump] = {}
        self.ticking: dict[str, asyncio.Task[None]] = {}  # the pumps' ticks in flight, by sale
        self.noted: dict[str, Count | None] = {}  # the stock count last shown, by sale
        self.marks = QueueMarks(f"pump:{self.owner}")
        self.holding_skus: list[SkuKeys] = []  # of the holding sales: swept and relayed
        self.sku_sets = SkuSets()  # allocator/discovery.py
        self.in_scope: list[SkuKeys] = []  # ... with the settled ones
        self.settle_at: float | None = None  # time.monotonic() at which to settle the heap
        self.settled = SettledSkus()
        self.scope = ScopeKeys()  # the keys of each holding sale, made once
        self.holding: list[dict[str, Any]] = []  # ... as listed, to tell a change
        self.kept: dict[str, Any] | None = None  # what was last kept in Redis, and when
        self.kept_at = 0.0
        self.relay: OutboxRelay | None = None
        self.redis: RedisClient | None = None
        self.pool: asyncpg.Pool | None = None

    async def run(
        self, stop: asyncio.Event, ops_port: int | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.redis = redis_client(self.settings)
        # Postgres or the broker down at the start stops neither the pumps nor the sweeper
        # (Redis only): the pool connects when asked, the relay waits for the broker.
        self.pool = await pg_pool(self.settings, min_size=1, max_size=4, lazy=True)
        queue = QueueScripts(self.redis)
        runner: web.AppRunner | None = None
        kafka = KafkaProbe(self.settings)
        background: list[asyncio.Task[None]] = []
        try:
            if ops_port is not None:
                runner = await self._serve_ops(host, ops_port, kafka)
            sweeper = asyncio.create_task(
                run_sweeper(
                    HoldScripts(self.redis), self._holding_skus, stop=stop, interval=self.sweep_s,
                    on_expired=self.metrics.expired.inc,
                )
            )  # fmt: skip
            relay = asyncio.create_task(self._relay(stop))
            checkpoints = asyncio.create_task(self.marks.run(self.pool, stop))
            backlog = asyncio.create_task(self._measure_backlog(stop))
            memory = asyncio.create_task(self._measure_memory(stop))
            # Beside the ticks, not between them: a Postgres that hangs held the listing for
            # twice its statement timeout, and every pump of the process with it.
            discovering = asyncio.create_task(self._discover_until(queue, stop))
            background += [sweeper, relay, checkpoints, backlog, memory, discovering]
            while not stop.is_set():
                if discovering.done():
                    discovering.result()  # it raised: the service ends, and is restarted
                await self._tick_due()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.tick_s)
            for task in background:
                await task
        finally:
            for task in background:  # still running only when the loop above raised
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._ticks_ended()
            for pump in self.pumps.values():
                await self._resign(pump)
            if runner is not None:
                await runner.cleanup()
            await kafka.aclose()
            if self.relay is not None:
                await self.relay.producer.stop()
            await self.pool.close()
            await self.redis.aclose()

    async def _relay(self, stop: asyncio.Event) -> None:
        """Relay the outboxes to the broker until ``stop``, once a producer could be started
        (the entries wait in the outboxes meanwhile)."""
        assert self.redis is not None
        out = await producer_when_up(self.settings, stop, "the relay")
        if out is None:
            return
        topics = self.settings.topics
        self.relay = OutboxRelay(self.redis, out, topics.reservations, topics.dead_letter,
                                 self.owner)  # fmt: skip
        await run_relay(self.relay, self._holding_skus, stop=stop,
                        on_round=self.metrics.relayed.inc)  # fmt: skip

    async def _measure_backlog(
        self, stop: asyncio.Event, interval_s: float = 1.0, reads_per_s: float = 2000.0
    ) -> None:
        """Each second (a sale with more SKUs than its share of ``reads_per_s``, less often:
        allocator/pacing.py), the outbox entries of every holding SKU not yet published (the
        relay deletes what the broker acknowledged): a backlog that grows means the relay or
        the broker is behind. SKUs that left scope lose their series."""
        rounds = SaleRounds(interval_s, reads_per_s)
        while not stop.is_set():
            skus = rounds.due_skus(self.holding_skus, time.monotonic())
            try:
                assert self.redis is not None
                commands: list[Command] = [("XLEN", keys.outbox) for keys in skus]
                lengths = await read_packed(self.redis, commands) if skus else []
            except Exception as exc:  # noqa: BLE001 - measured again at the sale's next turn
                log_failure(log, "cannot measure the outbox backlog", exc)
            else:
                now = {(k.sale_id, k.sku, str(k.bucket)): int(n)
                       for k, n in zip(skus, lengths, strict=True)}  # fmt: skip
                self.metrics.note_backlog(now, in_scope=rounds.sales)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rounds.wait(time.monotonic()))

    async def _measure_memory(self, stop: asyncio.Event, interval_s: float = 5.0) -> None:
        """Every ``interval_s``, each Redis server's memory as a share of its ``maxmemory``:
        the warning before it is full and refuses every write; and, each time it is first
        seen, a server that evicts when full."""
        warned: set[str] = set()
        while not stop.is_set():
            try:
                assert self.redis is not None
                read = await memory_read(self.redis)
                self.metrics.note_memory(read.shares)
                said = set(read.warnings())
                for line in sorted(said - warned):
                    log.warning(line)
                warned = said
            except NoPermissionError:  # an ACL user without INFO: nothing to measure
                log.info("Redis's memory is not measured: its user may not run INFO")
                return
            except Exception as exc:  # noqa: BLE001 - measured again next time
                log_failure(log, "cannot read Redis's memory", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    async def _holding_skus(self) -> list[SkuKeys]:
        return self.holding_skus

    async def _holding(self, holding: list[dict[str, Any]]) -> None:
        """``holding_skus``: the SKUs of the holding sales but those settled (allocator/
        settled.py). The same list while nothing changes: the relay's cue."""
        changed = holding != self.holding
        if changed:
            self.holding = holding
            self.in_scope = await self.scope.of(holding)
            self.settled.keep(r["id"] for r in holding)
        if self.redis is not None:
            try:
                changed = await self.settled.find(self.redis, holding, self.in_scope) or changed
            except Exception as exc:  # noqa: BLE001 - they are visited meanwhile
                log_failure(log, "cannot read which SKUs of ended sales are settled", exc)
        if changed:
            settled = self.settled.keys
            self.holding_skus = ([k for k in self.in_scope if k not in settled] if settled
                                 else list(self.in_scope))  # fmt: skip

    async def _discover_until(self, queue: QueueScripts, stop: asyncio.Event) -> None:
        """Discovery every ``discover_s`` until ``stop``."""
        while not stop.is_set():
            await self._discover(queue)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.discover_s)

    async def _discover(self, queue: QueueScripts) -> None:
        """The live sales (a pump each) and the holding ones (swept and relayed), from
        Postgres. They are kept in Redis for an allocator that starts while Postgres is down:
        it takes them from there (what it has goes on otherwise). ``SETTLE_AFTER_S`` after a
        change of either, once the keys and schedules it brings are made, the heap is settled
        (flashsale/heap.py)."""
        assert self.pool is not None
        if self.settle_at is not None and time.monotonic() >= self.settle_at:
            self.settle_at = None
            took = settle_heap()
            log.info("the heap settled after a change of scope: %d objects kept out of the "
                     "garbage collector's walks (%.0f ms)", gc.get_freeze_count(),
                     took * 1000)  # fmt: skip
        scope, pumps = self.in_scope, set(self.pumps)
        await self._listed(queue)
        if self.in_scope is not scope or set(self.pumps) != pumps:
            self.settle_at = time.monotonic() + SETTLE_AFTER_S

    async def _listed(self, queue: QueueScripts) -> None:
        assert self.pool is not None
        try:
            holding = await self.sku_sets.holding(self.pool)
            rows = [r for r in holding if r["live"]]
        except Exception as exc:  # noqa: BLE001 - the pumps it has go on
            seen = None
            if not self.pumps and not self.holding_skus and self.redis is not None:
                with contextlib.suppress(Exception):
                    seen = await self.redis.get(DISCOVERED)
            if seen is None:
                log_failure(log, "cannot list live sales", exc)
                return
            log_failure(log, "cannot list live sales; serving those last listed", exc)
            last = orjson.loads(seen)
            rows, holding = last["live"], last["holding"]
        else:
            kept = {"live": rows, "holding": holding}
            # Written when it changed, and well within its TTL otherwise: it is megabytes for
            # a sale of 100,000 SKUs, and discovery runs every 2 s.
            if kept != self.kept or time.monotonic() > self.kept_at + DISCOVERED_KEPT_S / 4:
                try:
                    assert self.redis is not None
                    await self.redis.set(DISCOVERED, orjson.dumps(kept), ex=DISCOVERED_KEPT_S)
                    self.kept, self.kept_at = kept, time.monotonic()
                except Exception as exc:  # noqa: BLE001 - kept at the next discovery
                    log_failure(log, "cannot keep the live sales in Redis", exc)
        await self._holding(holding)
        try:
            self.metrics.note_not_preloaded(await not_preloaded(self.pool))
        except Exception as exc:  # noqa: BLE001 - said again at the next discovery
            log_failure(log, "cannot list the sales opening without a preload", exc)
        live = {row["id"]: row for row in rows}
        for sale_id in set(self.pumps) - set(live):
            await self._ticks_ended(sale_id)
            await self._resign(self.pumps.pop(sale_id))
            self.metrics.forget(sale_id)
            self.noted.pop(sale_id, None)
        for sale_id, row in live.items():
            # The same list while the sale's set of SKUs did not move (allocator/discovery.py):
            # a pump's are made again, and its stock keys (allocator/stock_count.py), only
            # when it did (60,000 SKUs copied and compared every 2 s were a tenth of an idle
            # allocator's CPU).
            skus, pump = row["skus"], self.pumps.get(sale_id)
            if pump is not None and pump.skus is skus:
                continue
            buckets = dict(zip(skus, row["buckets"], strict=True))
            if pump is not None:
                pump.skus, pump.buckets = skus, buckets
            else:
                self.pumps[sale_id] = AdmissionPump(
                    queue, self.pool, sale_id, skus, self.owner, marks=self.marks,
                    buckets=buckets,
                )  # fmt: skip

    async def _tick_due(self) -> None:
        """Start the tick of every pump that is due and not ticking still, without waiting for
        them: a sale slow to tick (many SKUs to count, a slow Redis node) keeps no other sale
        to its pace."""
        now = time.monotonic()
        for sale_id, pump in self.pumps.items():
            if pump.next_tick <= now and sale_id not in self.ticking:
                task = asyncio.create_task(self._tick(pump))
                self.ticking[sale_id] = task
                task.add_done_callback(functools.partial(self._ticked, sale_id))

    def _ticked(self, sale_id: str, _: asyncio.Task[None]) -> None:
        self.ticking.pop(sale_id, None)

    async def _ticks_ended(self, sale_id: str | None = None, within_s: float = 5.0) -> None:
        """Wait for the tick in flight of ``sale_id`` (of every pump when None), cancelled
        after ``within_s``: a pump resigns its lease only after, or the tick could take it
        again."""
        ticks = [t for s, t in self.ticking.items() if sale_id is None or s == sale_id]
        if ticks:
            _, late = await asyncio.wait(ticks, timeout=within_s)
            for tick in late:
                tick.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _resign(self, pump: AdmissionPump) -> None:
        """Give the lease back early; if Redis does not answer, it lapses by its TTL anyway."""
        try:
            await pump.resign()
        except Exception as exc:  # noqa: BLE001 - the lease lapses by its TTL anyway
            log_failure(log, f"could not release the pump lease of {pump.sale_id} (it lapses)",
                        exc)  # fmt: skip

    async def _tick(self, pump: AdmissionPump) -> None:
        m, sale = self.metrics, pump.sale_id
        s = m.of(sale)
        try:
            step = await pump.tick()
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            s.errors.inc()
            log_failure(log, f"pump for {sale} failed a tick", exc)
            return
        s.leader.set(1 if pump.token else 0)
        # A sold-out sale has nothing left to admit or give back (no unit is held), and a sale
        # nobody waits in, away from its opening, has nobody to admit: their pumps only keep
        # their leases, every ``idle_tick_s`` (under the lease's TTL).
        quiet = (step is not None and step.sold_out) or not pump.busy
        pump.next_tick = time.monotonic() + (self.idle_tick_s if quiet else 0.0)
        if step is None:  # not the leader, or the sale ended: the leader says who waits, if any
            for gauge in (s.waiting, s.pre_queue, s.stranded, s.full):
                gauge.set(0)
            return
        if step.admitted:
            s.admitted.inc(step.admitted)
        s.serving.set(step.serving)
        s.tail.set(pump.tail)
        s.cutoff.set(step.cutoff if step.cutoff is not None else -1)
        s.waiting.set(still_waiting(pump.tail, step.serving, step.cutoff, step.sold_out))
        if pump.view is not None:
            s.pre_queue.set(pump.view.pre)
            now_ms = int(time.time() * 1000)
            s.stranded.set(pump.view.stranded(now_ms))
            s.full.set(1 if pump.view.full(now_ms) else 0)
        s.outstanding.set(pump.outstanding)
        s.noshow.set(pump.noshow)
        if pump.count is not self.noted.get(sale):  # a sale slow to count is counted less often
            self.noted[sale] = pump.count
            m.note_stock(sale, pump.stock)
        s.sold_out.set(1 if step.sold_out else 0)

    async def _serve_ops(self, host: str, port: int, kafka: KafkaProbe) -> web.AppRunner:
        redis, pool = self.redis, self.pool
        assert redis is not None and pool is not None
        probes = dependency_probes(redis, pool, kafka)
        runner = await serve_ops(host, port, probes, self.metrics.registry)
        log.info("allocator ops endpoints on http://%s:%d/healthz and /metrics", host, port)
        return runner
