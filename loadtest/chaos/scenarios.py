"""The catalogue of ``flashsale chaos``: every scenario, its fault and its schedule.

A fault scenario injects its fault ``times`` times, one every ``period_s`` seconds, while a
spike of buyers is served (``quick_times`` in ``--quick``; scenarios with none are left out of
it). An abuse scenario sends hostile requests beside the spike instead, and counts those.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from functools import partial

from loadtest.chaos import abuse, abuse_raw, faults
from loadtest.chaos.faults import Injector, repeated


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str  # postgres, redis, broker, processes, payments, network, races, abuse
    what: str
    inject: Injector | None = None
    times: int = 0  # faults in the full suite
    period_s: float = 5.0
    quick_times: int = 0  # faults in --quick; 0 leaves the scenario out of it
    proxied: bool = False  # the engine reaches Redis and Postgres through fault proxies
    postgres_only: bool = False  # only Postgres is out: count reservations granted meanwhile
    cluster_only: bool = False  # needs a Redis Cluster with replicas (dev up --redis-cluster)
    abuse: abuse.Abuse | None = None

    def count(self, quick: bool) -> int:
        return self.quick_times if quick else self.times


def _kill(role: str, times: int, quick: int = 0) -> Scenario:
    what = {
        "gateway": "a gateway process (one of two)",
        "reservations": "the reservations listener (admitted buyers reserve at the gateway "
        "until it is back)",
    }.get(role, f"the {role} process")
    return Scenario(
        f"kill-{role}", "processes", f"SIGKILL of {what} mid-spike; flashsale up restarts it",
        repeated(partial(faults.kill_role, role=role)), times, 6.0, quick,
    )  # fmt: skip


SCENARIOS: list[Scenario] = [
    Scenario("postgres-restart-fast", "postgres", "fast shutdown, then started again",
             repeated(partial(faults.postgres_restart, sig=signal.SIGINT)), 10, 4.0, 2,
             postgres_only=True),
    Scenario("postgres-restart-crash", "postgres",
             "immediate shutdown (a crash: recovery replays the WAL), then started again",
             repeated(partial(faults.postgres_restart, sig=signal.SIGQUIT)), 10, 4.0,
             postgres_only=True),
    Scenario("postgres-terminate", "postgres", "pg_terminate_backend of every engine connection",
             repeated(faults.postgres_terminate), 25, 1.5, postgres_only=True),
    Scenario("postgres-down-30s", "postgres", "down for 30 s, then started again",
             repeated(partial(faults.postgres_restart, sig=signal.SIGINT, down_s=30.0)), 2, 40.0,
             postgres_only=True),
    Scenario("postgres-stall-15s", "postgres",
             "SIGSTOP of Postgres and every backend for 15 s (a hung server: connections "
             "open, nothing answered), then SIGCONT",
             repeated(partial(faults.pause_server, name="postgres", seconds=15.0)), 2, 20.0,
             postgres_only=True),
    Scenario("postgres-max-connections", "postgres",
             "another client takes every free connection slot for 5 s",
             repeated(partial(faults.postgres_exhaust, hold_s=5.0)), 5, 9.0,
             postgres_only=True),
    Scenario("redis-kill-aof", "redis", "SIGKILL, then started again from its AOF",
             repeated(partial(faults.redis_kill, keep_data=True)), 12, 4.0, 2),
    Scenario("redis-restart-empty", "redis",
             "SIGKILL, then started again with no data (a server without persistence)",
             repeated(partial(faults.redis_kill, keep_data=False)), 4, 12.0),
    Scenario("redis-flushall", "redis", "FLUSHALL: every key gone at once",
             repeated(faults.redis_flushall), 4, 12.0),
    Scenario("redis-stall-5s", "redis", "SIGSTOP for 5 s (a stalled server), then SIGCONT",
             repeated(partial(faults.pause_server, name="redis", seconds=5.0)), 5, 8.0),
    Scenario("redis-primary-failover", "redis",
             "SIGKILL of the Redis Cluster primary serving the SKU: its replica is promoted by "
             "the cluster, the killed node rejoins as a replica (cluster stacks only)",
             faults.redis_primary_failover, 3, 20.0, 1, cluster_only=True),
    Scenario("redis-client-kill", "redis", "CLIENT KILL of every engine connection",
             repeated(faults.redis_client_kill), 25, 1.5),
    Scenario("broker-stall-10s", "broker",
             "SIGSTOP of the broker for 10 s (its data is in memory: paused, not restarted)",
             repeated(partial(faults.pause_server, name="kafka", seconds=10.0)), 3, 16.0),
    _kill("gateway", 10),
    _kill("reservations", 8, 1),
    _kill("allocator", 8),
    _kill("workers", 8, 2),
    _kill("reconciler", 8),
    _kill("psp", 8),
    Scenario("allocator-stall", "processes",
             "SIGSTOP of the pump leader for 5 s, beyond its 2 s lease, with a second "
             "allocator running: the fencing token must keep the woken one from admitting",
             faults.with_second_allocator(repeated(partial(faults.pause_pump_leader,
                                                           seconds=5.0))), 6, 8.0),
    Scenario("provider-5xx-storm", "payments", "every charge answers 500 for 3 s",
             repeated(partial(faults.provider_storm, knobs={"error_rate": 1.0}, seconds=3.0)),
             8, 4.0),
    Scenario("provider-timeouts", "payments",
             "every charge captures, then answers after the client gave up, for 3 s",
             repeated(partial(faults.provider_storm, knobs={"timeout_rate": 1.0, "hang_s": 3.0},
                              seconds=3.0)), 8, 4.0),
    Scenario("provider-slow-2s", "payments", "every charge answers after 2 s, for 5 s",
             repeated(partial(faults.provider_storm, knobs={"latency_ms": 2000.0},
                              seconds=5.0)), 6, 7.0),
    Scenario("network-latency", "network", "100 ms added each way to Redis and Postgres for 4 s",
             repeated(partial(faults.network, command="latency 0.1", seconds=4.0)), 6, 6.0,
             proxied=True),
    Scenario("network-reset", "network", "every Redis and Postgres connection reset (RST)",
             repeated(partial(faults.network, command="reset")), 25, 1.5, proxied=True),
    Scenario("network-blackhole", "network",
             "Redis and Postgres unreachable for 3 s: connections open, nothing flows",
             repeated(partial(faults.network, command="blackhole", seconds=3.0)), 5, 7.0,
             proxied=True),
    Scenario("reconciler-race", "races",
             "a second reconciler making passes back to back while buyers reserve and the "
             "workers confirm: it must never release a hold whose order is PAYING or CONFIRMED",
             faults.racing_reconciler, 1, 20.0, 1),
    Scenario("abuse-fuzz", "abuse",
             "schemathesis: requests generated from /openapi.json, valid and invalid",
             abuse=abuse.fuzz),
    Scenario("abuse-slow", "abuse", "slow request heads and bodies (slowloris)",
             abuse=abuse_raw.slow),
    Scenario("abuse-oversized", "abuse", "huge headers, URLs, tokens and bodies",
             abuse=abuse_raw.oversized),
    Scenario("abuse-tokens", "abuse",
             "forged, expired, tampered, replayed and cross-sale buyer tokens, tickets and "
             "admission tokens", abuse=abuse.tokens),
    Scenario("abuse-forwarded", "abuse",
             "spoofed X-Forwarded-For first hops behind a trusted proxy, against a per-IP limit",
             abuse=abuse.forwarded),
    Scenario("abuse-floods", "abuse", "floods of /healthz, /readyz, /metrics and unknown sales",
             abuse=abuse.floods),
]  # fmt: skip

BY_NAME = {s.name: s for s in SCENARIOS}
