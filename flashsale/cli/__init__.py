"""The ``flashsale`` command line, and the engine's composition root: the only code that
imports every floor (the services, the load tools) and the dev stack.

Every command reads Settings once, here, and passes them down. Commands live by group:
:mod:`~flashsale.cli.dev` (the stack, migrations, topics), :mod:`~flashsale.cli.sale`,
:mod:`~flashsale.cli.buyers` (fairness, tokens), :mod:`~flashsale.cli.serve` (the services),
:mod:`~flashsale.cli.repairs` (what the reconciler recorded), :mod:`~flashsale.cli.load` (the
demo, spike and chaos tests) and :mod:`~flashsale.cli.bench`.
Errors are one line on stderr (``flashsale: error: skus[0].stock: must be a positive integer``)
with a non-zero exit: 2 for bad input, 1 for anything else. Bad input names a flag or an
argument as it was typed (``--limit``), a sale file's field by its path
(:mod:`~flashsale.cli.flags`). Nothing is written on bad input. A server that is down, stalled
or refusing writes for now (:func:`flashsale.outages.is_outage`, as the services judge it) is
one line too, as is a file that cannot be read or written (the file and why); a database whose
schema is behind says to run ``flashsale migrate``. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from flashsale import __version__, event_loop
from flashsale.cli import bench, buyers, dev, load, repairs, sale, serve
from flashsale.cli.flags import as_typed, command_path, flag_meant, refuse_empty
from flashsale.cli.output import after_reader_gone, fail, reader_gone, warn
from flashsale.env_values import unknown_settings
from flashsale.errors import FlashsaleError, InvalidInput
from flashsale.logs import configure_logging, one_shot
from flashsale.outages import describe, is_outage, schema_error, server_of, settings_at_fault
from flashsale.parent import PARENT_PID, follow_parent
from flashsale.settings import Settings

GROUP_WORDS = ("COMMAND", "ACTION", "BENCHMARK", "KIND")  # the metavars of the groups' commands


class Parser(argparse.ArgumentParser):
    """argparse's parser (and its subcommands'), reading a word that starts with a minus and a
    digit as a value, as it reads a plain negative number: ``--starts-in -5m`` reaches the
    option's own check, which names the field, instead of argparse's "expected one
    argument". No option of the CLI starts with a minus and a digit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")
        self.register("action", "parsers", _Commands)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:  # fmt: skip
        """argparse's, but words no flag of the command takes are refused by the command (its
        usage, not flashsale's ``COMMAND ...``), naming the flag probably meant."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            path = command_path(self, parsed)
            path[-1].error(f"unrecognized arguments: {' '.join(extra)}{flag_meant(path, extra)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        """A group typed without its command (``flashsale sale``) shows its list of commands
        above the error, which said only that one is required."""
        if message.rpartition(": ")[2] in GROUP_WORDS:
            self.print_help(sys.stderr)
            self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message)


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """A group's commands: each command's ``--help`` opens with what it does, its line in the
    group's list where it has no longer description of its own."""

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        line = kwargs.get("help")
        if line and not kwargs.get("description"):
            kwargs["description"] = f"{line[0].upper()}{line[1:]}."
        return super().add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="flashsale",
        description="Flash-sale allocation engine: the dev stack, migrations, sale administration, "
        "the services (gateway, allocator, workers, payment simulator, reconciler) and "
        "benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"flashsale {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (dev, buyers, sale, serve, repairs, load, bench):
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.environ.get(PARENT_PID):  # said once, by `flashsale up`, not by every service
        for line in unknown_settings(os.environ):
            warn(line)
    try:
        refuse_empty(parser, args)
        settings = Settings.from_env()  # a bad setting is one line naming it, like bad input
        configure_logging(settings)
        # The services (their parsers set ``serves``) keep the Kafka client's own log lines;
        # a command that runs once says what failed in its one line.
        if not getattr(args, "serves", False) or getattr(args, "once", False):
            one_shot()
        follow_parent()  # a service under `flashsale up` ends with it
        result = args.handler(args, settings)
        if asyncio.iscoroutine(result):
            result = event_loop.run(result)
        return int(result)
    except InvalidInput as exc:
        fail(as_typed(exc, parser, args).message)  # `--limit`, not the program's `limit`
        return 2
    except FlashsaleError as exc:
        fail(exc.message)
        return 1
    except Exception as exc:  # an outage is one line; anything else is re-raised as it is
        if isinstance(exc, BrokenPipeError) and reader_gone():  # `| head`, not a server
            return after_reader_gone()
        if isinstance(exc, OSError) and exc.filename is not None:  # a file, not a server
            fail(f"{exc.filename}: {exc.strerror}")
            return 1
        if not is_outage(exc):
            raise
        mend = schema_error(exc) or settings_at_fault(exc)
        server = server_of(exc) or "a server"
        fail(mend.message if mend else f"{server} is unavailable: {describe(exc)}")
        return 1
    except KeyboardInterrupt:
        return 130
