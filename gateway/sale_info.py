"""A sale's public information: ``GET /v1/sales/{sale}`` (from :mod:`gateway.catalog`), and
the pre-queue's fairness record, ``GET /v1/sales/{sale}/fairness``, with a buyer's own proof,
``GET /v1/sales/{sale}/fairness/proof`` (see :mod:`flashsale.fairness`)."""

from __future__ import annotations

import math
import time
from functools import partial
from typing import cast

from aiohttp import web

from flashsale.errors import NotFound, shown
from flashsale.fairness import Published, merkle_path, published
from flashsale.inflight import Copy
from flashsale.salespec import integer
from flashsale.shuffle import member_of
from gateway.catalog import sale_summary
from gateway.documents import document_response
from gateway.http import json_response, queue_ticket, sale_of
from gateway.state import CATALOG_READS, CLIENTS, COUNTERS, FAIRNESS

PAGE = 10_000  # members per page of the fairness record
INCOMPLETE_TTL_S = 1.0  # how long a process keeps a record the draw has not completed yet


# How long a CDN or proxy in front may keep GET /v1/sales/{sale}: a second while the sale can
# still change, longer once it cannot (README, "Storefronts").
MAX_AGE_LIVE_S, MAX_AGE_SOLD_OUT_S, MAX_AGE_ENDED_S = 1, 30, 300


async def sale_info(request: web.Request) -> web.Response:
    sale_id = request.match_info["sale"]
    summary = await sale_summary(request, sale_id)
    asked = request.query.getall("sku", [])
    document = summary.only(asked) if asked else summary.document
    counters = request.app[COUNTERS].peek(sale_id)
    if document.data["state"] == "ended":
        max_age = MAX_AGE_ENDED_S
    elif counters is not None and counters.view.sold_out:
        max_age = MAX_AGE_SOLD_OUT_S
    else:
        max_age = MAX_AGE_LIVE_S
    return document_response(request, document, {"Cache-Control": f"public, max-age={max_age}"})


async def _record(request: web.Request, sale_id: str) -> Published:
    """The sale's fairness record, kept by this process: for good once complete (it never
    changes), for ``INCOMPLETE_TTL_S`` before (a crowd waiting for the opening asks). One
    read at a time for all callers."""
    app = request.app
    copy = app[FAIRNESS].get(sale_id)
    if copy is not None and time.monotonic() < copy.expires:
        return copy.value
    read = partial(_read_record, app, sale_id)
    return cast(Published, await app[CATALOG_READS].once(("fairness", sale_id), read))


async def _read_record(app: web.Application, sale_id: str) -> Published:
    began = time.monotonic()
    found = await published(app[CLIENTS].pool, sale_id)
    if found is None:
        raise NotFound(f"unknown sale {shown(sale_id)}", code="unknown_sale")
    now = time.monotonic()
    complete = found.members is not None and found.seed is not None
    cache = app[FAIRNESS]
    if len(cache) > 64:
        cache.clear()
    cache[sale_id] = Copy(math.inf if complete else now + INCOMPLETE_TTL_S, began, now - began,
                          found)  # fmt: skip
    return found


def _int(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    return integer(raw, name, minimum=0, maximum=high, what=f"a whole number from 0 to {high}")


async def fairness(request: web.Request) -> web.Response:
    sale_id = sale_of(request)
    record = await _record(request, sale_id)
    offset = _int(request, "offset", 0, 100_000_000)
    limit = _int(request, "limit", PAGE, PAGE)
    return json_response(record.json(offset, limit), headers={"Cache-Control": "max-age=5"})


async def fairness_proof(request: web.Request) -> web.Response:
    """The ticket holder's own place in the recorded order, with its Merkle path."""
    sale_id = sale_of(request)
    _, buyer, position = queue_ticket(request, sale_id)
    record = await _record(request, sale_id)
    if record.members is None:
        raise NotFound(record.missing_why, code="not_shuffled")
    member = member_of(sale_id, buyer)
    members = record.members
    if not 1 <= position <= len(members) or members[position - 1] != member:
        raise NotFound("this ticket's place is not in the pre-queue (joined after the start, "
                       "or not yet placed: poll the queue status for a placed ticket)",
                       code="not_in_prequeue")  # fmt: skip
    return json_response({
        "member": member, "position": position, "size": len(members), "root": record.root,
        "path": merkle_path(members, position),
    })  # fmt: skip


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/sales/{sale}", sale_info)
    app.router.add_get("/v1/sales/{sale}/fairness", fairness)
    app.router.add_get("/v1/sales/{sale}/fairness/proof", fairness_proof)
