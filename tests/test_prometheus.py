"""The alert rules and the Grafana dashboard, proven on a real Prometheus (Debian's
``prometheus``, which `make test` installs with apt when missing): the rules load, every
alert has its runbook section, every dashboard panel's query has data while ``flashsale up``
serves a short spike, and stopping the workers makes the consumer-lag alert fire (its
``for: 15s`` shortened here; test_alert_rules proves the rule's wait as shipped)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml  # type: ignore[import-untyped]

from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.settings import Settings
from flashsale.tokens import Signer
from loadtest import admin_api
from loadtest.driver import Buyers, Person
from loadtest.processes import engine, stop_all, tree, wait_consuming, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "flashsale.json"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
# flashsale up's services, by their port's offset from the gateway's
JOBS = {"flashsale-gateway": 0, "flashsale-allocator": 1, "flashsale-workers": 2,
        "flashsale-psp": 3, "flashsale-reconciler": 4}  # fmt: skip


@pytest.fixture
def prometheus() -> Iterator[str]:
    found = shutil.which("prometheus")
    if found is None or shutil.which("promtool") is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: `make test` installs it (apt) when root")
        pytest.skip("prometheus is not installed (apt install prometheus)")
    yield found


def alerts() -> list[dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel.get("targets", [])]  # fmt: skip


def test_every_alert_points_at_its_runbook_section() -> None:
    sections = {re.sub(r"[^a-z0-9-]", "", line[3:].strip().lower().replace(" ", "-"))
                for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}  # fmt: skip
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)) >= 10
    for rule in alerts():
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == rule["alert"].lower() and anchor in sections, rule["alert"]


def test_the_rules_load_in_promtool(prometheus: str) -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def _rules_with_a_short_lag_wait(folder: Path) -> Path:
    """The shipped rules, the consumer-lag alert waiting 1 s instead of 15 s for its backlog
    (the wait itself is promtool's to prove, in test_alert_rules)."""
    rules = yaml.safe_load(RULES.read_text())
    lag = next(rule for group in rules["groups"] for rule in group["rules"]
               if rule.get("alert") == "FlashsaleConsumerLag")  # fmt: skip
    lag["for"] = "1s"
    copy = folder / "alerts.yml"
    copy.write_text(yaml.safe_dump(rules))
    return copy


def _argv(pid: int) -> list[bytes]:
    """A process's arguments (``flashsale workers ...`` is the workers' service; the
    supervisor's own ``--workers 2`` is not)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


async def _lag_alert_or_backlog(session: aiohttp.ClientSession, base: str) -> bool:
    """The consumer-lag alert is pending or firing, or the lag is above its threshold."""
    async with session.get(f"{base}/api/v1/alerts") as r:
        listed = (await r.json())["data"]["alerts"]
    if any(a["labels"]["alertname"] == "FlashsaleConsumerLag" for a in listed):
        return True
    lag = await _query(session, base, "max(flashsale_consumer_lag_messages)")
    return not lag or float(lag[0]["value"][1]) > 100


async def _query(session: aiohttp.ClientSession, base: str, expr: str) -> list[Any]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as r:
        body = await r.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


async def _spike(base: str, settings: Settings, session: aiohttp.ClientSession, *,
                 buyers: int, stock: int, tag: str) -> dict[str, int]:  # fmt: skip
    spec = {"name": f"Prometheus {tag}", "starts_at": datetime.now(UTC).isoformat(),
            "ends_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            "admission_rate": 1000,
            "skus": [{"sku": "P-1", "stock": stock, "price": 100, "currency": "EUR"}]}  # fmt: skip
    sale = await admin_api.create_sale(session, base, settings.admin_token.current(), spec)
    signer = Signer.from_setting(settings.buyer_token_secret.reveal(), "buyer")
    people = [Person(signer.sign({"sub": f"{tag}-{sale}-{i}"}, 600),
                     "tok_decline" if i % 10 == 9 else "tok_visa")
              for i in range(buyers)]  # fmt: skip
    stats = await Buyers(base, sale, "P-1", patience_s=60).run(people, concurrency=100)
    return dict(stats.outcomes)


async def test_dashboard_panels_have_data_and_the_lag_alert_fires(
    stack: Settings, prometheus: str, tmp_path: Path
) -> None:
    port = free_ports(UP_PORTS + 1)
    prom_port = port + UP_PORTS
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_rules_with_a_short_lag_wait(tmp_path))],
        "scrape_configs": [{"job_name": job, "static_configs": [
            {"targets": [f"127.0.0.1:{port + offset}"]}]} for job, offset in JOBS.items()],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_base = f"http://127.0.0.1:{prom_port}"
    base = f"http://127.0.0.1:{port}"
    with engine(stack, port, tmp_path / "engine.log") as up, \
            (tmp_path / "prometheus.log").open("wb") as prom_log:  # fmt: skip
        prom = subprocess.Popen(  # noqa: ASYNC220 - started once, before any await
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=prom_log,
        )  # fmt: skip
        workers: int | None = None
        try:
            async with aiohttp.ClientSession() as session:
                for offset in JOBS.values():
                    await wait_healthy(session, f"http://127.0.0.1:{port + offset}/healthz")
                await wait_healthy(session, f"{prom_base}/-/ready")
                outcomes = await _spike(base, stack, session, buyers=150, stock=100, tag="a")
                assert outcomes.get("reserved", 0) > 0, outcomes

                # Every panel has data (rates need two scrapes of the spike: retried a while).
                missing = panel_queries()
                deadline = time.monotonic() + 30
                while missing and time.monotonic() < deadline:
                    missing = [
                        (t, e) for t, e in missing if not await _query(session, prom_base, e)
                    ]
                    await asyncio.sleep(1)
                assert not missing, missing

                # The first spike's reservations consumed, and the alert quiet: the workers
                # wait up to about 18 s for their partitions when the group had a member that
                # left (an earlier test's), and the alert then fired for that backlog, which
                # they had drained by the time the lag below was read.
                await wait_consuming(
                    session, f"http://127.0.0.1:{port + JOBS['flashsale-workers']}/metrics"
                )
                deadline = time.monotonic() + 60
                while await _lag_alert_or_backlog(session, prom_base):
                    assert time.monotonic() < deadline, "the first spike's backlog stayed"
                    await asyncio.sleep(1)

                # Stop the workers (SIGSTOP: the broker keeps its data): reservations pile up
                # unconsumed, the reconciler reads the lag, the alert fires.
                workers = next(pid for pid in tree(up.pid)
                               if pid != up.pid and b"workers" in _argv(pid))  # fmt: skip
                os.kill(workers, signal.SIGSTOP)
                await _spike(base, stack, session, buyers=160, stock=200, tag="b")
                deadline = time.monotonic() + 60
                firing: list[str] = []
                while time.monotonic() < deadline and "FlashsaleConsumerLag" not in firing:
                    async with session.get(f"{prom_base}/api/v1/alerts") as r:
                        listed = (await r.json())["data"]["alerts"]
                    firing = [a["labels"]["alertname"] for a in listed if a["state"] == "firing"]
                    await asyncio.sleep(1)
                assert "FlashsaleConsumerLag" in firing, (firing, listed)
                lag = await _query(session, prom_base, "max(flashsale_consumer_lag_messages)")
                assert float(lag[0]["value"][1]) > 100
        finally:
            if workers is not None:
                os.kill(workers, signal.SIGCONT)
            stop_all([prom], grace_s=10)
