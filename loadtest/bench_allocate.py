"""``flashsale bench allocate``: seven ways to decide "may this buyer have one unit?".

Every row works on one hot SKU with 1,000,000 units, driven by the same number of concurrent
callers from this one process, each caller awaiting one decision at a time. Rows run one after
the other in the same run, so their ratios are comparable even on a noisy machine.

Rows that talk to a server one request at a time share one pool size (``POOL``), so no row
wins by opening more connections. The ceiling row is deliberately not limited by the client:
it sends pre-packed, deep pipelines of ``DECR`` to show what the Redis server itself can do.
"""

from __future__ import annotations

from flashsale.settings import Settings
from loadtest.bench import Report, Row, Target, inconsistent, machine, table
from loadtest.bench_allocate_cluster import cluster_rows
from loadtest.bench_allocate_postgres import postgres_rows
from loadtest.bench_allocate_redis import redis_rows
from loadtest.bench_allocate_rig import BUYERS, POOL, STOCK, Options, Progress, Rig

__all__ = ["FAILURE", "Options", "check_targets", "failed", "render", "run"]

# Targets of the allocation core, checked against this run's own rows.
TARGET_PER_SECOND = 250_000
TARGET_SERVER_US = 1.0
TARGET_VS_POSTGRES = 10.0
TARGET_VS_PER_REQUEST = 3.0
TARGET_VS_CEILING = 0.15  # the batched row's share of the pipelined DECR ceiling


def check_targets(rows: list[Row]) -> list[Target]:
    by = {r.name: r for r in rows}
    batched = by["lua_batched_allocator"]
    per_request = by["lua_per_request"]
    best_pg = max((r for r in rows if r.name.startswith("pg_")), key=lambda r: r.per_second)
    server_us = float(batched.extra["server_us_per_decision"])
    vs_pg = batched.per_second / best_pg.per_second
    vs_lua = batched.per_second / per_request.per_second
    ceiling = by.get("redis_pipelined_decr_ceiling")
    vs_ceiling = batched.per_second / ceiling.per_second if ceiling else 0.0
    return [
        Target("batched decisions/s from one process", f">= {TARGET_PER_SECOND:,}",
               f"{batched.per_second:,.0f}", batched.per_second >= TARGET_PER_SECOND),
        Target("Redis server us per batched decision", f"<= {TARGET_SERVER_US}",
               f"{server_us:.2f}", server_us <= TARGET_SERVER_US),
        Target(f"batched vs best Postgres row ({best_pg.name})", f">= {TARGET_VS_POSTGRES:.0f}x",
               f"{vs_pg:.1f}x", vs_pg >= TARGET_VS_POSTGRES),
        Target("batched vs lua_per_request", f">= {TARGET_VS_PER_REQUEST:.0f}x", f"{vs_lua:.1f}x",
               vs_lua >= TARGET_VS_PER_REQUEST),
        Target("batched vs the pipelined DECR ceiling", f">= {TARGET_VS_CEILING:.0%}",
               f"{vs_ceiling:.1%}", vs_ceiling >= TARGET_VS_CEILING),
    ]  # fmt: skip


FAILURE = "stock moved by a different amount than decisions in"


def failed(report: Report) -> list[str]:
    """The rows whose check failed (named after ``FAILURE``)."""
    return inconsistent(report)


async def run(
    settings: Settings,
    options: Options,
    progress: Progress,
    command: str,
    *,
    cluster: Settings | None = None,
    buckets: int = 1,
) -> Report:
    """Every row on ``settings``' servers; with ``cluster`` (settings of a Redis Cluster), the
    cluster rows too."""
    bench = Rig(settings, options, progress)
    progress(
        f"bench allocate: {options.concurrency} concurrent callers, {options.seconds:g}s per row,"
        f" {STOCK:,} units per SKU"
    )
    pg_version = await postgres_rows(settings, f"bench-{bench.run_id}", bench.measure,
                                     stock=STOCK, connections=POOL)  # fmt: skip
    redis_version = await redis_rows(bench)
    if cluster is not None:
        await cluster_rows(bench, cluster, buckets)
    ceiling = next(r for r in bench.rows if r.name == "redis_pipelined_decr_ceiling")
    for row in bench.rows:
        row.extra["ratio_to_ceiling"] = round(row.per_second / ceiling.per_second, 4)
    return Report(
        benchmark="allocate",
        command=command,
        rows=bench.rows,
        targets=check_targets(bench.rows),
        machine=machine(redis=redis_version, postgres=pg_version),
        config={
            "stock": STOCK, "concurrency": options.concurrency, "seconds_per_row": options.seconds,
            "pool_connections": POOL, "max_batch": options.max_batch, "window_s": options.window,
            "buyers": BUYERS,
        },
    )  # fmt: skip


def render(report: Report) -> str:
    rows = [
        (r.name, r.per_second, r.extra.get("server_us_per_decision"),
         r.extra.get("server_cpu_us_per_decision"), r.extra.get("client_cpu_us_per_decision"),
         r.extra.get("ratio_to_ceiling"), r.extra.get("mean_batch"))
        for r in report.rows
    ]  # fmt: skip
    targets = [(t.name, t.goal, t.measured, "met" if t.met else "MISSED") for t in report.targets]
    nodes = [(r.name, node, f"{v['share']:.1%}", v["server_cpu_us_per_decision"])
             for r in report.rows for node, v in r.extra.get("nodes", {}).items()]  # fmt: skip
    sellouts = [(r.name, r.decisions, r.extra["granted"], r.extra["under_sell"],
                 r.extra["transfers"]) for r in report.rows if "under_sell" in r.extra]  # fmt: skip
    return "\n\n".join([
        table(("row", "decisions/s", "server us/dec", "server cpu us/dec", "client cpu us/dec",
               "x ceiling", "mean batch"), rows),
        *([table(("cluster row", "primary", "share of decisions", "server cpu us/dec"), nodes)]
          if nodes else []),
        *([table(("sell-out", "buyers", "granted", "under-sell", "transfers"), sellouts)]
          if sellouts else []),
        table(("target", "goal", "measured", ""), targets),
    ])  # fmt: skip
