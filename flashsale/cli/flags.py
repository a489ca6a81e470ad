"""Refused input named as it was typed: `--limit`, `--starts-in`, `N`, not the program's own
name for what it sets (`limit`, `starts-in`, or a sale field's path in a sale file or the admin
API, `skus[0].per_buyer_limit`). Every command's flags and arguments come from its parser; the
`flashsale sale` commands add the sale field each of theirs sets, and the sale or SKU change
their flags make."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from flashsale.cli.checks import duration, in_seconds
from flashsale.errors import Conflict, InvalidInput, meant
from flashsale.salespec import SaleSpec

# `sale create` without --file: its flags (argparse attribute) and the field each sets.
SKU_FLAGS = {
    "title": "title",
    "stock": "stock",
    "price": "price",
    "currency": "currency",
    "limit": "per_buyer_limit",
    "ttl": "hold_ttl_seconds",
    "buckets": "buckets",
}
# `sale create` and `sale update` flags and the sale field each sets.
SALE_FLAGS = {
    "name": "name", "starts_at": "starts_at", "ends_at": "ends_at",
    "admission_rate": "admission_rate", "max_queue": "max_queue",
    "window": "admission_window_seconds", "capacity": "admission_capacity",
    "challenge": "join_challenge", "challenge_max": "join_challenge_max",
}  # fmt: skip
# `sale update-sku` flags and the SKU field each sets.
SKU_UPDATE_FLAGS = {
    attr: SKU_FLAGS[attr] for attr in ("title", "price", "currency", "limit", "ttl")
}
# The positional N of the commands that take one, by the field it sets.
ARGUMENTS = {
    "add-stock": {"add": "N"},
    "remove-stock": {"remove": "N"},
    "set-rate": {"admission_rate": "N"},
}


# The fields set in seconds, which their flags also take as a duration (90s, 10m, 1h30m), as
# --starts-in does.
IN_SECONDS = frozenset({"hold_ttl_seconds", "admission_window_seconds"})


def from_now(args: argparse.Namespace) -> dict[str, datetime]:
    """The moments ``--starts-in`` and ``--ends-in`` name, that long from now, by the field
    each sets (``starts_at``, ``ends_at``); each is refused beside its ``--*-at``."""
    now, moments = datetime.now(UTC), {}
    for when in ("starts", "ends"):
        length = getattr(args, f"{when}_in")
        if length and getattr(args, f"{when}_at"):
            raise InvalidInput(f"{when}-in", f"give either --{when}-at or --{when}-in, not both")
        if length:
            moments[f"{when}_at"] = now + duration(f"{when}-in", length)
    return moments


def dated(spec: SaleSpec, args: argparse.Namespace, moments: Mapping[str, datetime]) -> SaleSpec:
    """`sale create`'s sale with the ``moments`` of ``--starts-in`` and ``--ends-in``
    (:func:`from_now`): a new start moves the window, keeping its length, unless its end was
    typed (``--ends-at``, ``--ends-in``)."""
    starts = moments.get("starts_at", spec.starts_at)
    kept = spec.ends_at if args.ends_at else starts + (spec.ends_at - spec.starts_at)
    ends = moments.get("ends_at", kept)
    if ends <= starts:
        start = f"{args.starts_in} from now" if args.starts_in else f"{starts:%Y-%m-%dT%H:%M:%SZ}"
        end = args.ends_in or args.ends_at
        raise InvalidInput("ends-in" if args.ends_in else "ends-at",
                           f"must end after the start, {start}, got {end}")  # fmt: skip
    return dataclasses.replace(spec, starts_at=starts, ends_at=ends)


def given(args: argparse.Namespace, flags: Mapping[str, str]) -> dict[str, Any]:
    """The field each of ``flags`` that was typed sets, with what was typed (a duration given
    for seconds, as its seconds)."""
    return {field: flag_value(args, attr, field) for attr, field in flags.items()
            if getattr(args, attr)}  # fmt: skip


def flag_value(args: argparse.Namespace, attr: str, field: str) -> Any:
    """What flag ``attr`` gives field ``field``: as typed, a field in seconds also as a
    duration (:func:`~flashsale.cli.checks.in_seconds`)."""
    value = getattr(args, attr)
    return in_seconds(attr.replace("_", "-"), value) if field in IN_SECONDS else value


def sale_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """`sale create` without --file: the sale file its flags make."""
    data = given(args, SALE_FLAGS)
    sku = given(args, SKU_FLAGS)
    if args.sku:
        data["skus"] = [{"sku": args.sku, **sku}]
    elif sku:
        raise InvalidInput("sku", "--sku is required with --stock/--price/--currency/...")
    return data


def _flag(attribute: str) -> str:
    return "--" + attribute.replace("_", "-")


def command_parser(parser: argparse.ArgumentParser,
                   args: argparse.Namespace) -> argparse.ArgumentParser:  # fmt: skip
    """The parser of the command ``args`` holds (``sale list``'s, not ``flashsale``'s)."""
    return command_path(parser, args)[-1]


def command_path(parser: argparse.ArgumentParser,
                 args: argparse.Namespace) -> list[argparse.ArgumentParser]:  # fmt: skip
    """The parsers from ``parser`` down to the command ``args`` holds: flashsale's, the
    group's (``sale``), the command's (``sale list``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return [parser, *command_path(action.choices[chosen], args)]
    return [parser]


def flag_meant(path: Sequence[argparse.ArgumentParser], words: Sequence[str]) -> str:
    """What follows "unrecognized arguments": the flag probably meant by the first of
    ``words`` the command (the last of ``path``) does not take (`` (did you mean --port?)``
    for ``--prot``; also ``--rate`` for ``--admission-rate``, ``--max_queue``); else the
    commands of its group that take it (``sale update --ttl``: `sale update-sku`'s; not
    flashsale's own commands, which share little), or nothing."""
    typed = next((w.partition("=")[0] for w in words if w.startswith("--")), None)
    if typed is None:
        return ""
    guess = meant(typed[2:], [f[2:].replace("-", "_") for f in _long_flags(path[-1])])
    if guess:
        return f" (did you mean --{guess.replace('_', '-')}?)"
    group = path[-2] if len(path) > 2 else None
    beside = [command.prog for action in (group._actions if group else ())
              if isinstance(action, argparse._SubParsersAction)
              for command in dict.fromkeys(action.choices.values())
              if command is not path[-1] and typed in _long_flags(command)]  # fmt: skip
    return f" ({typed} is a flag of {' and '.join(f'`{p}`' for p in beside)})" if beside else ""


def _long_flags(command: argparse.ArgumentParser) -> list[str]:
    return [o for a in command._actions for o in a.option_strings if o.startswith("--")]


def refuse_empty(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Raise InvalidInput for a flag without a default given an empty value (``--name ""``):
    the commands read such a flag's value as given or not, and would take it as not typed. A
    flag with a default checks its value itself (``--limit ""`` is not an integer)."""
    for action in command_parser(parser, args)._actions:
        if (
            action.option_strings
            and action.default is None
            and getattr(args, action.dest, None) == ""
        ):
            raise InvalidInput(action.dest, "is empty: give a value, or leave the flag out")


def _parsed_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Each flag and argument of ``args``'s command by its attribute (``starts_in``, and
    ``starts-in`` as some checks write it), naming it as typed. A flag that was not given and
    has no default is left out: a field of its name came from elsewhere (a sale file's `name`
    is not `--name`)."""
    names = {}
    for action in command_parser(parser, args)._actions:
        if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
            continue
        if action.option_strings:
            if getattr(args, action.dest, None) is None:
                continue
            long = [option for option in action.option_strings if option.startswith("--")]
            typed = (long or action.option_strings)[0]
        else:
            typed = action.metavar if isinstance(action.metavar, str) else action.dest
        names[action.dest] = names[action.dest.replace("_", "-")] = typed
    return names


def _sale_names(args: argparse.Namespace) -> dict[str, str]:
    """The sale fields a ``flashsale sale`` command sets, each by what was typed for it."""
    command: str = getattr(args, "sale_command", "")
    if command == "create" and not args.file:
        return {
            **{field: _flag(attr) for attr, field in SALE_FLAGS.items()},
            **{f"skus[0].{field}": _flag(attr) for attr, field in SKU_FLAGS.items()},
            "skus[0].sku": "--sku",
        }
    if command == "update":
        typed = {field: _flag(attr) for attr, field in SALE_FLAGS.items()}
        for when in ("starts", "ends"):  # --starts-in sets starts_at, --ends-in ends_at
            if getattr(args, f"{when}_in") is not None:
                typed[f"{when}_at"] = f"--{when}-in"
        return typed
    if command == "update-sku":
        return {field: _flag(attr) for attr, field in SKU_UPDATE_FLAGS.items()}
    return ARGUMENTS.get(command, {})


def as_typed(exc: InvalidInput, parser: argparse.ArgumentParser,
             args: argparse.Namespace) -> InvalidInput:  # fmt: skip
    """``exc`` naming the flag or argument typed for its field (itself when none was)."""
    names = {**_parsed_names(parser, args), **_sale_names(args)}
    # A header the API reads is a flag here: Idempotency-Key, --idempotency-key.
    typed = names.get(exc.field) or names.get(exc.field.lower())
    if typed is None:
        return exc
    # Another field the message names, by its flag ("at least join_challenge": --challenge),
    # typed or not: the flag is how it is changed; only a name with an underscore, which prose
    # never has ("name" may be a word).
    others = {field: flag for field, flag in _sale_names(args).items() if "_" in field}
    message = _named_as_typed(exc.message.removeprefix(f"{exc.field}: "), others)
    return InvalidInput(typed, _duration_as_typed(message, exc.field, args), code=exc.code)


def _duration_as_typed(message: str, field: str, args: argparse.Namespace) -> str:
    """``message`` of a field set from a duration as typed (``--window 3h``, ``--ends-in
    1m``), the "got" the field judged said with what was typed: "got 3h (10800 seconds)",
    "got 1m (2026-12-07T13:05:23Z)"."""
    flag = _sale_names(args).get(field, "")
    value = getattr(args, flag[2:].replace("-", "_"), None) if flag else None
    if not isinstance(value, str):
        return message
    if flag in ("--starts-in", "--ends-in"):
        unit = ""
    elif field.rpartition(".")[2] in IN_SECONDS and in_seconds(flag, value) != value:
        unit = " seconds"
    else:
        return message
    return re.sub(r"got '?([^' ]+)'?\Z", lambda m: f"got {value} ({m[1]}{unit})", message)


def started_as_typed(exc: Conflict, args: argparse.Namespace) -> Conflict:
    """A started sale's refusal of a change (``sale_started``), its fields named as typed: the
    one refused and those that can still change."""
    typed = _sale_names(args)
    if exc.code != "sale_started" or not typed:
        return exc
    return Conflict(_named_as_typed(exc.message, typed), code=exc.code)


def _named_as_typed(message: str, typed: Mapping[str, str]) -> str:
    """``message`` with each field of ``typed`` it names replaced by what was typed for it."""
    if not typed:
        return message
    pattern = r"\b(" + "|".join(map(re.escape, sorted(typed, key=len, reverse=True))) + r")\b"
    return re.sub(pattern, lambda m: typed[m.group(1)], message)
