"""``flashsale dev`` (the embedded stack), ``flashsale migrate`` and ``flashsale kafka``
(``init``, ``dead-letters``, ``resend-dead-letters``): the servers, the schema and the
topics."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from flashsale.cli.checks import duration, seconds, within
from flashsale.cli.devstack.redis_cluster import Layout
from flashsale.cli.devstack.stack import DevStack, ServerStatus
from flashsale.cli.output import Stages, dump_json, out, warn
from flashsale.clients import pg_connect
from flashsale.dead_letters import DeadLetters, Resending, read_dead_letters, resend_dead_letters
from flashsale.engine_record import answers, running_benches, running_engines
from flashsale.errors import InvalidInput, SchemaBehind
from flashsale.kafka import ensure_topics
from flashsale.migrate import migrate, require_current
from flashsale.settings import Settings
from flashsale.wording import counted, rerun

SHOWN_CHARS = 300  # of a parked message's value, in the text listing


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    stack = DevStack(settings.home)
    if args.dev_command == "up":
        layout = None
        if args.redis_cluster is not None:
            layout = Layout(within("redis-cluster", args.redis_cluster, 3, 16),
                            within("replicas", args.replicas, 0, 2))  # fmt: skip
        elif args.replicas != "0":
            raise InvalidInput("replicas", "needs --redis-cluster N")
        took = stack.up(timeout=seconds("timeout", args.timeout), cluster=layout)
        out(f"stack ready in {took:.1f}s; env in {stack.env_file}")
        out(f'use it from a shell with: eval "$({rerun("dev", "env")})"')
        behind = asyncio.run(_schema_behind(Settings.from_env()))
        if behind:
            out(f"the database schema is not current: {behind}")
        return 0
    if args.dev_command == "down":
        for engine in running_engines(stack.home):  # said, not stopped: it is not the stack's
            pid = engine["pid"]
            warn(f"an engine runs on this stack (flashsale up, pid {pid}, {engine['gateway']}): "
                 f"its services lose their servers now; stop it (Ctrl-C in its terminal, or "
                 f"kill -TERM {pid})")  # fmt: skip
        for bench in running_benches(stack.home):
            warn(f"a benchmark runs on this stack (flashsale bench {bench['bench']}, pid "
                 f"{bench['pid']}): it loses its servers now and fails")  # fmt: skip
        stack.down(purge=args.purge)
        return 0
    if args.dev_command == "env":  # and the stack's folder: later commands find it from anywhere
        sys.stdout.write(
            stack.env_lines() + f"export FLASHSALE_HOME={shlex.quote(str(stack.home))}\n"
        )
        return 0
    rows = [*stack.status(), *_engines(stack.home), *_benches(stack.home)]
    wide = max((len(row.url or "-") for row in rows), default=1)
    for row in rows:
        where = row.url or "-"
        pid = f"pid {row.pid}" if row.pid else ""
        version = f"v{row.version}" if row.version else ""
        out(f"{row.name:9} {row.state:9} {where:{wide}} {pid:10} {version:8} {row.detail}")
    names = {row.name for row in rows}
    if "engine" not in names:
        out("no engine runs on this stack: `flashsale up` starts one"
            + (" once the benchmark ends" if "bench" in names else ""))  # fmt: skip
    return 0 if all(r.state in ("running", "external") for r in rows) else 3


def _engines(home: Path) -> list[ServerStatus]:
    """A row for each ``flashsale up`` running on the stack: its gateway, whether it
    answers, its pages and the ports of its other services."""
    rows = []
    for engine in running_engines(home):
        gateway = engine["gateway"]
        parts = [f"live page {engine['admin_page']}"]
        if engine.get("reservations"):
            parts.append(f"reservations {engine['reservations']}")
        ports = ", ".join(f"{name} :{port}" for name, port in engine["ops"].items())
        parts.append(f"ops: {ports}")
        state = "running" if answers(f"{gateway}/livez") else "no answer"
        rows.append(ServerStatus("engine", state, gateway, engine["pid"], None,
                                 engine.get("version"), "; ".join(parts)))  # fmt: skip
    return rows


def _benches(home: Path) -> list[ServerStatus]:
    """A row for each benchmark that makes sales running on the stack: an engine is refused
    there until it ends."""
    return [ServerStatus("bench", "running", None, bench["pid"],
                         detail=f"flashsale bench {bench['bench']}: an engine starts here "
                                "once it ends")
            for bench in running_benches(home)]  # fmt: skip


async def _schema_behind(settings: Settings) -> str | None:
    """What is missing from the stack's database schema, None when it is current."""
    conn = await pg_connect(settings)
    try:
        await require_current(conn)
    except SchemaBehind as exc:
        return exc.message
    finally:
        await conn.close()
    return None


async def apply_migrations(settings: Settings, progress: Callable[[str], None] = out) -> None:
    """Every pending migration, over one connection; Unavailable when Postgres is not there."""
    conn = await pg_connect(settings)
    try:
        await migrate(conn, progress=progress)
    finally:
        await conn.close()


async def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    await apply_migrations(settings)
    return 0


async def cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    if args.kafka_command == "dead-letters":
        letters = await read_dead_letters(settings, within("limit", args.limit, 1, 10_000))
        if args.json:
            dump_json(letters)
        else:
            show_dead_letters(letters)
        return 0
    if args.kafka_command == "resend-dead-letters":
        if args.reason is not None and not args.reason.strip():
            raise InvalidInput("reason", "must name part of the reasons to resend, got blanks")
        limit = within("limit", args.limit, 1, 1_000_000)
        since = duration("within", args.within) if args.within is not None else None
        stages = Stages("resending the dead letters")
        plan = await stages.over(resend_dead_letters(
            settings, limit=limit, reason=args.reason, within=since, dry_run=args.dry_run,
            doing=stages,
        ))  # fmt: skip
        show_resent(plan, dry_run=args.dry_run)
        return 0
    partitions = within("partitions", args.partitions, 1, 1024) if args.partitions else None
    factor = within("replication-factor", args.replication_factor, 1, 7)
    await ensure_topics(settings, progress=out, partitions=partitions, replication_factor=factor)
    return 0


def show_dead_letters(letters: DeadLetters) -> None:
    if not letters.exists:
        out(f"no topic {letters.topic} on the broker yet: `flashsale kafka init` or the "
            "services at their start make it")  # fmt: skip
        return
    if not letters.messages:
        gone = f" ({counted(letters.parked, 'message')} parked before, dropped by its " \
            "retention)" if letters.parked else ""  # fmt: skip
        out(f"no message is parked on {letters.topic}{gone}")
        return
    shown = "" if len(letters.messages) == letters.kept else f"; the last {len(letters.messages)}"
    out(f"{counted(letters.parked, 'message')} parked on {letters.topic}{shown}:")
    for m in letters.messages:
        value = m.value if len(m.value) <= SHOWN_CHARS else m.value[:SHOWN_CHARS] + "…"
        out(f"{m.at}  from {m.source or '?'}  {m.reason or '(no reason given)'}")
        out(f"    key {m.key!r}  value {value}")


def show_resent(plan: Resending, *, dry_run: bool) -> None:
    if not plan.read:
        out(f"no message is parked on {plan.dead_letter}")
        return
    if not plan.matched:
        which = "the one parked message does not match" if plan.read == 1 else \
            f"none of the {counted(plan.read, 'newest parked message')} matches"  # fmt: skip
        out(f"{which} (`flashsale kafka dead-letters` lists them)")
        return
    for topic, records in plan.topics.items():
        out(f"{'would resend' if dry_run else 'resent'} {counted(len(records), 'message')} "
            f"to {topic}")  # fmt: skip
    for why, n in plan.left.items():
        out(f"{n} not resent: {why}")
    if plan.topics and not dry_run:
        out("the workers and the webhooks take them as they come; one parked again is counted "
            "by the alert FlashsaleDeadLetters")  # fmt: skip


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = commands.add_parser("dev", help="embedded Redis + PostgreSQL + Kafka broker")
    dev.set_defaults(handler=cmd_dev)
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    up = dev_sub.add_parser("up", help="start (or reuse) the stack; write its dev.env (in "
                                       "FLASHSALE_HOME, or ./.flashsale)")  # fmt: skip
    up.add_argument(
        "--timeout", default="30", help="seconds to wait, or a duration as 2m (default 30)"
    )
    up.add_argument(
        "--redis-cluster", metavar="N",
        help="run Redis as a Redis Cluster of N primaries (3..16) on loopback; kept for this "
        "FLASHSALE_HOME until `dev down --purge`. `dev env` then exports "
        "FLASHSALE_REDIS_CLUSTER=1",
    )  # fmt: skip
    up.add_argument(
        "--replicas",
        metavar="R",
        default="0",
        help="replicas of each primary, 0..2 (default 0), with --redis-cluster",
    )
    down = dev_sub.add_parser("down", help="stop the stack cleanly")
    down.add_argument("--purge", action="store_true", help="also delete its data and secrets")
    dev_sub.add_parser("status", help="what runs where (exit 3 if something is down)")
    dev_sub.add_parser("env", help="print the export lines of the stack's dev.env, and "
                                   "FLASHSALE_HOME (the stack's folder)")  # fmt: skip

    migrate_ = commands.add_parser(
        "migrate",
        help="apply pending Postgres migrations (re-runnable)",
        description="Apply the Postgres migrations DATABASE_URL's database does not have yet, "
        "in order, each in its own transaction. Re-runnable, also by several processes at "
        "once (they take turns); a migration edited after it was applied is refused.",
    )
    migrate_.set_defaults(handler=cmd_migrate)

    kafka = commands.add_parser(
        "kafka", help="create the Kafka topics; read the dead letters and send them again"
    )
    kafka.set_defaults(handler=cmd_kafka)
    kafka_sub = kafka.add_subparsers(dest="kafka_command", required=True, metavar="ACTION")
    init = kafka_sub.add_parser(
        "init", help="create the topics that are missing (reservations, order events, dead "
        "letters; names from FLASHSALE_TOPIC_*); topics that exist are left as they are",
    )  # fmt: skip
    init.add_argument(
        "--partitions", metavar="N",
        help="partitions of the reservations and order-events topics, 1..1024 (default 8 and "
        "4): the most worker processes that share the work",
    )  # fmt: skip
    init.add_argument(
        "--replication-factor",
        metavar="R",
        default="1",
        help="copies of each partition, 1..7 (default 1; 3 on a real cluster)",
    )
    dead = kafka_sub.add_parser(
        "dead-letters", help="list the newest messages parked on the dead-letter topic, with "
        "where each came from and why (read without a consumer group: nothing changes)",
        description="List the newest messages the workers and the relay parked on the "
        "dead-letter topic (FLASHSALE_TOPIC_DEAD_LETTER): when, where each came from "
        "(topic/partition/offset, or an outbox), the reason, and the message. It reads without "
        "a consumer group, so it changes nothing.",
    )  # fmt: skip
    dead.add_argument("--limit", metavar="N", default="20",
                      help="show the newest N, 1..10000 (default 20)")  # fmt: skip
    dead.add_argument("--json", action="store_true", help="the messages as JSON")
    resend = kafka_sub.add_parser(
        "resend-dead-letters", help="send parked messages again to the topic each came from, "
        "once their cause is mended (a shop that refused webhooks, a fixed bug)",
        description="Send the parked messages you choose among the newest --limit of the "
        "dead-letter topic back to the topic each came from (its source: the reservations "
        "topic for the saga's, order-events for the webhooks'), with the same key and value "
        "and a header `resent` naming the dead letter. The workers and the webhooks take a "
        "message twice without harm. The dead letters stay on their topic; the relay's outbox "
        "entries cannot be sent again and are counted. Look first with --dry-run.",
    )  # fmt: skip
    resend.add_argument("--reason", metavar="TEXT",
                        help="only those whose reason holds TEXT, in any case (e.g. "
                        "'webhook refused', 'HTTP 422', 'failed 3 times')")  # fmt: skip
    resend.add_argument(
        "--within",
        metavar="DURATION",
        help="only those parked in the last DURATION (90s, 10m, 2h, 1d, 1h30m)",
    )
    resend.add_argument("--limit", metavar="N", default="10000",
                        help="choose among the newest N, 1..1000000 (default 10000)")  # fmt: skip
    resend.add_argument("--dry-run", action="store_true",
                        help="say what would be sent, send nothing")  # fmt: skip
