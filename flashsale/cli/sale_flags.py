"""The `flashsale sale` commands' flags and arguments, with the sale field each sets: input a
command refuses is named as it was typed (`--limit`, `N`), not by the field's path in a sale
file or the admin API (`skus[0].per_buyer_limit`, `add`)."""

from __future__ import annotations

import argparse
import re

from flashsale.errors import Conflict, InvalidInput

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
SALE_FLAGS = {
    "name": "name",
    "starts_at": "starts_at",
    "ends_at": "ends_at",
    "admission_rate": "admission_rate",
    "max_queue": "max_queue",
}
# `sale update` flags and the sale field each sets.
UPDATE_FLAGS = {
    "name": "name", "starts_at": "starts_at", "ends_at": "ends_at",
    "admission_rate": "admission_rate", "max_queue": "max_queue",
    "window": "admission_window_seconds", "capacity": "admission_capacity",
    "challenge": "join_challenge", "challenge_max": "join_challenge_max",
}  # fmt: skip
# The positional N of the commands that take one, by the field it sets.
ARGUMENTS = {
    "add-stock": {"add": "N"},
    "remove-stock": {"remove": "N"},
    "set-rate": {"admission_rate": "N"},
}


def _flag(attribute: str) -> str:
    return "--" + attribute.replace("_", "-")


def typed_names(args: argparse.Namespace) -> dict[str, str]:
    """The fields ``args``'s command sets, each by what was typed for it."""
    command = args.sale_command
    if command == "create" and not args.file:
        return {
            **{field: _flag(attr) for attr, field in SALE_FLAGS.items()},
            **{f"skus[0].{field}": _flag(attr) for attr, field in SKU_FLAGS.items()},
            "skus[0].sku": "--sku",
        }
    if command == "update":
        return {field: _flag(attr) for attr, field in UPDATE_FLAGS.items()}
    if command == "update-sku":
        return {"title": "--title", "price": "--price"}
    return ARGUMENTS.get(command, {})


def as_typed(exc: InvalidInput, args: argparse.Namespace) -> InvalidInput:
    """``exc`` naming the flag or argument typed for its field (itself when none was)."""
    typed = typed_names(args).get(exc.field)
    if typed is None:
        return exc
    return InvalidInput(typed, exc.message.removeprefix(f"{exc.field}: "), code=exc.code)


def started_as_typed(exc: Conflict, args: argparse.Namespace) -> Conflict:
    """A started sale's refusal of a change (``sale_started``), its fields named as typed: the
    one refused and those that can still change."""
    typed = typed_names(args)
    if exc.code != "sale_started" or not typed:
        return exc
    pattern = r"\b(" + "|".join(map(re.escape, sorted(typed, key=len, reverse=True))) + r")\b"
    return Conflict(re.sub(pattern, lambda m: typed[m.group(1)], exc.message), code=exc.code)
