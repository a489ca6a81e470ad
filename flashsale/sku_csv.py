"""SKU rows from CSV, as a merchandiser's spreadsheet exports them (or, for an import, from
JSON: :func:`parse_import`).

The header names the SKU fields in any case, its columns separated by commas, semicolons or
tabs (as a spreadsheet in the user's language exports them); a UTF-8 byte-order mark (Excel's
"CSV UTF-8") is ignored; rows and columns a spreadsheet exports as empty cells (``,,,,``
above the header or below the SKUs, ``,,`` after each line) are left out. Every row is
validated before the caller writes anything, and an error names each bad cell by the line in
the file its row starts on and its column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from flashsale.errors import InvalidInput, shown, unknown_name
from flashsale.salespec import (
    SKU_FIELDS,
    SKU_REQUIRED,
    SkuImport,
    SkuSpec,
    collect_sku,
    parse_skus,
    refuse_all,
    reject_duplicates,
)
from flashsale.wording import counted

# What an import takes, for a file or a body with nothing in it.
SKUS_TEXT = 'CSV with a header row sku,title,stock,price,currency,... or JSON {"skus": [...]}'


def parse_import(content: str, read_json: Callable[[str], Any]) -> SkuImport:
    """SKUs to add to a sale from a file or a body: JSON (``{"skus": [...]}`` or the list
    alone, parsed by ``read_json``) when it opens as JSON, which no CSV header can, else CSV."""
    if content.lstrip("\ufeff \t\r\n").startswith(("{", "[")):
        return parse_skus(read_json(content))
    return parse_csv(content)


def parse_csv(content: str) -> SkuImport:
    """The SKUs of a CSV file's text (blank lines are skipped but counted in line numbers)."""
    content = content.removeprefix("\ufeff")
    rows = _rows(content)
    # The first row with a word in it: a table that starts a few rows down in its sheet comes
    # with those rows as blank lines or empty cells, in whichever separator.
    given = next((row for _, row in rows if any(c.strip(_EMPTY) for c in row)), [])
    header = [h.strip().lower() for h in given]  # "SKU", as spreadsheets title it
    if not header:
        raise InvalidInput("csv", "is empty: expected a header row " + ",".join(SKU_FIELDS))
    named = [i for i, name in enumerate(header) if name]
    _check_header([header[i] for i in named])
    specs: list[SkuSpec] = []
    fields: list[str] = []
    errors: list[InvalidInput] = []
    try:
        for line, given in rows:
            where = f"row {line}"
            if not any(cell.strip() for cell in given):
                continue  # a blank line, or a row of empty cells
            width = max((i + 1 for i, cell in enumerate(given) if cell.strip()), default=0)
            if len(given) <= named[-1] or width > len(header):  # empty cells past the header go
                said = (f"has {counted(len(given), 'column')}: the header has {len(header)}"
                        if width <= len(header) else
                        f"has a value in column {width}, past the header's {len(header)}"
                        )  # fmt: skip
                errors.append(InvalidInput(where, said))
                continue
            cells = (given + [""] * len(header))[: len(header)]
            stray = next((i for i in range(len(cells)) if not header[i] and cells[i].strip()),
                         None)  # fmt: skip
            if stray is not None:
                errors.append(InvalidInput(where, f"has a value in column {stray + 1}, which "
                                                  "has no name in the header: "
                                                  f"{shown(cells[stray])}"))  # fmt: skip
                continue
            specs.append(collect_sku({header[i]: cells[i] for i in named}, where, errors))
            fields.append(f"{where}.sku")
    except InvalidInput as exc:  # a malformed row: nothing after it can be read
        errors.append(exc)
    refuse_all(errors)
    if not specs:
        raise InvalidInput("csv", "has a header but no rows")
    batch = SkuImport(tuple(specs), tuple(fields))
    reject_duplicates(batch)
    return batch


_EMPTY = " \t\r\n,;"  # what a row of empty cells is made of, in any separator


def _rows(content: str) -> Iterator[tuple[int, list[str]]]:
    """The rows of ``content``, each with the line in the file it starts on (a quoted cell may
    hold line breaks). A malformed row raises InvalidInput naming it: a quote never closed, or
    text after a closing quote (which a lenient reader would run into the cell unsaid)."""
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=_separator(content),
                        strict=True)  # fmt: skip
    line = 1
    try:
        for row in reader:
            yield line, row
            line = reader.line_num + 1
    except csv.Error as exc:
        said = ('a quote (") opened in this row is never closed'
                if str(exc) == "unexpected end of data" else f"malformed CSV: {exc}")  # fmt: skip
        raise InvalidInput(f"row {line}", said) from None


def _separator(content: str) -> str:
    """What the header's columns are separated by: commas, or where it has none, semicolons
    (Excel's "CSV" where the comma is the decimal mark: German, French, Italian…) or tabs (a
    copy from a sheet)."""
    header = next((line for line in io.StringIO(content) if line.strip(_EMPTY)), "")
    if "," in header:
        return ","
    return next((c for c in ";\t" if c in header), ",")


def _check_header(header: Sequence[str]) -> None:
    """Every named column known and given once, the required ones present."""
    if len(header) == 1:
        separator = next((c for c in ";\t|" if c in header[0]), None)
        if separator:
            raise InvalidInput("csv.header", "columns must be separated by commas, semicolons "
                                             f"or tabs, found {separator!r}")  # fmt: skip
    seen: set[str] = set()
    for name in header:
        if name not in SKU_FIELDS:
            raise InvalidInput(f"csv.header.{name}", unknown_name(name, SKU_FIELDS, "column"))
        if name in seen:
            raise InvalidInput(f"csv.header.{name}", "appears twice")
        seen.add(name)
    missing = sorted(SKU_REQUIRED - seen)
    if missing:
        raise InvalidInput(f"csv.header.{missing[0]}", "required column is missing")
