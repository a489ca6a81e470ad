"""The engine behind a transaction pooler: PgBouncer with ``pool_mode = transaction`` in front
of the stack's Postgres, as a managed service's pooled endpoint is, with
``FLASHSALE_PG_POOL_MODE=transaction``.

Each transaction may run on another server connection there, so nothing may outlive one. The
control case shows what happens otherwise: asyncpg's named prepared statements collide on the
pooler's few server connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from flashsale.cli.devstack.processes import free_port
from flashsale.clients import pg_connect, pg_pool
from flashsale.errors import FlashsaleError
from flashsale.migrate import migrate
from flashsale.ops_endpoints import check, ping_postgres
from flashsale.settings import Settings
from tests.conftest import REPO
from tests.lone_redis import wait_listening
from tests.pipeline import pipeline
from tests.test_pipeline import assert_invariants

SERVER_CONNECTIONS = 2  # fewer than the clients' connections, as in production


def _pgbouncer() -> tuple[str, dict[str, str]] | None:
    """Debian's pgbouncer (on PATH, or unpacked under .venv/pgbouncer by `make pgbouncer`)
    and the environment it runs in."""
    if found := shutil.which("pgbouncer"):
        return found, {}
    unpacked = REPO / ".venv" / "pgbouncer"
    binary = unpacked / "usr" / "sbin" / "pgbouncer"
    if not binary.is_file():
        return None
    libs = ":".join(str(p) for p in (unpacked / "usr" / "lib").glob("*-linux-gnu"))
    return str(binary), {"LD_LIBRARY_PATH": libs}


@pytest.fixture
def pooled(stack: Settings) -> Iterator[Settings]:
    """``stack`` with DATABASE_URL leading to a PgBouncer in transaction mode, and
    ``FLASHSALE_PG_POOL_MODE=transaction``."""
    found = _pgbouncer()
    if found is None:
        how = ("`make pgbouncer` fetches Debian's (apt-get download pgbouncer libc-ares2), or "
               "install it (apt install pgbouncer)")  # fmt: skip
        if os.environ.get("CI"):
            pytest.fail(f"pgbouncer not found, which `make test` fetches: {how}")
        pytest.skip(f"pgbouncer not found: {how}")
    binary, env = found
    direct = urlsplit(stack.require_database())
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    folder.chmod(0o755)  # pgbouncer refuses to run as root: it runs as nobody then
    (folder / "users.txt").write_text(f'"{direct.username}" "{direct.password}"\n')
    (folder / "pgbouncer.ini").write_text(
        f"[databases]\n{direct.path.lstrip('/')} = host={direct.hostname} port={direct.port}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = plain\nauth_file = {folder / 'users.txt'}\npool_mode = transaction\n"
        f"default_pool_size = {SERVER_CONNECTIONS}\nmax_client_conn = 500\n"
        f"logfile = {folder / 'pgbouncer.log'}\n"
    )
    (folder / "pgbouncer.log").touch()
    for path in folder.iterdir():
        path.chmod(0o666 if path.suffix == ".log" else 0o644)
    server = subprocess.Popen(
        [binary, str(folder / "pgbouncer.ini")], env={**os.environ, **env},
        user="nobody" if os.geteuid() == 0 else None,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port, server, folder / "pgbouncer.log")
        through = urlunsplit(direct._replace(netloc=f"{direct.username}:{direct.password}"
                                                    f"@127.0.0.1:{port}"))  # fmt: skip
        yield dataclasses.replace(stack, database_url=through, pg_pool_mode="transaction")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


# One service process: three pooled connections, each running statements of its own. asyncpg
# names prepared statements by a counter of its process, so two processes (the gateway and
# the allocator, say) give theirs the same names.
SERVICE = """
import asyncio, sys
from flashsale.clients import pg_pool
from flashsale.outages import describe, is_outage
from flashsale.settings import Settings

async def main():
    pool = await pg_pool(Settings.from_env(), min_size=3, max_size=3)
    async def queries(k):
        for n in range(20):
            await pool.fetchval(f"SELECT $1::int + {n} + {k}", 1)
    try:
        await asyncio.gather(*(queries(k) for k in range(3)))
    except Exception as exc:
        sys.exit(("outage: " if is_outage(exc) else "") + describe(exc).splitlines()[0])
    finally:
        await pool.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_two_services_behind_the_pooler_need_the_setting(pooled: Settings, mode: str
                                                               ) -> None:  # fmt: skip
    env = {**os.environ, "DATABASE_URL": pooled.require_database(), "FLASHSALE_PG_POOL_MODE": mode}
    services = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVICE, env=env, stderr=asyncio.subprocess.PIPE,
    ) for _ in range(2)]  # fmt: skip
    said = [(await service.communicate())[1].decode().strip() for service in services]
    codes = [service.returncode for service in services]
    if mode == "transaction":
        assert codes == [0, 0], said
    else:  # the second name given twice on one server connection
        assert any(code != 0 and "prepared statement" in text
                   for code, text in zip(codes, said, strict=True)), said  # fmt: skip
        # Said as the setting it is, and waited out: taken for bad data, a reservation whose
        # order met it was parked on the dead letters.
        assert all(
            text.startswith("outage: ") and "set FLASHSALE_PG_POOL_MODE=transaction" in text
            for code, text in zip(codes, said, strict=True)
            if code
        ), said


async def test_a_session_setting_refused_by_the_pooler_names_the_setting(pooled: Settings
                                                                         ) -> None:  # fmt: skip
    """The workers ask for a session setting at connect; a pooler refuses it, and the
    service read "cannot reach Postgres: unsupported startup parameter"."""
    session = dataclasses.replace(pooled, pg_pool_mode="session")
    with pytest.raises(FlashsaleError) as refused:
        await pg_pool(session, server_settings={"plan_cache_mode": "force_custom_plan"})
    assert "set FLASHSALE_PG_POOL_MODE=transaction" in refused.value.message, refused.value


async def test_the_order_pipeline_and_migrations_run_behind_a_transaction_pooler(
    pooled: Settings,
) -> None:
    conn = await pg_connect(pooled)
    try:
        said: list[str] = []
        assert await migrate(conn, progress=said.append) == []
        assert said == ["schema up to date"]
        assert await check(lambda: ping_postgres(conn)) is None  # the readiness probe
    finally:
        await conn.close()
    async with pipeline(pooled) as p:  # the workers' pool asks for session settings
        sale = await p.sale(stock=40)
        ids = await p.reserve(sale, ["tok_visa"] * 30 + ["tok_decline"] * 10)
        workers = p.start_workers()
        states = await assert_invariants(p, sale, ids)
        assert sorted(states.values()).count("CONFIRMED") == 30
        await asyncio.wait_for(workers.drain(), 30)
