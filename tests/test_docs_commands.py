"""Every `flashsale` command the README and docs/ show is one the CLI accepts.

A command in a code block must parse whole; one named in running text (or a block's comment)
may leave out what it needs (`flashsale audit` names the command, its SALE is said around it;
`flashsale sale …` the group), but every command, flag and choice it does name must exist.
Placeholders (`SALE`, `P`) are values to the parser: their types are checked when a command
runs, not here.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from flashsale.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The program as a shell line names it: `flashsale`, `.venv/bin/flashsale`, `$(flashsale …)`,
# and `$F`, which the README and the runbook set to one of those.
PROGRAM = re.compile(r"(?:^|[\s\"'(`])(?:(?:\S*/)?flashsale|\$F)\s+(?=[a-z-])")
# Where one command ends: a pipe, `&&`, `;`, a comment, the `)` closing a `$(…)`, a backquote,
# an ellipsis, or in running text a colon or comma.
END = re.compile(r"\||&&|;|\s#|[)`…]|[:,](?:\s|$)|$")
# What running text may leave out of a command it names.
UNSAID = ("required", "expected one argument")
INLINE = re.compile(r"`([^`\n]*)`")


def _commands(line: str) -> list[str]:
    found = []
    for start in PROGRAM.finditer(line):
        rest = line[start.end() :]
        end = END.search(rest)
        assert end is not None  # END matches at the end of any text
        found.append(rest[: end.start()])
    return found


def shown_commands() -> list[tuple[str, str, bool]]:
    """(where, command after `flashsale`, whether it stands in a code block)."""
    shown = []
    for document in DOCUMENTS:
        in_block = False
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{document.relative_to(ROOT)}:{number}"
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if in_block:  # the shell line, and its comment as running text
                shell, _, comment = line.partition(" #")
                shown += [(where, command, True) for command in _commands(shell)]
                spans = [comment]
            else:
                spans = INLINE.findall(line)
            shown += [(where, command, False) for span in spans for command in _commands(span)]
    return shown


def _refusal(command: str) -> str | None:
    # A synopsis's [--flag VALUE] is the flag itself, as a user would type it.
    argv = shlex.split(command.replace("[", " ").replace("]", " "))
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return said.getvalue().strip().splitlines()[-1]
    return None


SHOWN = shown_commands()


def test_the_documents_show_commands() -> None:
    blocks = [command for _, command, in_block in SHOWN if in_block]
    assert len(blocks) >= 40, blocks
    assert any(command.startswith("sale create") for command in blocks)


@pytest.mark.parametrize(("where", "command", "in_block"), SHOWN, ids=[w for w, _, _ in SHOWN])
def test_a_command_the_documents_show_is_one_the_cli_accepts(
    where: str, command: str, in_block: bool
) -> None:
    refusal = _refusal(command)
    if refusal is not None and not in_block and any(word in refusal for word in UNSAID):
        return  # named in running text; what it needs is said around it
    assert refusal is None, f"{where}: flashsale {command}\n  {refusal}"


def test_a_command_with_a_flag_the_cli_does_not_have_is_caught() -> None:
    assert _refusal("sale create --no-such-flag 1") is not None
    assert _refusal("sael list") is not None
    assert _refusal("sale list") is None
