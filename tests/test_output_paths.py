"""Where a command writes a report: checked before it runs, not found wanting after a whole
demo or benchmark; and a file the command cannot write is said as such, not as "a server is
unavailable"."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashsale.settings import Settings

from .conftest import Cli

RUNS = [
    ("demo", "--buyers", "5"),
    ("chaos", "--scenario", "postgres-terminate"),
    ("bench", "allocate", "--seconds", "0.1"),
    ("bench", "gateway", "--seconds", "0.1"),
    ("bench", "pipeline", "--reservations", "10"),
    ("bench", "reconcile", "--skus", "5"),
]


@pytest.mark.parametrize("argv", RUNS, ids=lambda argv: " ".join(argv[:2]))
def test_a_report_path_in_no_folder_is_refused_before_anything_runs(
    argv: tuple[str, ...], run_cli: Cli, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-folder"
    began = time.monotonic()
    result = run_cli(*argv, "--json", str(missing / "report.json"))
    assert result.code == 2, result
    assert result.err.strip() == f"flashsale: error: --json: no folder {missing} to write it in"
    assert time.monotonic() - began < 5  # refused, not run


@pytest.mark.parametrize("argv", RUNS, ids=lambda argv: " ".join(argv[:2]))
def test_a_report_path_that_is_a_folder_is_refused(
    argv: tuple[str, ...], run_cli: Cli, tmp_path: Path
) -> None:
    result = run_cli(*argv, "--json", str(tmp_path))
    assert result.code == 2, result
    assert result.err.strip() == f"flashsale: error: --json: {tmp_path} is a folder"


def test_a_spike_report_folder_that_cannot_be_made_is_refused(run_cli: Cli, tmp_path: Path) -> None:
    """A path through a file was refused as "Not a directory", and a file itself as "File
    exists": each says which file is in the way."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("loadtest", "spike", "--buyers", "5", "--out", str(blocker / "spike"))
    assert result.code == 2, result
    assert result.err.strip() == (
        f"flashsale: error: --out: cannot make the folder {blocker / 'spike'}: {blocker} is a file"
    )
    for argv in (("loadtest", "spike", "--buyers", "5", "--out"),
                 ("bench", "all", "--quick", "--json-dir")):  # fmt: skip
        result = run_cli(*argv, str(blocker))
        assert result.code == 2, result
        assert result.err.strip() == (
            f"flashsale: error: {argv[-1]}: {blocker} is a file, not a folder"
        ), result


def test_a_file_error_is_not_called_a_server_outage(
    run_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError about a file names the file: "a server is unavailable" sent people looking
    at Redis and Postgres."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLASHSALE_HOME", str(blocker / "home"))
    result = run_cli("dev", "up")
    assert result.code == 1, result
    assert result.err.strip() == f"flashsale: error: {blocker / 'home'}: Not a directory"


def test_a_reader_that_stops_reading_is_not_called_a_server_outage(stack: Settings) -> None:
    """``flashsale sale list | head -1``: the pipe that ``head`` closed was "a server is
    unavailable: BrokenPipeError" on stderr, sending people to look at Redis and Postgres.
    Tokens, because their list outgrows the pipe's buffer (64 KiB) on any stack."""
    with subprocess.Popen([sys.executable, "-m", "flashsale", "token", "buyers", "--count",
                           "20000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=os.environ.copy()) as child:  # fmt: skip
        assert child.stdout is not None and child.stderr is not None
        assert child.stdout.readline()  # the first line, as `head -1` reads it
        child.stdout.close()
        err = child.stderr.read().decode()
        child.wait(30)
    assert err == "", err
    assert child.returncode == 141, child.returncode  # as a shell reports a command SIGPIPE ended
