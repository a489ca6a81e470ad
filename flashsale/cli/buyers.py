"""``flashsale fairness verify`` and ``flashsale token``: the buyers' and the storefront's side,
checking a sale's published pre-queue order as anyone can, minting buyer tokens as a storefront
would, and making the secret that signs the order webhooks to it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import secrets
import sys
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from flashsale.cli.checks import http_url, positive, sale_id, seconds
from flashsale.cli.output import out, warn
from flashsale.clients import pg_pool
from flashsale.env_values import is_http_url
from flashsale.errors import ConfigError, Conflict, InvalidInput, NotFound, shown
from flashsale.fairness import Published, problems, published
from flashsale.keys import ID_PATTERN
from flashsale.sales import unknown_sale
from flashsale.settings import Settings
from flashsale.shuffle import member_of
from flashsale.tokens import BUYER_ID, Signer

BUSY_TRIES, BUSY_WAIT_S = 6, 5.0  # a busy gateway's 429 and 503, per page of the record


async def cmd_fairness(args: argparse.Namespace, settings: Settings) -> int:
    """Check a sale's pre-queue order from its published record (``--url``: a gateway's
    public endpoint, as anyone would; otherwise this engine's database)."""
    sale = sale_id("sale", args.sale)
    if args.commitment is not None and not re.fullmatch(r"[0-9a-f]{64}", args.commitment):
        raise InvalidInput("commitment", "must be the 64 hex digits published before the start")
    if args.url:
        doc = await _fetch_fairness(gateway_base(args.url, sale), sale)
        listed = doc["members"] if doc["recorded"] else None
        record = Published(sale, doc["commitment"], doc["seed"], listed, doc["root"], doc["size"],
                           doc.get("ended", False), doc.get("lost", False))  # fmt: skip
    else:
        pool = await pg_pool(settings, max_size=2)
        try:
            found = await published(pool, sale)
            if found is None:
                raise await unknown_sale(pool, sale)
        finally:
            await pool.close()
        record = found
    if record.members is None:
        raise Conflict(f"sale {sale}: {record.missing_why}")
    found_problems = problems(record.commitment, record.seed, record.members, record.root,
                              record.size)  # fmt: skip
    if args.commitment is not None and args.commitment != record.commitment:
        found_problems.insert(0, "the commitment served now is not the one given (the one "
                                 "published before the start)")  # fmt: skip
    out(f"sale {sale}: {len(record.members):,} pre-queue members, root {record.root}")
    if args.buyer:
        member = member_of(sale, args.buyer)
        place = record.members.index(member) + 1 if member in record.members else None
        out(f"  buyer {args.buyer}: member {member}, "
            + (f"position {place:,}" if place else "not in the pre-queue"))  # fmt: skip
    for problem in found_problems:
        out(f"  FAILED: {problem}")
    out("  fairness: " + ("FAILED" if found_problems else
                          "VERIFIED (seed matches the commitment, every position follows the "
                          "rule, the members hash to the root)"))  # fmt: skip
    return 1 if found_problems else 0


def gateway_base(value: str, sale: str) -> str:
    """``--url``: a gateway's address, or the sale's page on it as a buyer has it
    (``.../sales/SALE``, its query and ``#`` part dropped): where the buyer API is."""
    url = urlsplit(http_url("url", value))
    head, page, page_sale = url.path.rstrip("/").rpartition("/sales/")
    if page and "/" not in page_sale:
        if page_sale != sale:
            raise InvalidInput("url", f"is the page of {shown(page_sale)}, not of {sale}")
        return f"{url.scheme}://{url.netloc}{head}"
    return value.rstrip("/")


async def _fetch_fairness(base: str, sale: str) -> dict[str, Any]:
    """Every page of a gateway's ``/v1/sales/{sale}/fairness``, members joined. A busy
    gateway's 429 and 503 are waited out at their ``Retry-After`` (at most ``BUSY_WAIT_S``),
    ``BUSY_TRIES`` times per page."""
    doc: dict[str, Any] = {}
    members: list[str] = []
    offset: int | None = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        while offset is not None:
            for tries_left in reversed(range(BUSY_TRIES)):
                async with session.get(f"{base}/v1/sales/{sale}/fairness",
                                       params={"offset": offset}) as response:  # fmt: skip
                    if response.status in (429, 503) and tries_left:
                        wait = response.headers.get("Retry-After") or "1"
                        await asyncio.sleep(min(BUSY_WAIT_S, float(wait)) if wait.isdigit()
                                            else BUSY_WAIT_S)  # fmt: skip
                        continue
                    if response.status == 404:
                        raise await _not_found(response, base, sale)
                    if response.status != 200:
                        raise Conflict(f"{base} answered {response.status}: "
                                       f"{await response.text()}")  # fmt: skip
                    page = await response.json()
                    break
            doc = page
            members += page["members"]
            offset = page["next_offset"]
    doc["members"] = members
    return doc


async def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    count = positive(int, "count", args.count)
    ttl = seconds("ttl", args.ttl)
    last = f"{args.prefix}{count - 1}"
    if not BUYER_ID.match(last):
        raise InvalidInput("prefix", f"a buyer id is 1 to 128 printable ASCII characters, no "
                                     f"spaces: {last!r} would not be")  # fmt: skip
    secret = settings.buyer_token_secret.reveal()
    if not secret:
        raise ConfigError(
            "FLASHSALE_BUYER_TOKEN_SECRET is not set: run `flashsale dev up` or export it"
        )
    page = args.page and waiting_room_page(args.page)
    if args.payment is not None and not page:
        raise InvalidInput("payment", "goes with --page: it is the link's payment method")
    if page:
        await _sale_at(page)
    signer = Signer.from_setting(secret, "buyer")
    payment = quote(args.payment or "tok_visa", safe="")
    for i in range(count):
        token = signer.sign({"sub": f"{args.prefix}{i}"}, ttl)
        link = f"\t{page}#token={token}&payment={payment}" if page else ""
        sys.stdout.write(f"{args.prefix}{i}\t{token}{link}\n")
    return 0


async def _not_found(response: aiohttp.ClientResponse, base: str, sale: str) -> NotFound:
    """A 404 to the record: the gateway's ``unknown_sale``, or an address that is none of a
    gateway's (a shop's page, a path under the gateway)."""
    if await _error_code(response) == "unknown_sale":
        return NotFound(f"unknown sale {shown(sale)} at {base}", code="unknown_sale")
    return NotFound(f"{base} answered 404 to /v1/sales/{sale}/fairness: give a flashsale "
                    "gateway's address, http://HOST:PORT, or a sale's page on it")  # fmt: skip


async def _error_code(response: aiohttp.ClientResponse) -> str | None:
    """The ``error.code`` of a gateway's error answer; None from a server that is none."""
    try:
        return str((await response.json(content_type=None))["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def waiting_room_page(value: str) -> str:
    """``--page``: a sale's waiting-room page, ``http(s)://HOST[:PORT]/sales/SALE`` (with the
    ``?sku=`` of a product's own link, if any), to which a buyer's pass is added."""
    url = urlsplit(value)
    sale = re.fullmatch(r"/sales/([^/]+)/?", url.path)
    if not (is_http_url(value) and sale and ID_PATTERN.match(sale[1]) and not url.fragment):
        raise InvalidInput(
            "page",
            "must be a sale's waiting-room page, http(s)://HOST"
            f"[:PORT]/sales/SALE (as `flashsale up` names it), got {shown(value)}",
        )
    return value


PAGE_CHECK_S = 5.0  # how long the gateway a --page names is given to say it has the sale


async def _sale_at(page: str) -> None:
    """Ask the gateway ``page`` names whether it has the sale, as the page will: a link to a
    sale it lacks (`/sales/SALE` as `flashsale up` writes it, an id mistyped) is refused; one
    that cannot be checked (a gateway not up yet) is printed, with a warning."""
    url = urlsplit(page)
    origin, sale = f"{url.scheme}://{url.netloc}", url.path.rstrip("/").rpartition("/")[2]
    timeout = aiohttp.ClientTimeout(total=PAGE_CHECK_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{origin}/v1/sales/{quote(sale, safe='')}") as answer,
        ):
            status, code = answer.status, await _error_code(answer)
    except (aiohttp.ClientError, TimeoutError) as exc:
        warn(f"could not ask {origin} whether it has sale {sale} ({type(exc).__name__}): "
             "the links are printed all the same")  # fmt: skip
        return
    if status == 404 and code != "unknown_sale":
        raise InvalidInput("page", f"{origin} answered 404 to /v1/sales/{sale}: no flashsale "
                                   "gateway is there, and the links would not open its waiting "
                                   "room")  # fmt: skip
    if status == 404:
        raise InvalidInput("page", f"{origin} has no sale {shown(sale)}: the links would open "
                                   '"This sale does not exist" (`flashsale sale list` names the '
                                   "sales)")  # fmt: skip
    if status != 200:
        warn(f"{origin} answered {status} when asked for sale {sale}: the links are printed all "
             "the same")  # fmt: skip


NEW_WEBHOOK_SECRET_BYTES = 32


def cmd_webhook_secret(args: argparse.Namespace, settings: Settings) -> int:
    """A new signing secret for the order webhooks, as Standard Webhooks libraries read it."""
    out("whsec_" + base64.b64encode(secrets.token_bytes(NEW_WEBHOOK_SECRET_BYTES)).decode())
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fair = commands.add_parser("fairness", help="check a sale's pre-queue order")
    fair.set_defaults(handler=cmd_fairness)
    fair_sub = fair.add_subparsers(dest="fairness_command", required=True, metavar="ACTION")
    verify = fair_sub.add_parser(
        "verify",
        help="recompute the pre-queue's order from the published record",
        description="Recompute a sale's pre-queue order from its published fairness record "
        "(the revealed seed, the members in position order, their Merkle root) and check that "
        "the seed matches its commitment, that every position follows the rule and that the "
        "members hash to the root. Exit 0 when all hold, 1 naming what does not.",
    )
    verify.add_argument("sale", help="sale id")
    verify.add_argument("--url", help="a gateway's base URL, or the sale's page on it "
                        "(http://HOST/sales/SALE): check what it publishes, as anyone would "
                        "(default: this engine's database)")  # fmt: skip
    verify.add_argument("--commitment", help="the commitment you saw before the start, to check "
                        "the published one against")  # fmt: skip
    verify.add_argument("--buyer", help="also show this buyer's member hash and position")

    token = commands.add_parser("token", help="mint buyer tokens, or a webhook signing secret")
    token.set_defaults(handler=cmd_token)
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="KIND")
    buyers = token_sub.add_parser(
        "buyers",
        help="print 'buyer_id<TAB>token' lines signed with FLASHSALE_BUYER_TOKEN_SECRET",
        description="Mint buyer tokens as the storefront would: one 'buyer_id<TAB>token' line "
        "per buyer, ids PREFIX0, PREFIX1, ... Send a token as 'Authorization: Bearer TOKEN'. "
        "With --page, each line ends with the buyer's link to the waiting-room page, as a shop "
        "sends it (the pass and a payment method after #).",
    )
    buyers.add_argument("--count", default="1", help="how many buyers (default 1)")
    buyers.add_argument("--prefix", default="buyer-", help="buyer id prefix (default buyer-)")
    buyers.add_argument(
        "--ttl", default="86400", help="validity, seconds or a duration as 1h (default 86400)"
    )
    buyers.add_argument("--page", metavar="URL",
                        help="a sale's waiting-room page, http://HOST:PORT/sales/SALE (SALE: the "
                        "sale's id, which that gateway is asked about first): each line then "
                        "ends with the buyer's link to it, to open in a browser")  # fmt: skip
    buyers.add_argument("--payment", metavar="TOKEN",
                        help="with --page, the payment method the links carry (default "
                        "tok_visa, which the payment simulator captures; tok_decline it "
                        "declines)")  # fmt: skip
    hooks = token_sub.add_parser(
        "webhook-secret",
        help="print a new FLASHSALE_WEBHOOK_SECRET (whsec_...) for the order webhooks",
        description="Print a new signing secret for the order webhooks: whsec_ and the base64 "
        f"of {NEW_WEBHOOK_SECRET_BYTES} random bytes. The engine signs with it "
        "(FLASHSALE_WEBHOOK_SECRET); the shop checks each webhook's signature with the same "
        "secret.",
    )
    hooks.set_defaults(handler=cmd_webhook_secret)
