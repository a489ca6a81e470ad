"""Each gateway process's copies of a sale (gateway.catalog), over HTTP against the real stack.

``GET /v1/sales/{sale}`` for a sale of thousands of SKUs: every buyer and storefront reads it,
so each process encodes its copy once, compresses it once, answers a revalidation with 304,
and reads it less often when a read is slow. The SKUs' limits that every reservation checks:
kept longer when slow to read, never waited for once a copy exists, and read again for a SKU
the copy does not know."""

from __future__ import annotations

import asyncio
import gzip
import time
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from flashsale.settings import Settings
from gateway import catalog, documents
from gateway.state import CATALOG, COUNTERS, SALES, SKU_LIMITS
from tests.harness import ADMIN, Gateway, auth, gateway, longest_stall

SKUS = 2_000  # about 300 KB of JSON: a catalogue, not a pair of sneakers


def _skus(count: int) -> list[dict[str, Any]]:
    return [{"sku": f"SKU-{i}", "title": f"Sneaker model {i}", "stock": 5, "price": 12900,
             "currency": "EUR", "per_buyer_limit": 1} for i in range(1, count + 1)]  # fmt: skip


class SummaryReads:
    """Counts a gateway's reads of sale summaries from here on, each ``delay_s`` slower; the
    process's copies are dropped."""

    def __init__(self, gw: Gateway, delay_s: float = 0.0) -> None:
        self.count = 0
        sales = gw.app[SALES]
        read = sales.with_stock

        async def counted(sale_id: str) -> Any:
            self.count += 1
            await asyncio.sleep(delay_s)
            return await read(sale_id)

        sales.with_stock = counted
        gw.app[CATALOG].clear()


async def test_a_large_summary_is_encoded_once_compressed_and_revalidated(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = 0
    encode = documents.encoded

    def counted(data: Any) -> bytes:
        nonlocal encodes
        encodes += 1
        return encode(data)

    monkeypatch.setattr(documents, "encoded", counted)
    async with gateway(stack) as gw:
        sale = await gw.create_sale(skus=_skus(SKUS))
        url = f"/v1/sales/{sale}"
        plain = await gw.http.get(url, headers={"Accept-Encoding": "identity"})
        assert plain.status == 200 and "Content-Encoding" not in plain.headers
        body = await plain.read()
        assert len(body) > 200_000 and len(orjson.loads(body)["skus"]) == SKUS
        etag = plain.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"') and len(etag) > 8

        packed = await gw.http.get(url, headers={"Accept-Encoding": "br, gzip;q=0.8"},
                                   auto_decompress=False)  # fmt: skip
        assert packed.headers["Content-Encoding"] == "gzip"
        # Both vary the answer: a CDN keeps a copy per encoding, and per storefront origin
        # (a listed origin is echoed in Access-Control-Allow-Origin).
        assert {v.strip() for v in packed.headers["Vary"].split(",")} >= {
            "Accept-Encoding",
            "Origin",
        }
        squeezed = await packed.read()
        assert len(squeezed) * 5 < len(body) and gzip.decompress(squeezed) == body
        assert packed.headers["ETag"] != etag  # another representation, another tag

        refused = await gw.http.get(url, headers={"Accept-Encoding": "gzip;q=0"})
        assert "Content-Encoding" not in refused.headers and await refused.read() == body

        for tag in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
            same = await gw.http.get(url, headers={"If-None-Match": tag,
                                                   "Accept-Encoding": "identity"})  # fmt: skip
            assert same.status == 304, tag
            assert await same.read() == b""
            assert same.headers["ETag"] == etag and same.headers["Cache-Control"]
        changed = await gw.http.get(url, headers={"If-None-Match": '"nope"'})
        assert changed.status == 200

        for _ in range(20):
            assert (await gw.http.get(url)).status == 200
        assert encodes == 1  # one copy, one encoding, however many buyers read it


async def test_a_storefront_asks_for_its_skus_only(stack: Settings) -> None:
    """A buyer sent to one product of a catalogue sale read all of it: 300 KB here, 40 MB
    (3 MB gzipped) for 200,000 SKUs. ``?sku=`` answers the named SKUs only, from the same
    copy, and ``sku_count`` says how many the sale has; a SKU the sale lacks is a 404 and
    more than the most asked at once a 422, both naming it."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(skus=_skus(SKUS))
        reads = SummaryReads(gw)
        whole = await (await gw.http.get(f"/v1/sales/{sale}")).json()
        assert whole["sku_count"] == SKUS and len(whole["skus"]) == SKUS
        answer = await gw.http.get(f"/v1/sales/{sale}?sku=SKU-7&sku=SKU-3&sku=SKU-7")
        assert answer.status == 200 and answer.headers["Cache-Control"] == "public, max-age=1"
        some = await answer.json()
        assert [s["sku"] for s in some["skus"]] == ["SKU-7", "SKU-3"]
        assert some["skus"][0] == next(s for s in whole["skus"] if s["sku"] == "SKU-7")
        assert {k: v for k, v in some.items() if k != "skus"} == {
            k: v for k, v in whole.items() if k != "skus"}  # fmt: skip
        assert len(await answer.read()) < 2_000 and reads.count == 1  # the copy, not a read
        etag = answer.headers["ETag"]
        again = await gw.http.get(f"/v1/sales/{sale}?sku=SKU-7&sku=SKU-3",
                                  headers={"If-None-Match": etag})  # fmt: skip
        assert again.status == 304

        unknown = await gw.http.get(f"/v1/sales/{sale}?sku=SKU-7&sku=NOPE")
        assert unknown.status == 404
        assert (await unknown.json())["error"]["code"] == "unknown_sku"
        many = "&".join(f"sku=SKU-{i}" for i in range(1, documents.MAX_SKUS_ASKED + 2))
        too_many = await gw.http.get(f"/v1/sales/{sale}?{many}")
        assert too_many.status == 422
        assert (await too_many.json())["error"]["field"] == "sku"


async def test_a_buyers_unknown_sale_names_no_other_sale(stack: Settings) -> None:
    """An operator's unknown sale id is answered with the sale it was probably cut from, or
    whose name it is; anyone's is not: the public API would otherwise list sales (their ids
    and names, not yet announced ones too) to whoever asks with a prefix."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(name="Unannounced drop")
        for typed in (sale[:-1], "Unannounced drop"):
            for method, path in (("GET", f"/v1/sales/{typed}"),
                                 ("POST", f"/v1/sales/{typed}/queue")):  # fmt: skip
                answer = await gw.http.request(method, path, headers=auth(gw.token("nosy")))
                error = (await answer.json())["error"]
                assert (answer.status, error["code"]) == (404, "unknown_sale"), (path, error)
                assert sale not in error["message"] and "Unannounced" not in error["message"][
                    len(f"unknown sale {typed!r}"):], error  # fmt: skip
        admin = await gw.http.get(f"/admin/v1/sales/{sale[:-1]}", headers=auth(ADMIN))
        assert f"(did you mean {sale}, " in (await admin.json())["error"]["message"]


async def test_a_sales_items_keep_the_order_they_were_given_in(stack: Settings) -> None:
    """A sale of sizes 36 to 45.5 as SNK-0 to SNK-19 was listed by its SKU's spelling (SNK-0,
    SNK-1, SNK-10, …, SNK-19, SNK-2): the waiting-room page, which shows the first twelve,
    skipped sizes 37 to 40.5, and a `sale show --template` round trip reshuffled the file.
    The items keep the order of the sale file, then of each import."""
    given = [*(f"SNK-{i}" for i in range(20)), "Z-LAST", "A-FIRST"]
    async with gateway(stack) as gw:
        sale = await gw.create_sale(skus=[{**s, "sku": sku} for s, sku in
                                          zip(_skus(len(given)), given, strict=True)])  # fmt: skip
        added = await gw.http.post(
            f"/admin/v1/sales/{sale}/skus",
            headers=auth(ADMIN),
            json=[{**_skus(1)[0], "sku": sku} for sku in ("M-2", "B-1")],
        )
        assert added.status == 200, await added.text()
        expected = [*given, "M-2", "B-1"]
        shown = await (await gw.http.get(f"/admin/v1/sales/{sale}", headers=auth(ADMIN))).json()
        assert [s["sku"] for s in shown["skus"]] == expected
        await gw.http.post(f"/admin/v1/sales/{sale}/preload", headers=auth(ADMIN))
        public = await (await gw.http.get(f"/v1/sales/{sale}")).json()
        assert [s["sku"] for s in public["skus"]] == expected


async def test_a_small_summary_is_not_compressed(stack: Settings) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale()
        answer = await gw.http.get(f"/v1/sales/{sale}", auto_decompress=False)
        assert answer.status == 200 and "Content-Encoding" not in answer.headers
        assert orjson.loads(await answer.read())["id"] == sale


async def test_a_summary_slow_to_read_is_read_less_often(stack: Settings) -> None:
    """A read of thousands of SKUs takes a large share of a second of Postgres, Redis and the
    process: the copy lasts ten times as long as its read took, so that polling buyers cannot
    keep a process reading."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale()
        reads = SummaryReads(gw, delay_s=0.3)
        assert (await gw.http.get(f"/v1/sales/{sale}")).status == 200
        await asyncio.sleep(2 * catalog.INFO_TTL_S)
        assert (await gw.http.get(f"/v1/sales/{sale}")).status == 200
        assert reads.count == 1
        assert gw.app[CATALOG][sale][0] - time.monotonic() > 1.0


async def test_a_catalogue_summary_is_kept_by_the_live_pages_rule(stack: Settings) -> None:
    """A copy was kept at most 5 s however long its read took: a 200,000-SKU sale took
    about 5 s to read, so a process that served its summary read it again and again, and
    built its 40 MB of JSON on the loop (0.4 s) every 5 s. It is now kept ten times as long
    as its read took up to a minute, as the live page's read of a sale's SKUs is."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale()
        SummaryReads(gw, delay_s=0.7)
        assert (await gw.http.get(f"/v1/sales/{sale}")).status == 200
        assert gw.app[CATALOG][sale][0] - time.monotonic() > 6.0


async def test_a_catalogue_summary_is_built_off_the_loop() -> None:
    """A summary is built, encoded, tagged and compressed once per copy: for 200,000 SKUs,
    0.4 s in which the process's loop answered no buyer. It is built in a thread now; the
    loop waits at most the interpreter's switch interval at a time."""
    skus = [{"sku": f"S{i}", "title": f"Item {i}", "price": 1000, "currency": "EUR",
             "per_buyer_limit": 1, "buckets": 1} for i in range(50_000)]  # fmt: skip
    sale = {"id": "sale-big", "name": "Catalogue", "state": "live", "starts_at": "x",
            "ends_at": "y", "admission_window_seconds": 60, "join_challenge": 0,
            "join_challenge_max": 0, "shuffle": None, "skus": skus}  # fmt: skip
    remaining: dict[str, tuple[int, int] | None] = {str(s["sku"]): (5, 0) for s in skus}

    class Sales:
        async def with_stock(self, sale_id: str) -> Any:
            await asyncio.sleep(0)  # as a read does
            return sale, remaining

    class Counters:  # the waiting room's: a newcomer may still join
        async def get(self, sale_id: str) -> Any:
            return SimpleNamespace(view=SimpleNamespace(closed_to_newcomers=False))

    app = web.Application()
    app[SALES] = cast(Any, Sales())
    app[COUNTERS] = cast(Any, Counters())
    app[CATALOG] = {}

    def build() -> float:  # the whole build, on this thread
        began = time.thread_time()
        catalog.summary_document(sale, remaining)
        return time.thread_time() - began

    whole = min(build() for _ in range(2))
    await catalog._read_summary(app, "sale-big")  # warm
    stall = min([await longest_stall(catalog._read_summary(app, "sale-big")) for _ in range(2)])
    assert stall * 3 < whole, (stall, whole)


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip", True), ("GZIP", True), ("x-gzip", True), ("gzip, deflate, br", True),
        ("br;q=1, gzip;q=0.1", True), ("gzip;q=0", False), ("gzip; q=0.000", False),
        ("*", True), ("*;q=0", False), ("gzip;q=0, *", False), ("*, gzip;q=0", False),
        ("identity", False), ("", False), ("br, deflate", False), ("gzip;q=nope", False),
    ],
)  # fmt: skip
def test_accept_encoding_is_read_as_rfc_9110_says(header: str, accepted: bool) -> None:
    assert documents.accepts_gzip(header) is accepted


@given(st.text(), st.sampled_from(["gzip", "x-gzip", "GZip"]))
def test_the_header_readers_never_fail_on_any_text(header: str, name: str) -> None:
    """Both readers see whatever a client sends: neither may raise; a list that names gzip
    first without a quality accepts it whatever follows, and a tag is found wherever it is in
    the list, weak or strong, and nowhere else (but for ``*``)."""
    assert documents.accepts_gzip(f"{name}, {header}")
    documents.accepts_gzip(header)
    tag = documents._tag(header.encode())  # a tag the text cannot hold
    assert documents.etag_matches(f"{header}, {tag}", tag)
    assert documents.etag_matches(f"{header},W/{tag} ", tag)
    if "*" not in header:
        assert not documents.etag_matches(header, tag)


async def _admitted(gw: Gateway, sale: str, buyer: str) -> str:
    _, joined = await gw.join(sale, buyer)
    return str((await gw.admitted(sale, joined["ticket"]))["admission_token"])


async def test_a_reservation_never_waits_for_the_limits_to_be_read_again(
    stack: Settings,
) -> None:
    """A sale's SKU limits are read from Redis (two reads per SKU: 0.8 s for 100,000 SKUs
    here), and every reservation that found the copy due waited for the new read: a stall of
    the whole sale's reservations each time. A due copy that was slow to read is served while
    the next read runs beside."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=5)
        gw.pump(sale)
        admissions = [await _admitted(gw, sale, f"b{i}") for i in range(2)]
        scripts = gw.app[SALES].scripts
        read = scripts.sku_limits
        assert (await gw.reserve(sale, "b0", admissions[0]))[0] == 201  # the copy is made
        release = asyncio.Event()
        reads = 0

        async def held(keys: Any) -> Any:
            nonlocal reads
            reads += 1
            await release.wait()
            return await read(keys)

        scripts.sku_limits = held
        copy = gw.app[SKU_LIMITS][sale]  # as if a sale of many SKUs: slow to read, and due
        gw.app[SKU_LIMITS][sale] = copy._replace(expires=time.monotonic() - 1, took=0.5)
        code, _ = await asyncio.wait_for(gw.reserve(sale, "b1", admissions[1]), 5)
        assert code == 201 and reads == 1  # answered while the read is held
        release.set()
        await asyncio.sleep(0.05)
        assert gw.app[SKU_LIMITS][sale][0] > time.monotonic()  # the new copy is in


async def test_limits_slow_to_read_are_kept_longer_and_a_new_sku_is_read_at_once(
    stack: Settings,
) -> None:
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=5, limit=2)
        gw.pump(sale)
        admissions = [await _admitted(gw, sale, f"b{i}") for i in range(2)]
        scripts = gw.app[SALES].scripts
        read = scripts.sku_limits

        async def slow(keys: Any) -> Any:
            await asyncio.sleep(0.3)
            return await read(keys)

        scripts.sku_limits = slow
        gw.app[SKU_LIMITS].clear()
        assert (await gw.reserve(sale, "b0", admissions[0]))[0] == 201
        assert gw.app[SKU_LIMITS][sale][0] - time.monotonic() > 2.0  # ten times the read
        scripts.sku_limits = read
        # A SKU added now is not in that copy: a reservation for it reads the limits again
        # rather than answer 404 for as long as the copy is kept.
        added = await gw.http.post(
            f"/admin/v1/sales/{sale}/skus",
            data="sku,stock,price,currency,title\nNEW,3,100,EUR,New\n",
            headers={**auth(ADMIN), "Content-Type": "text/csv"},
        )
        assert added.status == 200, await added.text()
        assert (
            await gw.http.post(f"/admin/v1/sales/{sale}/preload", headers=auth(ADMIN))
        ).status == 200
        await asyncio.sleep(catalog.LIMITS_TTL_S)  # as long as a copy was kept before
        assert gw.app[SKU_LIMITS][sale][0] > time.monotonic()  # this one is kept still
        body = {"sku": "NEW", "quantity": 1, "payment_token": "tok_ok"}
        code, answer = await gw.reserve(sale, "b1", admissions[1], body=body)
        assert code == 201, answer


async def test_a_reader_never_waits_for_the_summary_to_be_read_again(stack: Settings) -> None:
    """Every buyer who found the public summary due waited for its new read: 0.35 s for a
    sale of 20,000 SKUs here, each time. A due copy that was slow to read is served while the
    next read runs beside; one quick to read is waited for, as fresh as before."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale()
        assert (await gw.http.get(f"/v1/sales/{sale}")).status == 200  # the copy is made
        sales = gw.app[SALES]
        read = sales.with_stock
        release = asyncio.Event()

        async def held(sale_id: str) -> Any:
            await release.wait()
            return await read(sale_id)

        sales.with_stock = held
        copy = gw.app[CATALOG][sale]  # as if a sale of many SKUs: slow to read, and due
        gw.app[CATALOG][sale] = copy._replace(expires=time.monotonic() - 1, took=0.5)
        answer = await asyncio.wait_for(gw.http.get(f"/v1/sales/{sale}"), 5)
        assert answer.status == 200 and (await answer.json())["id"] == sale
        release.set()
        await asyncio.sleep(0.05)
        assert gw.app[CATALOG][sale].expires > time.monotonic()  # the new copy is in
        quick = gw.app[CATALOG][sale]
        gw.app[CATALOG][sale] = quick._replace(expires=time.monotonic() - 1, took=0.0)  # quick
        release.clear()
        waiting = asyncio.ensure_future(gw.http.get(f"/v1/sales/{sale}"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it waits for the read
        release.set()
        assert (await asyncio.wait_for(waiting, 5)).status == 200


async def test_a_sale_summary_due_for_a_refresh_is_read_once_for_all_its_callers(
    stack: Settings,
) -> None:
    """Every buyer of a spike reads ``GET /v1/sales/{sale}``. When the process's copy is due,
    the buyers asking meanwhile wait for the one read in flight instead of each making their
    own: for a sale of thousands of SKUs one read is a large share of a second of Postgres,
    Redis and this process's time."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=3)
        reads = SummaryReads(gw)
        answers = await asyncio.gather(*(gw.http.get(f"/v1/sales/{sale}") for _ in range(40)))
        assert [a.status for a in answers] == [200] * 40
        bodies = [await a.json() for a in answers]
        assert all(b == bodies[0] for b in bodies) and bodies[0]["skus"][0]["remaining"] == 3
        assert reads.count == 1


async def test_a_sku_added_to_a_preloaded_sale_is_offered_once_it_is_preloaded(
    stack: Settings,
) -> None:
    """The public summary listed a SKU imported into a preloaded sale before its preload, with
    nothing remaining yet not sold out, so the page offered it; a reservation for it was 404
    ``unknown_sku``. Before the sale's first preload every SKU is shown (the shop's link may
    go out early)."""
    async with gateway(stack) as gw:
        sale = await gw.create_sale(stock=5)
        added = await gw.http.post(
            f"/admin/v1/sales/{sale}/skus", data="sku,stock,price,currency\nLATE,3,100,EUR\n",
            headers={**auth(ADMIN), "Content-Type": "text/csv"},
        )  # fmt: skip
        assert added.status == 200, await added.text()

        async def offered() -> list[str]:
            gw.app[CATALOG].clear()
            body = await (await gw.http.get(f"/v1/sales/{sale}")).json()
            assert body["sku_count"] == len(body["skus"]), body
            return [s["sku"] for s in body["skus"]]

        assert await offered() == ["SKU-1"]
        asked = await gw.http.get(f"/v1/sales/{sale}?sku=LATE")
        assert asked.status == 404 and (await asked.json())["error"]["code"] == "unknown_sku"
        loaded = await gw.http.post(f"/admin/v1/sales/{sale}/preload", headers=auth(ADMIN))
        assert loaded.status == 200, await loaded.text()
        assert await offered() == ["SKU-1", "LATE"]  # in the order they were added
        early = await gw.create_sale(preload=False)
        assert [s["sku"] for s in (await (await gw.http.get(f"/v1/sales/{early}")).json())
                ["skus"]] == ["SKU-1"]  # fmt: skip
