"""The sale a spike runs on, through the admin API: one it makes (a product, ``SPIKE-1``, opening
now), or the one ``--sale`` names, as its buyers will meet it. Either is a plain dict, as the
locust master sends it to its workers. Plain ``requests``: the locustfile runs under gevent."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from flashsale.wording import span
from loadtest.engine_check import CannotStart, admin_headers, call, error_of

SKU = "SPIKE-1"  # the product of the sale the spike makes
# A rehearsal's buyers wait in the pre-queue for a sale that opens later, and its answers are
# timed from the opening: one further off than this is refused, for a copy that opens sooner.
MAX_WAIT_FOR_OPENING_S = 15 * 60
MAX_NAME = 200  # characters of a sale's name (flashsale.salespec.text)


def make_sale(host: str, admin_token: str, buyers: int, stock: int, buckets: int) -> dict[str, Any]:
    """Create and preload a sale of ``stock`` units opening now."""
    now, admin = datetime.now(UTC), admin_headers(admin_token)
    spec = {
        "name": f"locust spike {buyers} buyers", "starts_at": now.isoformat(),
        "ends_at": (now + timedelta(hours=1)).isoformat(), "max_queue": 10_000_000,
        "skus": [{"sku": SKU, "title": "Spike SKU", "stock": stock, "price": 1000,
                  "currency": "EUR", "per_buyer_limit": 1, "hold_ttl_seconds": 120,
                  "buckets": buckets}],
    }  # fmt: skip
    sale_id = _preloaded(host, admin, spec, "creating the sale")
    return {"sale_id": sale_id, "opened_at": time.time(), "skus": [SKU], "challenge": 0,
            "units": stock}  # fmt: skip


def _preloaded(host: str, admin: dict[str, str], spec: dict[str, Any], doing: str) -> str:
    """The id of the sale ``spec`` makes, preloaded; CannotStart saying what failed."""
    created = call("POST", host, "/admin/v1/sales", json=spec, headers=admin)
    if created.status_code != 201:
        raise CannotStart(f"{doing} failed: {created.status_code} {created.text}")
    sale_id = str(created.json()["id"])
    loaded = call("POST", host, f"/admin/v1/sales/{sale_id}/preload", headers=admin)
    if loaded.status_code != 200:
        raise CannotStart(f"preloading {sale_id} failed: {loaded.status_code} {loaded.text}")
    return sale_id


def existing_sale(host: str, admin_token: str, sale_id: str) -> dict[str, Any]:
    """The sale ``sale_id`` as its buyers will meet it: its products, its opening (now, or its
    start) and the proof of work it asks at join."""
    read = call("GET", host, f"/admin/v1/sales/{sale_id}", headers=admin_headers(admin_token))
    if read.status_code != 200:
        said = error_of(read).get("message", read.text)
        raise CannotStart(f"--sale {sale_id}: {read.status_code} {said}")
    status = read.json()
    sale = status["sale"]
    if sale["state"] == "ended":
        raise CannotStart(f"--sale {sale_id}: the sale has ended; rehearse one still to come")
    if sale["state"] == "paused":  # its buyers would wait, unanswered, until the drain ends
        raise CannotStart(f"--sale {sale_id}: the sale is paused: `flashsale sale resume "
                          f"{sale_id}` first")  # fmt: skip
    if not sale.get("preloaded_at"):
        raise CannotStart(f"--sale {sale_id}: not preloaded, so nobody could join it: "
                          f"`flashsale sale preload {sale_id}` first")  # fmt: skip
    starts = datetime.fromisoformat(sale["starts_at"]).timestamp()
    if (lead := starts - time.time()) > MAX_WAIT_FOR_OPENING_S:
        at = datetime.fromtimestamp(starts, UTC)
        raise CannotStart(
            f"--sale {sale_id}: it opens in {span(lead)} ({at:%Y-%m-%d %H:%M} "
            "UTC), and its buyers would wait in its pre-queue until then: rehearse a copy that "
            f"opens sooner (`flashsale loadtest spike --sale {sale_id}`, without --in-place, "
            "makes one)"
        )
    return {"sale_id": sale_id, "opened_at": max(time.time(), starts),
            "skus": [s["sku"] for s in status["skus"]], "challenge": sale["join_challenge"],
            "units": sum(s["stock_total"] for s in status["skus"])}  # fmt: skip


def copy_sale(host: str, admin_token: str, sale_id: str, *, opens_in_s: float) -> str:
    """A copy of ``sale_id`` for a rehearsal, preloaded: its products, stock, limits, hold
    times, admission settings and proof of work, opening ``opens_in_s`` from now for an hour.
    Its id; the sale itself is only read."""
    admin = admin_headers(admin_token)
    read = call("GET", host, f"/admin/v1/sales/{sale_id}/template", headers=admin)
    if read.status_code != 200:
        said = error_of(read).get("message", read.text)
        raise CannotStart(f"--sale {sale_id}: {read.status_code} {said}")
    spec = read.json()
    if not spec["skus"]:
        raise CannotStart(f"--sale {sale_id}: it has no SKUs, so there is nothing to rehearse")
    starts = datetime.now(UTC) + timedelta(seconds=opens_in_s)
    copy = {
        **spec,
        "name": f"rehearsal of {spec['name']}"[:MAX_NAME],
        "starts_at": starts.isoformat(),
        "ends_at": (starts + timedelta(hours=1)).isoformat(),
    }
    return _preloaded(host, admin, copy, f"copying {sale_id}")
