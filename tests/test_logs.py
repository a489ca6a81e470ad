"""Structured logs: JSON lines with UTC timestamps, a request id from the gateway's edge, and
one reservation followed from the gateway to its confirmed order by its id alone."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from flashsale.cli.devstack.processes import UP_PORTS, free_ports
from flashsale.errors import ConfigError
from flashsale.logs import JsonFormatter, TextFormatter, bound, configure_logging
from flashsale.settings import Settings
from flashsale.tokens import Signer
from tests.conftest import Cli
from tests.harness import healthy


def _line(formatter: logging.Formatter, **extra: str) -> str:
    record = logging.LogRecord("flashsale.test", logging.INFO, __file__, 1, "hello %s",
                               ("world",), None)  # fmt: skip
    for key, value in extra.items():
        setattr(record, key, value)
    return formatter.format(record)


def test_a_json_line_has_a_utc_timestamp_the_level_and_the_fields() -> None:
    data = json.loads(_line(JsonFormatter(), reservation_id="r-1"))
    assert data["ts"].endswith("Z") and data["ts"][10] == "T" and len(data["ts"]) == 24
    assert (data["level"], data["logger"], data["message"]) == ("INFO", "flashsale.test",
                                                                "hello world")  # fmt: skip
    assert data["reservation_id"] == "r-1"
    text = _line(TextFormatter(), request_id="q-1")
    assert text.split()[0].endswith("Z") and text.endswith("hello world request_id=q-1")


def test_the_runbooks_grep_for_errors_finds_an_error_line() -> None:
    """RUNBOOK's FlashsaleGateway5xx says to grep the logs for a text: it was
    ``"level": "ERROR"``, with a space the JSON lines do not have, so it found nothing."""
    runbook = (Path(__file__).resolve().parent.parent / "docs" / "RUNBOOK.md").read_text()
    said = runbook.split("Grep the gateway's logs for `", 1)[1].split("`", 1)[0]
    record = logging.LogRecord("flashsale.gateway", logging.ERROR, __file__, 1,
                               "unhandled error on %s %s", ("GET", "/v1/x"), None)  # fmt: skip
    line = JsonFormatter().format(record)
    assert said in line, (said, line)
    info = JsonFormatter().format(logging.LogRecord("flashsale.gateway", logging.INFO,
                                                    __file__, 1, "fine", (), None))  # fmt: skip
    assert said not in info


def test_bound_fields_reach_every_line_and_secrets_do_not(stack: Settings) -> None:
    settings = dataclasses.replace(stack, log_format="json")
    configure_logging(settings)
    root = logging.getLogger()
    handler = next(h for h in root.handlers if type(h).__name__ == "_EngineHandler")
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        with bound(request_id="abc", sale=None):
            logging.getLogger("flashsale.t").warning("token %s", stack.admin_token.current())
        logging.getLogger("flashsale.t").warning("outside")
    finally:
        handler.setStream(sys.stderr)  # type: ignore[attr-defined]
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["request_id"] == "abc" and "sale" not in inside
    assert stack.admin_token.current() not in inside["message"]
    assert "request_id" not in outside
    with pytest.raises(ConfigError, match="FLASHSALE_LOG_FORMAT"):
        Settings.from_env({**os.environ, "FLASHSALE_LOG_FORMAT": "xml"})


def _loggers_of(log_path: Path, rid: str) -> set[str]:
    """The loggers that wrote a line about reservation ``rid`` so far (a line being written
    is skipped)."""
    found = set()
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("reservation_id") == rid:
                found.add(record["logger"])
    return found


def test_one_reservation_is_followed_through_the_services_by_its_id(
    stack: Settings, cli: Cli, tmp_path: Path
) -> None:
    port = free_ports(UP_PORTS)
    log_path = tmp_path / "engine.log"
    with log_path.open("wb") as log_file:
        up = subprocess.Popen(
            [sys.executable, "-m", "flashsale", "up", "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "FLASHSALE_LOG_FORMAT": "json", "FLASHSALE_LOG_LEVEL": "INFO"},
        )  # fmt: skip
        try:
            for offset in range(UP_PORTS):
                healthy(f"http://127.0.0.1:{port + offset}/healthz")
            sale = cli("sale", "create", "--name", "logged", "--sku", "A", "--stock", "3",
                       "--price", "100", "--currency", "EUR").out.strip()  # fmt: skip
            cli("sale", "preload", sale)
            base = f"http://127.0.0.1:{port}/v1/sales/{sale}"
            buyer = Signer.from_setting(stack.buyer_token_secret.reveal(), "buyer")
            auth = {"Authorization": f"Bearer {buyer.sign({'sub': 'logged-1'}, 600)}"}
            joined = requests.post(f"{base}/queue", headers=auth, timeout=5)
            assert joined.status_code == 200, joined.text
            assert len(joined.headers["X-Request-Id"]) == 16  # made up at the edge
            ticket = joined.json()["ticket"]
            deadline = time.monotonic() + 20
            while True:
                status = requests.get(f"{base}/queue/status", timeout=5,
                                      headers={"X-Queue-Ticket": ticket}).json()  # fmt: skip
                if "admission_token" in status or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            reserved = requests.post(
                f"{base}/reservations", timeout=10,
                json={"sku": "A", "quantity": 1, "payment_token": "tok_visa"},
                headers={**auth, "X-Admission-Token": status["admission_token"],
                         "Idempotency-Key": "logged-1", "X-Request-Id": "shop-req-42"},
            )  # fmt: skip
            assert reserved.status_code == 201, reserved.text
            assert reserved.headers["X-Request-Id"] == "shop-req-42"  # the caller's, kept
            rid = reserved.json()["reservation_id"]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                order = requests.get(f"http://127.0.0.1:{port}/v1/reservations/{rid}",
                                     headers=auth, timeout=5).json()  # fmt: skip
                if (order.get("order") or {}).get("state") == "CONFIRMED":
                    break
                time.sleep(0.3)
            # The workers' line is written after the commit, the relay's after its round (the
            # gateway's own announcement may reach the workers first): wait for both. This
            # engine relays every sale the earlier tests left open on the stack: on a busy
            # clean-clone run its relay took more than 15 s to come to this one.
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and not (
                {"flashsale.relay", "flashsale.saga"} <= _loggers_of(log_path, rid)
            ):
                time.sleep(0.2)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()
             if line.startswith("{")]  # fmt: skip
    assert lines and all(line["ts"].endswith("Z") for line in lines)
    story = [line for line in lines if line.get("reservation_id") == rid]
    by_logger = {line["logger"]: line for line in story}
    assert by_logger["flashsale.gateway"]["request_id"] == "shop-req-42", story
    assert "flashsale.relay" in by_logger, story
    assert any(line["message"] == "order CONFIRMED" for line in story), story
