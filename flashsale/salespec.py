"""Validation of merchandiser input: the sale file format and CLI flags (CSV rows in
:mod:`flashsale.sku_csv`).

Every parser raises :class:`~flashsale.errors.InvalidInput` naming the first bad field
(``skus[0].stock``, ``row 3.price``) before anything is written. Numbers may arrive as JSON
numbers or, from flags and CSV, as text; booleans and fractional values are never numbers here.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from flashsale.currencies import is_currency, price_hint, ungrouped
from flashsale.errors import InvalidInput, out_of_range, refused_value, shown, unknown_name
from flashsale.keys import ID_PATTERN, MAX_BUCKETS

T = TypeVar("T")
DECIMAL = re.compile(r"-?[0-9]{1,30}")

MAX_STOCK = 1_000_000_000
MAX_ADMISSION_RATE = 1_000_000  # buyers per second
MAX_PRICE = 10**15
MAX_AMOUNT = 2**63 - 1  # the largest amount an order records (a Postgres bigint)
MAX_TTL_SECONDS = 24 * 3600
MAX_LIMIT = 10_000
MAX_CHALLENGE_BITS = 24  # about 16 million hashes: seconds in a browser, microseconds to check
DEFAULT_DURATION = timedelta(hours=1)
# The times a sale may name: Python's dates end in year 9999, and a sale's end is its start plus
# up to ten years of durations (flags, defaults).
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)

SALE_FILE_FIELDS = (
    "name", "starts_at", "ends_at", "admission_rate", "max_queue", "admission_window_seconds",
    "admission_capacity", "join_challenge", "join_challenge_max", "skus",
)  # fmt: skip
SKU_FIELDS = (
    "sku",
    "title",
    "stock",
    "price",
    "currency",
    "per_buyer_limit",
    "hold_ttl_seconds",
    "buckets",
)
SKU_REQUIRED = {"sku", "stock", "price", "currency"}
# What a sale as the engine shows it (`sale show`, GET /admin/v1/sales/{sale}) has beside a
# sale file's fields: the engine's own, which a file cannot set.
SHOWN_ONLY = {"id", "status", "state", "preloaded_at", "ended_at", "archived_at", "shuffle"}


@dataclass(frozen=True, slots=True)
class SkuSpec:
    sku: str
    title: str
    stock: int
    price: int
    currency: str
    per_buyer_limit: int = 1
    hold_ttl_seconds: int = 120
    buckets: int = 1


@dataclass(frozen=True, slots=True)
class SaleSpec:
    name: str
    starts_at: datetime
    ends_at: datetime
    admission_rate: int = 500
    max_queue: int = 200_000
    skus: tuple[SkuSpec, ...] = field(default_factory=tuple)
    admission_window_seconds: int = 60
    admission_capacity: int = 1000
    join_challenge: int = 0  # proof-of-work difficulty (leading zero bits) asked at join; 0: off
    join_challenge_max: int = 0  # the most it rises to with the join rate; 0: fixed


def integer(value: Any, where: str, *, minimum: int, maximum: int, what: str,
            grouped: bool = True) -> int:  # fmt: skip
    """An integer in ``[minimum, maximum]`` from a JSON number or text (``grouped``: a count)."""
    if isinstance(value, bool):
        raise InvalidInput(where, f"must be {what}, got {shown(value)}")
    if isinstance(value, str):
        # ASCII digits only ("²" is isdigit() and not int()), and few enough for int(): past
        # 4,300 digits it raises, and no bound here has more than 19
        text = value.strip()
        if not DECIMAL.fullmatch(text):
            hint = ungrouped(text) if grouped else ""
            raise InvalidInput(where, f"must be {what}, got {shown(value)}{hint}")
        value = int(text)
    if isinstance(value, int) and minimum <= value <= maximum:
        return int(value)
    if not (isinstance(value, int) or out_of_range(value, minimum, maximum)):
        raise InvalidInput(where, f"must be {what}, got {shown(value)}")
    # every ``what`` says its floor ("positive", "from 5 to 3600"), not all their ceiling
    said = value < minimum or str(maximum) in what or f"{maximum:,}" in what
    told = "" if said else f" of at most {maximum:,}"
    raise InvalidInput(where, f"must be {what}{told}, got {shown(value)}")


# What a sale file (or a SKU row) that leaves a field out gets: the specs' own defaults.
SALE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SaleSpec)
                                 if f.default is not MISSING}  # fmt: skip
SKU_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SkuSpec)
                                if f.default is not MISSING}  # fmt: skip


# U+202A-U+202E (embeddings, overrides and their end) and U+2066-U+2069 (isolates). The marks
# (U+200E, U+200F, U+061C) and the joiners stay: they change no order, and scripts need them.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def text(value: Any, where: str, *, max_len: int = 200) -> str:
    """A one-line display text: no control characters (a NUL is not storable in Postgres), no
    lone surrogates (not encodable as UTF-8) and no bidi embeddings, overrides or isolates (an
    override shows what follows it reversed wherever the text is shown)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(where, "must be a non-empty string")
    if len(value) > max_len:
        raise InvalidInput(where, f"must be at most {max_len} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") or c in BIDI_CONTROLS for c in value):
        raise InvalidInput(
            where, "must be one line of text, without control characters or bidi overrides"
        )
    return value.strip()


def identifier(value: Any, where: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        rule = "1-64 characters of letters, digits, '.', '_' or '-'"
        raise InvalidInput(where, refused_value(value, rule))
    return value


def _example_timestamp() -> str:
    """A timestamp an error message can offer: noon UTC on 1 December of next year, so that
    copying it for an ``ends_at`` is never refused as past."""
    return f"{datetime.now(UTC).year + 1}-12-01T12:00:00Z"


def timestamp(value: Any, where: str) -> datetime:
    like = f"e.g. {_example_timestamp()}"
    if not isinstance(value, str):
        raise InvalidInput(where, f"must be an ISO 8601 timestamp, {like}, got {shown(value)}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(
            where, f"must be an ISO 8601 timestamp, {like}, got {shown(value)}"
        ) from None
    if parsed.tzinfo is None:  # the clock on the wall: shown as it would be written right
        given = value.strip()
        given += "" if any(c in given for c in "T ") else "T00:00"  # a day: its midnight
        raise InvalidInput(where, f"must include a timezone, got {shown(value)}: {given}Z for "
                                  f"UTC, or its offset from UTC, as {given}+01:00")  # fmt: skip
    try:
        moment = parsed.astimezone(UTC)
    except OverflowError:  # past year 9999 (or before year 1) once in UTC
        moment = None
    if moment is None or not EARLIEST <= moment <= LATEST:
        raise InvalidInput(where, f"must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} "
                                  f"(UTC), got {shown(value)}")  # fmt: skip
    return moment


def _check_fields(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        prefix = f"{where}." if where else ""
        raise InvalidInput(f"{prefix}{unknown[0]}", unknown_name(unknown[0], allowed))


def parse_sku(data: Any, where: str, changed: Collection[str] = ()) -> SkuSpec:
    """One SKU from a JSON object or a CSV row (``where`` prefixes field names in errors).
    Every bad field is named (:func:`refuse_all`), not only the first; ``changed`` as for
    :func:`collect_sku`."""
    errors: list[InvalidInput] = []
    spec = collect_sku(data, where, errors, changed)
    refuse_all(errors)
    return spec


def collect_sku(data: Any, where: str, errors: list[InvalidInput],
                changed: Collection[str] = ()) -> SkuSpec:  # fmt: skip
    """The SKU in ``data``, with every problem appended to ``errors`` (the spec is then
    meaningless). ``changed``: the fields a change of a SKU gave; a rule between two fields
    names the one given."""
    if not isinstance(data, Mapping):
        raise InvalidInput(where, "must be an object")
    _check_fields(data, SKU_FIELDS, where)
    present = {k for k, v in data.items() if v not in (None, "")}

    def at(name: str) -> str:
        return f"{where}.{name}" if where else name

    errors += [InvalidInput(at(name), "is required")
               for name in SKU_FIELDS if name in SKU_REQUIRED and name not in present]  # fmt: skip

    def take(name: str, parse: Callable[[Any, str], T], default: T) -> T:
        if name not in present:
            return default
        try:
            return parse(data[name], at(name))
        except InvalidInput as exc:
            errors.append(exc)
            return default

    def currency(value: Any, field: str) -> str:
        if isinstance(value, str) and is_currency(value.strip()):
            return value.strip()
        if isinstance(value, str) and is_currency(value.strip().upper()):
            raise InvalidInput(field, f"must be upper case: {value.strip().upper()!r}, "
                                      f"got {shown(value)}")  # fmt: skip
        raise InvalidInput(field, f"unknown ISO 4217 currency {shown(value)}")

    def bounded(low: int, high: int, what: str) -> Callable[[Any, str], int]:
        return lambda value, field: integer(value, field, minimum=low, maximum=high, what=what)

    def price(value: Any, field: str) -> int:
        what = "a non-negative integer amount in minor units"
        code = str(data.get("currency") or "").strip()
        hint = price_hint(value, code)
        if hint:  # "149.99" of EUR: what was meant is known, so it is said
            raise InvalidInput(field, f"must be {what}, got {shown(value)} ({hint})")
        return integer(value, field, minimum=0, maximum=MAX_PRICE, what=what, grouped=False)

    sku = take("sku", identifier, "")
    spec = SkuSpec(
        sku=sku,
        title=take("title", text, sku),
        stock=take("stock", bounded(1, MAX_STOCK, "a positive integer"), 1),
        price=take("price", price, 0),
        currency=take("currency", currency, ""),
        per_buyer_limit=take("per_buyer_limit", bounded(1, MAX_LIMIT,
                                                        f"an integer from 1 to {MAX_LIMIT}"),
                             SKU_DEFAULTS["per_buyer_limit"]),
        hold_ttl_seconds=take("hold_ttl_seconds", bounded(
            1, MAX_TTL_SECONDS, f"a positive number of seconds up to {MAX_TTL_SECONDS}"),
            SKU_DEFAULTS["hold_ttl_seconds"]),
        buckets=take("buckets", bounded(
            1, MAX_BUCKETS, f"an integer from 1 to {MAX_BUCKETS} (stock buckets)"),
            SKU_DEFAULTS["buckets"]),
    )  # fmt: skip
    largest = spec.price * spec.per_buyer_limit  # a buyer's largest order
    if largest > MAX_AMOUNT:
        alone = "per_buyer_limit" in changed and "price" not in changed  # the limit is named
        named, other = ("per_buyer_limit", f"price {spec.price}") if alone else (
            "price", f"per_buyer_limit {spec.per_buyer_limit}")  # fmt: skip
        errors.append(InvalidInput(at(named), (
            f"with {other}, a buyer's largest order would be {largest:,} minor units, more "
            f"than an order can record ({MAX_AMOUNT:,}): lower the price or the limit"
        )))  # fmt: skip
    return spec


MAX_LISTED = 20  # problems named in one error, beyond the first


def refuse_all(errors: Sequence[InvalidInput]) -> None:
    """Nothing when ``errors`` is empty; else one InvalidInput naming the first field and
    listing the others, so a merchandiser fixes a file in one go."""
    if not errors:
        return
    first, others = errors[0], errors[1:]
    if not others:
        raise first
    listed = "; ".join(e.message for e in others[:MAX_LISTED])
    more = f"; and {len(others) - MAX_LISTED} more" if len(others) > MAX_LISTED else ""
    detail = first.message[len(first.field) + 2 :]
    raise InvalidInput(first.field, f"{detail} ({len(errors)} errors; also {listed}{more})")


def as_sale_file(sale: Mapping[str, Any]) -> dict[str, Any]:
    """A sale as the engine shows it, cut to what a sale file sets: the template of another."""
    shown = {name: value for name, value in sale.items() if name in SALE_FILE_FIELDS}
    shown["skus"] = [{name: value for name, value in sku.items() if name in SKU_FIELDS}
                     for sku in sale.get("skus", [])]  # fmt: skip
    return shown


def parse_sale(data: Any, *, now: datetime | None = None,
               changed: Collection[str] = ()) -> SaleSpec:  # fmt: skip
    """A whole sale from the sale file format (see README). Optional fields get defaults.
    ``changed``: the fields a change of a sale gave (the others are the sale's own); a rule
    between two fields names the one given."""
    imported = "`sale import ID FILE` adds SKUs to a sale"  # a file of SKUs alone
    if not isinstance(data, Mapping):
        raise InvalidInput("sale", "must be a JSON object" + (
            f", not a list: {imported}" if isinstance(data, list) else ""))  # fmt: skip
    if set(data) == {"skus"}:
        raise InvalidInput("name", f"is required: a sale file names its sale ({imported})")
    own = sorted(SHOWN_ONLY.intersection(data))
    if own:
        raise InvalidInput(own[0], "is the sale's own (as `sale show` prints it), not a sale "
                                   "file's: leave it out, or print the sale as a file with "
                                   "`sale show ID --template`")  # fmt: skip
    _check_fields(data, SALE_FILE_FIELDS, "")
    name = text(data.get("name"), "name")
    now = now or datetime.now(UTC)
    # Left out, a date takes its default; given, it must be one ("" or null is not).
    starts_at = timestamp(data["starts_at"], "starts_at") if "starts_at" in data else now
    ends_at = (
        timestamp(data["ends_at"], "ends_at") if "ends_at" in data else starts_at + DEFAULT_DURATION
    )
    if ends_at <= starts_at:
        raise InvalidInput("ends_at", f"must be after the start, {starts_at:%Y-%m-%dT%H:%M:%SZ}, "
                                      f"got {ends_at:%Y-%m-%dT%H:%M:%SZ}")  # fmt: skip

    def count(name: str, minimum: int, maximum: int, what: str) -> int:
        return integer(data.get(name, SALE_DEFAULTS[name]), name, minimum=minimum,
                       maximum=maximum, what=what)  # fmt: skip

    admission_rate = count("admission_rate", 1, MAX_ADMISSION_RATE,
                           "a positive integer (buyers per second)")  # fmt: skip
    max_queue = count("max_queue", 1, 100_000_000, "a positive integer")
    window = count("admission_window_seconds", 5, 3600, "a number of seconds from 5 to 3600")
    capacity = count("admission_capacity", 1, 10_000_000,
                     "a positive integer (admitted, unfinished buyers)")  # fmt: skip
    challenge = count(
        "join_challenge",
        0,
        MAX_CHALLENGE_BITS,
        f"a number of leading zero bits from 0 (off) to {MAX_CHALLENGE_BITS}",
    )
    challenge_max = count(
        "join_challenge_max",
        0,
        MAX_CHALLENGE_BITS,
        f"a number of leading zero bits up to {MAX_CHALLENGE_BITS} (0: fixed)",
    )
    _challenge_rule(challenge, challenge_max, changed)
    skus = _sku_list(data.get("skus", [])).skus
    return SaleSpec(name, starts_at, ends_at, admission_rate, max_queue, skus, window, capacity,
                    challenge, challenge_max)  # fmt: skip


def _challenge_rule(challenge: int, most: int, changed: Collection[str]) -> None:
    """The proof of work's rise (``join_challenge_max``) is 0 or at least its base, which is
    on. Refused naming the base when a change gave it alone, else the rise."""
    if not most or (challenge and most >= challenge):
        return
    if "join_challenge" in changed and "join_challenge_max" not in changed:
        raise InvalidInput("join_challenge", (
            f"0 (off) turns off its rise too: give join_challenge_max 0 with it (it is {most})"
            if not challenge else f"must be at most join_challenge_max, {most} (the most the "
            f"sale asks as the joins rise), got {challenge}"))  # fmt: skip
    raise InvalidInput("join_challenge_max", (
        f"must be 0 while join_challenge is 0 (off), got {most}" if not challenge else
        f"must be at least join_challenge, {challenge}, or 0 to keep the difficulty fixed, "
        f"got {most}"))  # fmt: skip


def unique_keys(where: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """An ``object_pairs_hook`` for merchandiser JSON (``json.loads``) that refuses an object
    naming a key twice, as an error about ``where``. Parsers keep one of the two values (json
    and orjson the last), so a repeated ``"stock"`` in a sale file was dropped without a word."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                raise InvalidInput(where, f"names {shown(key)} twice in one object",
                                   code="duplicate_key")  # fmt: skip
            seen.add(key)
        return dict(items)

    return pairs


def _sku_list(raw: Any) -> SkuImport:
    """The ``skus`` list of a sale file (or of an import), each checked, none twice."""
    if not isinstance(raw, list):
        raise InvalidInput("skus", "must be a list")
    skus = tuple(parse_sku(item, f"skus[{i}]") for i, item in enumerate(raw))
    batch = SkuImport(skus, tuple(f"skus[{i}].sku" for i in range(len(skus))))
    reject_duplicates(batch)
    return batch


@dataclass(frozen=True, slots=True)
class SkuImport:
    """SKUs to add to a sale, each with the field that named it in the input (``skus[2].sku``,
    ``row 5.sku``), for errors found later against the sale."""

    skus: tuple[SkuSpec, ...]
    fields: tuple[str, ...]


def parse_skus(data: Any) -> SkuImport:
    """SKUs to add to a sale, as JSON: ``{"skus": [...]}`` in the sale file's form, or the
    list alone. A whole sale file is refused, naming the command that makes a sale of it."""
    if isinstance(data, list):
        data = {"skus": data}
    if not isinstance(data, Mapping):
        raise InvalidInput("body", 'must be a JSON object {"skus": [...]} or a CSV')
    setting = next((k for k in data if k in SALE_FILE_FIELDS and k != "skus"), None)
    if setting is not None:
        raise InvalidInput(setting, "is a sale's setting: SKUs are added from {\"skus\": [...]} "
                                    "or a list of SKUs (a sale file makes a sale: `sale create "
                                    "--file`)")  # fmt: skip
    _check_fields(data, ("skus",), "")
    batch = _sku_list(data.get("skus"))
    if not batch.skus:
        raise InvalidInput("skus", "must name at least one SKU")
    return batch


def reject_duplicates(batch: SkuImport) -> None:
    seen: set[str] = set()
    for spec, where in zip(batch.skus, batch.fields, strict=True):
        if spec.sku in seen:
            raise InvalidInput(where, f"duplicate SKU {shown(spec.sku)} in this sale")
        seen.add(spec.sku)
