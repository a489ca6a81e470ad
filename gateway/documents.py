"""Answers that many requests share, such as a sale's public summary and its waiting-room page:
encoded once, tagged once and, when large, compressed once, then answered to every reader as
they are.

A :class:`Document` carries a strong ``ETag`` per representation (the gzip one has its own), so
a browser, a CDN or a reverse proxy revalidates with ``If-None-Match`` and gets a 304 without a
body; :func:`document_response` answers ``Vary: Accept-Encoding, Origin`` so that caches keep
the two representations apart, and the answers to each storefront origin (a listed origin is
echoed in ``Access-Control-Allow-Origin``: a copy kept for one would be refused by the
browsers of another).
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from flashsale.errors import InvalidInput, NotFound, shown

# Smaller answers are sent as they are: compressing them saves less than a packet.
COMPRESS_FROM = 16 * 1024
# zlib's fastest level: 3 MB of a sale's JSON to 165 KB in about 8 ms here (level 6: 119 KB
# in 24 ms), once per copy.
GZIP_LEVEL = 1
MAX_SKUS_ASKED = 100  # GET /v1/sales/{sale}?sku=...: the most SKUs named at once


def encoded(data: Any) -> bytes:
    return orjson.dumps(data)


def _tag(body: bytes, suffix: str = "") -> str:
    return f'"{hashlib.blake2b(body, digest_size=12).hexdigest()}{suffix}"'


@dataclass(frozen=True)
class Document:
    """``data`` encoded (JSON unless given as a body of another type), its ETag, and its gzip
    form (None when too small to gain)."""

    data: Any
    body: bytes
    etag: str
    gzipped: bytes | None
    gzip_etag: str
    content_type: str = "application/json"

    @classmethod
    def of(cls, data: Any, body: bytes | None = None, content_type: str = "application/json",
           level: int = GZIP_LEVEL) -> Document:  # fmt: skip
        body = encoded(data) if body is None else body
        gzipped = None
        if len(body) >= COMPRESS_FROM:
            gzipped = gzip.compress(body, level, mtime=0)
        etag = _tag(body)
        return cls(data, body, etag, gzipped, etag[:-1] + '-gzip"', content_type)


@dataclass(frozen=True)
class Summary:
    """A sale's public summary, encoded, and where each of its SKUs is in it."""

    document: Document
    places: dict[str, int]  # SKU -> its index in document.data["skus"]

    def only(self, skus: Sequence[str]) -> Document:
        """The summary with ``skus`` alone, each once, in the order asked (a storefront's
        product of a catalogue sale). Raises NotFound for a SKU the sale lacks, and
        InvalidInput for more than ``MAX_SKUS_ASKED``."""
        asked = list(dict.fromkeys(skus))
        if len(asked) > MAX_SKUS_ASKED:
            raise InvalidInput("sku", f"at most {MAX_SKUS_ASKED} SKUs at once, got {len(asked)}")
        data = self.document.data
        missing = next((sku for sku in asked if sku not in self.places), None)
        if missing is not None:
            raise NotFound(f"unknown SKU {shown(missing)} in sale {data['id']}",
                           code="unknown_sku")  # fmt: skip
        every = data["skus"]
        return Document.of({**data, "skus": [every[self.places[sku]] for sku in asked]})


def accepts_gzip(header: str) -> bool:
    """Whether an ``Accept-Encoding`` value accepts gzip: named (or ``x-gzip``, or ``*``
    when gzip is not named) with a quality above zero (RFC 9110 §12.5.3)."""
    star = False
    for item in header.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        if name in ("gzip", "x-gzip"):
            return quality > 0
        if name == "*":
            star = quality > 0
    return star


def etag_matches(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` value names ``etag`` (weak comparison, as RFC 9110
    §13.1.2 asks: ``W/"x"`` matches ``"x"``), or is ``*``."""
    if header is None:
        return False
    for item in header.split(","):
        tag = item.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def document_response(
    request: web.Request, document: Document, headers: Mapping[str, str]
) -> web.Response:
    """``document`` to this request: gzip when it accepts that, 304 when it holds this
    representation already (``If-None-Match``), with ``headers`` (Cache-Control) on both."""
    body, etag, encoding = document.body, document.etag, None
    if document.gzipped is not None and accepts_gzip(request.headers.get("Accept-Encoding", "")):
        body, etag, encoding = document.gzipped, document.gzip_etag, "gzip"
    out = {**headers, "Vary": "Accept-Encoding, Origin", "ETag": etag}
    if etag_matches(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers=out)
    if encoding is not None:
        out["Content-Encoding"] = encoding
    return web.Response(body=body, headers={**out, "Content-Type": document.content_type})
