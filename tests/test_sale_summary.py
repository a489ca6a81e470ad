"""``GET /v1/sales/{sale}`` for a sale of thousands of SKUs: every buyer and storefront reads
it, so each process encodes its copy once, compresses it once, answers a revalidation with
304, and reads it less often when a read is slow, over HTTP against the real stack."""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashsale.settings import Settings
from gateway import catalog, documents
from gateway.state import CATALOG, SALES
from tests.harness import gateway

SKUS = 2_000  # about 300 KB of JSON: a catalogue, not a pair of sneakers


def _skus(count: int) -> list[dict[str, Any]]:
    return [{"sku": f"SKU-{i}", "title": f"Sneaker model {i}", "stock": 5, "price": 12900,
             "currency": "EUR", "per_buyer_limit": 1} for i in range(1, count + 1)]  # fmt: skip


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
        assert "Accept-Encoding" in packed.headers["Vary"]
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
        sales = gw.app[SALES]
        reads = 0
        read = sales.with_stock

        async def slow(sale_id: str) -> Any:
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.3)
            return await read(sale_id)

        sales.with_stock = slow
        gw.app[CATALOG].clear()
        assert (await gw.http.get(f"/v1/sales/{sale}")).status == 200
        await asyncio.sleep(2 * catalog.INFO_TTL_S)
        assert (await gw.http.get(f"/v1/sales/{sale}")).status == 200
        assert reads == 1
        assert gw.app[CATALOG][sale][0] - time.monotonic() > 1.0


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
