"""The files the sale commands read: a sale file or a CSV ('-' is stdin), as text however
Windows tools saved it, and a sale file as JSON with each key once."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from flashsale.encodings import as_text
from flashsale.errors import InvalidInput
from flashsale.salespec import unique_keys

SALE_FILE = 'a sale file, JSON like {"name": ..., "skus": [...]}'


def read_input(path: str, expected: str) -> str:
    """The text of ``path`` ('-' is stdin); an unreadable file is bad input, and so is an
    empty one (said with what was ``expected``)."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput("file", f"cannot read {path}: {exc.strerror}") from None
    text = as_text(raw, "file", path)  # as Windows tools save it too
    if not text.strip(" \t\r\n\ufeff"):
        where = "stdin" if path == "-" else path
        raise InvalidInput("file", f"{where} is empty: expected {expected}")
    return text


def read_json_file(path: str) -> Any:
    return json_text(read_input(path, SALE_FILE))


def json_text(raw: str) -> Any:
    """A file's text as JSON, each key once; bad input named ``file`` with where it fails."""
    try:
        return json.loads(raw, object_pairs_hook=unique_keys("file"))
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            "file", f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise InvalidInput("file", "malformed JSON: nested too deeply") from None
