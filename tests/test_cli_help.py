"""The CLI explains itself: every argument has help text, and no help sends the reader to a
document the installed package does not have (README and docs/ live in the repository)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from flashsale.cli import build_parser, main
from flashsale.cli.checks import seconds
from flashsale.errors import InvalidInput
from flashsale.salespec import parse_sale
from flashsale.wording import rerun
from tests.conftest import Cli

# The benchmark and fault-suite commands run from the repository and rewrite its result
# tables: naming the file they write is not sending the reader to it.
WRITES_A_DOCUMENT = {("chaos", "--doc"), ("bench all", "--doc"), ("chaos", "description"),
                     ("bench all", "description")}  # fmt: skip
CITES = re.compile(r"\bdocs/|\bREADME\b|\.md\b")


def parsers(parser: argparse.ArgumentParser, path: str = "") -> Iterator[
        tuple[str, argparse.ArgumentParser]]:  # fmt: skip
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}".strip())


def test_every_argument_has_help_and_cites_nothing_unshipped() -> None:
    missing, citing = [], []
    for path, parser in parsers(build_parser()):
        for text in (parser.description or "", parser.epilog or ""):
            if CITES.search(text) and (path, "description") not in WRITES_A_DOCUMENT:
                citing.append((path, "description"))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            if not action.help:
                missing.append((path, name))
            elif CITES.search(action.help) and (path, name) not in WRITES_A_DOCUMENT:
                citing.append((path, name))
    assert not missing, missing
    assert not citing, citing


def test_every_commands_help_says_what_it_does() -> None:
    """`flashsale sale preload --help` showed only its usage and options: what a command does
    was in the list of its group's commands, not on its own page."""
    silent = [path for path, parser in parsers(build_parser())
              if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
              and not (parser.description or "").strip()]  # fmt: skip
    assert not silent, silent
    commands = dict(parsers(build_parser()))
    assert commands["dev down"].description == "Stop the stack cleanly."  # its line in the list
    assert (commands["sale preload"].description or "").startswith("Copy the sale's")


def test_no_help_shows_a_doubled_percent_sign() -> None:
    """argparse %-formats an argument's help but prints a description as written: a ``%%``
    meant for the one shows up doubled in the other."""
    doubled = []
    for path, parser in parsers(build_parser()):
        if "%%" in parser.format_help():
            doubled.append(path)
    assert not doubled, doubled


def test_a_share_below_zero_is_told_the_range_of_a_share(run_cli: Cli) -> None:
    """A share is within 0..1 whichever side it misses: -0.1 was told "must be from 0 to
    1,000,000,000", the range of a count."""
    for field in ("decline", "no-show", "abandon", "pre-queue"):
        result = run_cli("demo", f"--{field}", "-0.1")
        assert result.code == 2, result
        assert result.err.strip() == f"flashsale: error: --{field}: must be within 0..1, got '-0.1'"


def test_a_port_out_of_range_is_told_the_range_of_a_port(run_cli: Cli) -> None:
    """0 and -1 were told "must be a positive number up to 1,000,000,000", 1.5 "a positive
    number": only 70000 was told what a port is."""
    for value in ("0", "-1", "1.5", "x", "70000"):
        result = run_cli("gateway", "--port", value)
        assert result.code == 2, result
        assert result.err.strip() == (
            f"flashsale: error: --port: must be a TCP port (1..65535), got '{value}'"
        ), result.err


@pytest.mark.parametrize("argv", [
    ("token", "buyers", "--count"), ("demo", "--buyers"),
    ("sale", "status", "s", "--watch", "--count"),
])  # fmt: skip
def test_a_count_given_a_fraction_is_told_it_takes_a_whole_number(
    run_cli: Cli, argv: tuple[str, ...]
) -> None:
    """`token buyers --count 1.5` was told "must be a positive number, got '1.5'", which it
    is; a count is a whole number."""
    flag = argv[-1]
    for value, said in (("1.5", "a positive whole number"), ("1e3", "a positive whole number"),
                        ("0", "a positive whole number up to 1,000,000,000")):  # fmt: skip
        result = run_cli(*argv, value)
        assert (result.code, result.err.strip()) == (
            2, f"flashsale: error: {flag}: must be {said}, got '{value}'"), result  # fmt: skip


def test_bad_flags_are_refused_before_any_server_is_asked(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no stack running, `sale status S --watch --count 1.5` was told that REDIS_URL is
    not set: its flags were read once connected, as were `--count` without `--watch` and
    `show --left` without `--template`; so were `sale list`'s page, the units of
    `add-stock` and `remove-stock` and the rate of `set-rate`."""
    for name in ("REDIS_URL", "DATABASE_URL", "KAFKA_BOOTSTRAP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path))  # no stack there
    refusals = {
        ("sale", "status", "s", "--watch", "--interval", "0"): "--interval: must be from 0.05 "
        "to 1,000,000,000 seconds, got '0'",
        ("sale", "status", "s", "--count", "2"): "--count: goes with --watch",
        ("sale", "show", "s", "--left"): "--left: goes with --template (the file of a next sale)",
        ("sale", "list", "--limit", "0"): "--limit: must be an integer from 1 to 1000, got 0",
        ("sale", "list", "--offset", "-1"): "--offset: must be an integer >= 0, got -1",
        ("sale", "add-stock", "s", "A", "0"): "N: must be a positive integer, got 0",
        ("sale", "remove-stock", "s", "A", "x"): "N: must be a positive integer, got 'x'",
        ("sale", "set-rate", "s", "0"): "N: must be a positive integer (buyers per second), "
        "got 0",
    }  # fmt: skip
    for argv, said in refusals.items():
        result = run_cli(*argv)
        assert (result.code, result.err.strip()) == (2, f"flashsale: error: {said}"), result


DEFAULT_SAID = re.compile(r"\(default:? (\d[\d.,]*)\b")
# `sale create` flags whose default the sale file's parser gives (flashsale.salespec).
SPEC_DEFAULTS = {"--admission-rate": "admission_rate", "--max-queue": "max_queue",
                 "--window": "admission_window_seconds", "--capacity": "admission_capacity",
                 "--challenge": "join_challenge", "--challenge-max": "join_challenge_max",
                 "--limit": "per_buyer_limit", "--ttl": "hold_ttl_seconds",
                 "--buckets": "buckets"}  # fmt: skip


def _plain(number: str) -> str:
    """30.0 as help texts write it, 30."""
    try:
        return f"{float(number):g}"
    except ValueError:
        return number


def test_a_default_the_help_names_is_the_one_used() -> None:
    """ "(default N)" in a help text is the argument's default, or for ``sale create`` the
    one the sale file's parser gives a field left out."""
    sale = parse_sale({"name": "n", "skus": [{"sku": "S", "stock": 1, "price": 1,
                                               "currency": "EUR"}]})  # fmt: skip
    given = {**dataclasses.asdict(sale), **dataclasses.asdict(sale.skus[0])}
    wrong = []
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            said = DEFAULT_SAID.search(action.help or "")
            if said is None:
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            if path == "sale create" and flag in SPEC_DEFAULTS:
                default = given[SPEC_DEFAULTS[flag]]
            elif action.default is not None:
                default = action.default
            else:
                continue
            if said.group(1).rstrip(".,") not in (str(default), _plain(str(default))):
                wrong.append((path, flag, said.group(1), default))
    assert not wrong, wrong


def test_the_reconcilers_help_names_its_budget() -> None:
    from reconciler.service import SKUS_PER_S

    reconcile = dict(parsers(build_parser()))["reconcile"]
    interval = next(a for a in reconcile._actions if a.dest == "interval")
    assert f"budget of {SKUS_PER_S:,.0f} SKUs a second" in (interval.help or "")


# Refused flags of commands across the groups.
TYPED = [
    (("sale", "list", "--limit", "0"), "--limit"),
    (("sale", "list", "--offset", "-1"), "--offset"),
    (("sale", "orders", "sale-x", "--state", "SHIPPED"), "--state"),
    (("sale", "status", "sale-x", "--watch", "--interval", "0"), "--interval"),
    # A thousand refreshes a second: each reads Redis and Postgres. So was a reconciler's pass
    # (and the broker's offsets) every millisecond.
    (("sale", "status", "sale-x", "--watch", "--interval", "0.001"), "--interval"),
    (("reconcile", "--interval", "0.001"), "--interval"),
    (("sale", "status", "sale-x", "--watch", "--count", "0"), "--count"),
    (
        (
            "sale",
            "create",
            "--name",
            "x",
            "--starts-in",
            "soon",
            "--sku",
            "A",
            "--stock",
            "1",
            "--price",
            "1",
            "--currency",
            "EUR",
        ),
        "--starts-in",
    ),
    (("fairness", "verify", "sale-x", "--commitment", "zz"), "--commitment"),
    (("kafka", "dead-letters", "--limit", "0"), "--limit"),
    (("demo", "--decline", "2"), "--decline"),
    (("gateway", "--port", "0"), "--port"),
    # Up to a billion processes were taken: a typo forked hundreds of gateways.
    (("gateway", "--workers", "500"), "--workers"),
    (("up", "--workers", "500"), "--workers"),
    (("bench", "gateway", "--workers", "500"), "--workers"),
    # A flag of --once alone, given without it, started the reconciler service instead.
    (("reconcile", "--json"), "--json"),
    (("reconcile", "--once", "--ops-port", "9999"), "--ops-port"),
    # --embedded starts an engine of its own: the --host given was ignored.
    (("loadtest", "spike", "--embedded", "--host", "http://127.0.0.1:9"), "--host"),
]


def test_a_refused_flag_is_named_as_it_was_typed(cli: Cli) -> None:
    """`sale list --limit 0` was refused as "limit:", `sale status --interval 0` as
    "interval:", `demo --decline 2` as "decline:" and `sale create --starts-in soon` as
    "starts-in:": names of the program's own, where the one typed is `--limit`."""
    wrong = []
    for argv, flag in TYPED:
        result = cli(*argv)
        if result.code != 2 or not result.err.startswith(f"flashsale: error: {flag}: "):
            wrong.append((" ".join(argv), result.code, result.err.strip()))
    assert not wrong, wrong


SKU = ("--sku", "A", "--stock", "1", "--price", "1", "--currency", "EUR")
EMPTY = [
    (("sale", "create", "--file", "examples/sneaker-drop.json", "--name", ""), "--name"),
    (("sale", "create", "--name", "x", *SKU, "--starts-in", ""), "--starts-in"),
    (("sale", "create", "--name", "x", *SKU, "--title", ""), "--title"),
    (("sale", "update", "sale-x", "--starts-in", ""), "--starts-in"),
    (("sale", "update-sku", "sale-x", "A", "--title", ""), "--title"),
    (("fairness", "verify", "sale-x", "--buyer", ""), "--buyer"),
    (("demo", "--json", ""), "--json"),
]


def test_a_flag_given_an_empty_value_is_refused_not_ignored(cli: Cli) -> None:
    """`sale create --file F --name ""` created the sale under the file's name, `--starts-in ""`
    opened it at once and `--title ""` titled the SKU by its id, each as if the flag had not
    been typed; `sale update-sku S A --title ""` answered "give --title or --price"."""
    wrong = []
    for argv, flag in EMPTY:
        result = cli(*argv)
        if (
            result.code != 2
            or result.out
            or not result.err.startswith(f"flashsale: error: {flag}: ")
        ):
            wrong.append((" ".join(argv), result.code, result.out.strip(), result.err.strip()))
    assert not wrong, wrong


def test_a_command_to_run_next_is_said_as_this_shell_can_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's last line said to stop the stack with `.venv/bin/flashsale dev down`: from
    another folder that program is not there, and with the stack in FLASHSALE_HOME given for
    that one command, `dev down` stopped the default stack, which was not running."""
    monkeypatch.delenv("FLASHSALE_HOME", raising=False)
    monkeypatch.setattr(sys, "argv", [".venv/bin/flashsale", "demo"])  # as make runs it
    assert rerun("dev", "down") == ".venv/bin/flashsale dev down"
    program = tmp_path / "bin" / "flashsale"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(program), "demo"])  # found on the PATH
    monkeypatch.setenv("PATH", str(program.parent))
    assert rerun("dev", "down") == "flashsale dev down"
    monkeypatch.setenv("PATH", "/nowhere")  # run by its whole path
    monkeypatch.setenv("FLASHSALE_HOME", str(tmp_path / "my stack"))
    assert rerun("dev", "down") == f"FLASHSALE_HOME='{tmp_path}/my stack' {program} dev down"


@pytest.mark.parametrize(
    ("argv", "listed"),
    [((), "sale"), (("sale",), "preload"), (("bench",), "allocate"), (("dev",), "status")],
)
def test_a_group_typed_alone_lists_its_commands(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], listed: str
) -> None:
    """`flashsale sale` said only that an ACTION is required, not which there are."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert any(line.split()[:1] == [listed] for line in lines), lines  # its list
    assert lines[-1].startswith("flashsale") and ": error: " in lines[-1], lines[-1]


@pytest.mark.parametrize(("argv", "said"), [
    (("up", "--prot", "8000"),
     "flashsale up: error: unrecognized arguments: --prot 8000 (did you mean --port?)"),
    (("sale", "create", "--rate", "5"),
     "flashsale sale create: error: unrecognized arguments: --rate 5 "
     "(did you mean --admission-rate?)"),
    (("sale", "create", "--max_queue", "5"),
     "flashsale sale create: error: unrecognized arguments: --max_queue 5 "
     "(did you mean --max-queue?)"),
    (("sale", "status", "S", "--bogus"),
     "flashsale sale status: error: unrecognized arguments: --bogus"),
    # a flag of another command of the group: the SKU's settings are update-sku's
    (("sale", "update", "S", "--ttl", "30"),
     "flashsale sale update: error: unrecognized arguments: --ttl 30 "
     "(--ttl is a flag of `flashsale sale create` and `flashsale sale update-sku`)"),
    (("migrate", "--json"), "flashsale migrate: error: unrecognized arguments: --json"),
    (("sale", "status", "S", "--state=live"),
     "flashsale sale status: error: unrecognized arguments: --state=live "
     "(--state is a flag of `flashsale sale list` and `flashsale sale orders`)"),
    (("sale", "pause", "S", "T"), "flashsale sale pause: error: unrecognized arguments: T"),
])  # fmt: skip
def test_an_unknown_flag_is_refused_by_its_command_naming_the_one_meant(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], said: str
) -> None:
    """`flashsale up --prot 8000` showed flashsale's own usage (`COMMAND ...`) and "unrecognized
    arguments", nothing of `up`'s flags: the command refuses it, with its usage and the flag
    probably meant."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    command = " ".join(argv[: 2 if argv[0] == "sale" else 1])
    assert err.startswith(f"usage: flashsale {command} "), err
    assert err.strip().splitlines()[-1] == said, err


# Every flag that takes a time in seconds, and whether 0 is one it takes.
SECONDS_FLAGS = [
    (("sale", "status", "s", "--watch", "--interval"), False),
    (("reconcile", "--once", "--interval"), False),
    (("reconcile", "--once", "--stuck-after"), False),
    (("token", "buyers", "--ttl"), False),
    (("bench", "allocate", "--seconds"), False),
    (("bench", "gateway", "--seconds"), False),
    (("bench", "pipeline", "--paced-seconds"), False),
    (("loadtest", "spike", "--ramp"), False),
    (("loadtest", "spike", "--hold"), True),
    (("demo", "--arrival-seconds"), True),
    (("dev", "up", "--timeout"), False),
    (("up", "--hung-after"), True),
    (("psp", "--hang-s"), True),
    (("demo", "--window-seconds"), False),
]


@pytest.mark.parametrize(("argv", "zero"), SECONDS_FLAGS, ids=lambda v: " ".join(v)
                         if isinstance(v, tuple) else None)  # fmt: skip
def test_a_flag_in_seconds_takes_a_duration_as_sale_create_does(
    run_cli: Cli, argv: tuple[str, ...], zero: bool
) -> None:
    """`reconcile --stuck-after 2m` was told "must be a positive number, got '2m'" and
    `reconcile --interval 5s` "must be a number", where `sale create --ttl 10m` and
    `--starts-in 1h30m` take a duration; `dev up --timeout 30s` got argparse's "invalid float
    value", and `dev up --timeout -5` waited no time at all and reported the stack's running
    servers as not ready. Each is judged as a duration, and told what was typed."""
    flag = argv[-1]

    def said(value: str) -> str:
        result = run_cli(*argv, value)
        assert result.code == 2, (value, result)
        return result.err.strip().removeprefix(f"flashsale: error: {flag}: ")

    assert said("20000d").endswith("seconds, got '20000d'")  # read as a duration: too long
    assert said("10 minutes") == (
        "must be seconds or a duration like 90s, 10m or 1h30m, got '10 minutes'")  # fmt: skip
    assert said("-5").endswith("seconds, got '-5'")
    if not zero:  # told the range, with the duration as typed
        assert said("0s").endswith("seconds, got '0s'")


def test_durations_are_read_as_their_seconds() -> None:
    assert [seconds("interval", typed) for typed in ("90", "0.5", "90s", "0.5s", "10m",
                                                     "1h30m", " 2d ")] == [
        90, 0.5, 90, 0.5, 600, 5400, 172_800]  # fmt: skip
    assert seconds("hold", "0s", zero=True) == 0
    for typed, shortest, why in (
        ("0", 0, "more than 0"),
        ("0.01s", 0.05, "from 0.05"),
        ("nan", 0, "more than 0"),
        ("inf", 0.05, "from 0.05"),
    ):
        with pytest.raises(InvalidInput, match=why):
            seconds("interval", typed, shortest)


def test_the_reconciler_runs_with_its_times_given_as_durations(cli: Cli) -> None:
    """On a sale of its own: a pass over every live sale of the shared stack answered 3 for
    whatever another test had left unresolved there."""
    created = cli("sale", "create", "--name", "Durations", "--sku", "A", "--stock", "5",
                  "--price", "100", "--currency", "EUR")  # fmt: skip
    sale = created.out.strip()
    assert created.code == 0 and cli("sale", "preload", sale).code == 0, created
    result = cli("reconcile", "--once", "--interval", "5s", "--stuck-after", "2m",
                 "--sale", sale, "--json")  # fmt: skip
    assert result.code == 0, result
    assert orjson.loads(result.out)["skus"] == 1, result.out  # its own sale alone
