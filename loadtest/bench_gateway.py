"""``flashsale bench gateway``: the buyer's hot routes against a bare endpoint.

Seven rows, each driven for the same time by the same closed-loop HTTP client, against servers
with the same number of processes (SO_REUSEPORT):

* ``bare_aiohttp``: a trivial aiohttp + uvloop endpoint returning a small JSON body. The
  ceiling: what this machine does for an HTTP request with nothing behind it.
* ``queue_status``: ``GET /v1/sales/{sale}/queue/status`` with the tickets of 10,000 waiting
  buyers in turn (a signature check, or a lookup for a ticket this process has verified
  before, and the per-process counters; no Redis round trip).
* ``queue_join``: ``POST /v1/sales/{sale}/queue``, one new buyer per request (a buyer token
  check and one Lua call).
* ``queue_join_jwt``: the same join with a storefront's ES256 JWT as the buyer token (a new
  buyer, so a new token, per request: the signature check is never skipped by the cache).
* ``queue_join_challenge``: the join of a sale that asks an 8-bit proof of work, with a
  solved challenge (signed here as the gateway signs them, solved by the client): the
  challenge check and the spent-nonce write on top of a join.
* ``reserve``: ``POST /v1/sales/{sale}/reservations``, one admitted buyer per request (two
  token checks, one batched reserve script call with the rate limits, the admission claim and
  the hold it granted, and the event published to the broker before the 201): what an
  admitted buyer costs the gateway.
* ``reserve_listener``: the same reservation at the reservations listener (``gateway
  --reservations-only``, where an admitted status answer's ``reserve_url`` sends the buyer
  when the engine has one, as ``flashsale up`` does): its loop serves only reservations, so
  the broker's producer shares it instead of running on a thread of its own.

Each row also gives the Redis server's CPU per request (``INFO cpu``; its commands' own time
from ``INFO commandstats`` in the JSON): what a join or a reservation costs the sale's node.

Targets: status >= 70 % and join >= 40 % of the bare endpoint's requests per second; and as
server CPU per request against the bare endpoint's, status <= 1.2x, join <= 1.5x and reserve
<= 2x (at the gateway and at the listener). The client runs on the same 2 cores as the
servers, so only the ratios mean anything. The rows are measured in interleaved rounds and
each target is judged on the median of the per-round ratios, so a slow minute of this shared
machine cannot favour or punish one row.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from allocator.pump import quantile
from flashsale import event_loop
from flashsale.cli.devstack.processes import free_port
from flashsale.clients import redis_client
from flashsale.kafka import delete_topics
from flashsale.settings import Settings
from flashsale.tokens import Signer
from flashsale.topics import Topics
from flashsale.wording import counted
from loadtest.bench import Report, Row, ServerSample, Target, discard_sales, drive, machine, table
from loadtest.bench_gateway_rig import (
    CHALLENGE_BITS,
    SKU,
    admitted_buyers,
    guarded_sale,
    prepare_sale,
    solved_join,
    storefront_jwt,
    storefront_key,
    waiting_tickets,
)
from loadtest.processes import Servers, wait_healthy

STATUS_TARGET = 0.70
JOIN_TARGET = 0.40
# Server CPU per request, as a multiple of the bare endpoint's in the same round.
CPU_TARGETS = {"queue_status": 1.2, "queue_join": 1.5, "reserve": 2.0, "reserve_listener": 2.0}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    seconds: float = 10.0  # per row, split into interleaved rounds
    rounds: int = 5
    tickets: int = 10_000  # distinct waiting buyers polling in turn
    concurrency: int = 64
    workers: int = 2

    def command(self) -> str:
        """The command line that reproduces a run with these options."""
        return (f"flashsale bench gateway --seconds {self.seconds:g} --rounds {self.rounds} "
                f"--concurrency {self.concurrency} --workers {self.workers}")  # fmt: skip


# -- the bare endpoint ----------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """One process of the bare endpoint (run with ``python -m loadtest.bench_gateway PORT``)."""
    body = orjson.dumps({"state": "waiting", "position": 1, "ahead": 0})

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=4096).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    event_loop.run(main())


# -- the run --------------------------------------------------------------------------------


@dataclass
class _Meter:
    """One row's measurements, gathered over every round."""

    name: str
    what: str
    request: Callable[[], Any]
    server_cpu: Callable[[], float]  # CPU seconds used so far by the server processes
    redis: Callable[[], Awaitable[ServerSample]]  # the Redis server's counters now
    latencies: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # req/s of each round
    cpu_us: list[float] = field(default_factory=list)  # server CPU us per request, each round
    done: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # server CPU seconds spent during the recorded rounds
    redis_cpu: float = 0.0  # the Redis server's CPU seconds during the recorded rounds
    redis_usec: int = 0  # its commands' own time (INFO commandstats) during them
    failures: int = 0
    ok_status: int = 200

    async def measure(self, options: Options, seconds: float, *, record: bool = True) -> None:
        latencies = self.latencies if record else []

        async def op() -> None:
            began = time.perf_counter()
            async with self.request() as response:
                await response.read()
                if response.status != self.ok_status:
                    self.failures += 1
            latencies.append(time.perf_counter() - began)

        redis_before = await self.redis()
        cpu_before = self.server_cpu()
        done, elapsed = await drive(op, concurrency=options.concurrency, seconds=seconds)
        if not record:
            return
        spent = self.server_cpu() - cpu_before
        redis_after = await self.redis()
        self.redis_cpu += redis_after.cpu_seconds - redis_before.cpu_seconds
        self.redis_usec += sum(redis_after.usec.values()) - sum(redis_before.usec.values())
        self.cpu += spent
        self.cpu_us.append(spent / max(1, done) * 1e6)
        self.done += done
        self.elapsed += elapsed
        self.rates.append(done / elapsed)

    def row(self, ceiling: _Meter) -> Row:
        ratios = [mine / bare for mine, bare in zip(self.rates, ceiling.rates, strict=True)]
        cpu_ratios = [mine / max(bare, 1e-9)
                      for mine, bare in zip(self.cpu_us, ceiling.cpu_us, strict=True)]  # fmt: skip
        row = Row(self.name, self.what, self.done / self.elapsed, self.done, self.elapsed)
        row.extra.update(
            p50_ms=round(quantile(self.latencies, 0.5) * 1000, 2),
            p99_ms=round(quantile(self.latencies, 0.99) * 1000, 2),
            non_200=self.failures,  # answers other than the row's success (201 for reserve)
            server_cpu_us_per_request=round(self.cpu / max(1, self.done) * 1e6, 1),
            # The Redis server's whole CPU (networking and the AOF included) and its commands'
            # own time, per request: what one sale's node spends on each (its joins, its
            # reservations); a fraction of a us of background work for the rows that send none.
            redis_cpu_us_per_request=round(self.redis_cpu / max(1, self.done) * 1e6, 1),
            redis_us_per_request=round(self.redis_usec / max(1, self.done), 1),
            ratio_to_bare=round(quantile(ratios, 0.5), 3),
            round_ratios=[round(r, 3) for r in ratios],
            cpu_ratio_to_bare=round(quantile(cpu_ratios, 0.5), 2),
            round_cpu_ratios=[round(r, 2) for r in cpu_ratios],
        )
        return row


FAILURE = "requests failed in"


def failed(report: Report) -> list[str]:
    """The rows with an answer other than 200 (named after ``FAILURE``)."""
    return [r.name for r in report.rows if r.extra["non_200"]]


async def run(settings: Settings, options: Options, progress: Progress, command: str) -> Report:
    gateway_port, listener_port, bare_port = free_port(), free_port(), free_port()
    servers = Servers()
    jwt_key, jwks = storefront_key()
    # The reservations it grants are announced on topics of its own, deleted afterwards: on
    # the engine's they would become orders in the next engine's workers.
    topics = Topics.from_env({"FLASHSALE_TOPIC_PREFIX": f"bench{os.urandom(4).hex()}-"})
    env = {"FLASHSALE_RATE_PER_IP": "off", "FLASHSALE_RATE_PER_BUYER": "off",
           "FLASHSALE_LOG_LEVEL": "WARNING", "FLASHSALE_BUYER_JWKS": jwks,
           **topics.env()}  # fmt: skip
    sales: list[str] = []
    python = sys.executable
    servers.start([python, "-m", "flashsale", "gateway", "--port", str(gateway_port),
                   "--workers", str(options.workers)], env)  # fmt: skip
    servers.start([python, "-m", "flashsale", "gateway", "--port", str(listener_port),
                   "--workers", str(options.workers), "--reservations-only"], env)  # fmt: skip
    for _ in range(options.workers):
        servers.start([python, "-m", "loadtest.bench_gateway", str(bare_port)])
    slice_s = options.seconds / options.rounds
    progress(f"bench gateway: {counted(options.workers, 'process', 'processes')} per server, "
             f"{options.concurrency} concurrent requests, {options.seconds:g}s per row in "
             f"{options.rounds} interleaved rounds of {slice_s:g}s")  # fmt: skip
    connector = aiohttp.TCPConnector(limit=options.concurrency * 2)
    redis = redis_client(settings, max_connections=2)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            base, bare = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{bare_port}/"
            listener = f"http://127.0.0.1:{listener_port}"
            await wait_healthy(session, f"{base}/healthz", patience=20)
            await wait_healthy(session, f"{listener}/healthz", patience=20)
            await wait_healthy(session, bare, patience=20)
            sale_id = await prepare_sale(session, base, settings)
            sales.append(sale_id)
            # One admitted buyer per reservation: more than the two rows can use at 5,000/s.
            reserve = await admitted_buyers(settings, sale_id,
                                            int((options.seconds + 1) * 2 * 5000))  # fmt: skip
            tickets = await waiting_tickets(settings, sale_id, options.tickets)
            guarded = await guarded_sale(session, base, settings)
            sales.append(guarded)
            guarded_url = f"{base}/v1/sales/{guarded}/queue"
            challenges = Signer.from_setting(settings.secret.reveal(), "challenge")

            def reservation(at: str) -> Any:
                headers, body = next(reserve)
                return session.post(f"{at}/v1/sales/{sale_id}/reservations", json=body,
                                    headers=headers)  # fmt: skip

            buyers = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer")
            serial = itertools.count()
            run_id = os.urandom(4).hex()
            status_url = f"{base}/v1/sales/{sale_id}/queue/status"
            join_url = f"{base}/v1/sales/{sale_id}/queue"
            sample = partial(ServerSample.take, redis)
            bare_cpu = partial(servers.cpu, range(2, 2 + options.workers))
            gateway_cpu, listener_cpu = partial(servers.cpu, [0]), partial(servers.cpu, [1])
            meters = [
                _Meter("bare_aiohttp", "trivial aiohttp + uvloop JSON endpoint",
                       lambda: session.get(bare), bare_cpu, sample),
                _Meter("queue_status",
                       f"GET queue/status, {options.tickets:,} buyers' tickets in turn (no Redis)",
                       lambda: session.get(status_url,
                                           headers={"X-Queue-Ticket": next(tickets)}),
                       gateway_cpu, sample),
                _Meter("queue_join", "POST queue, a new buyer per request (batched Lua call)",
                       lambda: session.post(join_url, headers={"Authorization": "Bearer " +
                           buyers.sign({"sub": f"b{run_id}-{next(serial)}"}, 600)}),
                       gateway_cpu, sample),
                _Meter("queue_join_jwt", "POST queue with an ES256 JWT, a new buyer per request",
                       lambda: session.post(join_url, headers={"Authorization": "Bearer " +
                           storefront_jwt(jwt_key, f"j{run_id}-{next(serial)}")}),
                       gateway_cpu, sample),
                _Meter("queue_join_challenge",
                       f"POST queue with a solved {CHALLENGE_BITS}-bit challenge, a new buyer",
                       lambda: session.post(guarded_url, headers=solved_join(
                           buyers, challenges, guarded, f"c{run_id}-{next(serial)}")),
                       gateway_cpu, sample),
                _Meter("reserve", "POST reservations, an admitted buyer per request",
                       partial(reservation, base), gateway_cpu, sample, ok_status=201),
                _Meter("reserve_listener",
                       "the same reservation at the reservations listener",
                       partial(reservation, listener), listener_cpu, sample, ok_status=201),
            ]  # fmt: skip
            # Interleaved rounds, each starting with another row: a noisy neighbour or a
            # drifting CPU clock then touches every row alike, and each ratio compares rows
            # measured seconds apart, not minutes.
            for meter in meters:  # warm-up: connections, script loads, first counter reads
                await meter.measure(options, min(1.0, slice_s), record=False)
            for round_no in range(options.rounds):
                for k in range(len(meters)):
                    await meters[(round_no + k) % len(meters)].measure(options, slice_s)
                progress(f"  round {round_no + 1}/{options.rounds}: " + ", ".join(
                    f"{m.name} {m.rates[-1]:,.0f}/s" for m in meters))  # fmt: skip
    finally:
        servers.stop()
        await redis.aclose()
        os.unlink(jwks)
        await discard_sales(settings, sales, [SKU])
        await delete_topics(settings, topics.all())
    rows = [meter.row(meters[0]) for meter in meters]
    by = {row.name: row for row in rows}
    status_ratio, join_ratio = rows[1].extra["ratio_to_bare"], rows[2].extra["ratio_to_bare"]
    targets = [
        Target("queue_status vs bare", f">= {STATUS_TARGET:.0%}", f"{status_ratio:.0%}",
               status_ratio >= STATUS_TARGET),
        Target("queue_join vs bare", f">= {JOIN_TARGET:.0%}", f"{join_ratio:.0%}",
               join_ratio >= JOIN_TARGET),
        *(Target(f"{name} server CPU vs bare", f"<= {goal:g}x",
                 f"{by[name].extra['cpu_ratio_to_bare']:.2f}x",
                 by[name].extra["cpu_ratio_to_bare"] <= goal)
          for name, goal in CPU_TARGETS.items()),
    ]  # fmt: skip
    return Report(
        benchmark="gateway",
        command=command,
        rows=rows,
        targets=targets,
        machine=machine(),
        config={
            "seconds": options.seconds,
            "rounds": options.rounds,
            "tickets": options.tickets,
            "concurrency": options.concurrency,
            "workers": options.workers,
            "sales": sales,  # made for the run, and gone after it
        },
    )


def render(report: Report) -> str:
    rows = [
        (r.name, r.per_second, r.extra["p50_ms"], r.extra["p99_ms"],
         r.extra["server_cpu_us_per_request"], r.extra["cpu_ratio_to_bare"],
         r.extra["ratio_to_bare"], " ".join(f"{x:.2f}" for x in r.extra["round_ratios"]),
         r.extra.get("redis_cpu_us_per_request", "-"), r.extra["non_200"])
        for r in report.rows
    ]  # fmt: skip
    targets = [(t.name, t.goal, t.measured, "met" if t.met else "MISSED") for t in report.targets]
    return "\n\n".join([
        table(("row", "req/s", "p50 ms", "p99 ms", "server CPU us/req", "CPU x bare",
               "req/s x bare", "per round", "Redis CPU us/req", "failed"),
              rows),
        table(("target", "goal", "measured", ""), targets),
    ])  # fmt: skip


if __name__ == "__main__":
    serve_bare(int(sys.argv[1]))
