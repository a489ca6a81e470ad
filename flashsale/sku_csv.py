"""SKU rows from CSV, as a merchandiser's spreadsheet exports them.

The header names the SKU fields in any case, its columns separated by commas, semicolons or
tabs (as a spreadsheet in the user's language exports them); a UTF-8 byte-order mark (Excel's
"CSV UTF-8") is ignored; rows and columns a spreadsheet exports as empty cells (``,,,,``
below the SKUs, ``,,`` after each line) are left out. Every row is validated before the
caller writes anything, and an error names each bad cell by its line in the file and its
column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from flashsale.errors import InvalidInput, shown
from flashsale.salespec import (
    SKU_FIELDS,
    SKU_REQUIRED,
    SkuImport,
    SkuSpec,
    collect_sku,
    refuse_all,
    reject_duplicates,
)
from flashsale.wording import counted


def parse_csv(content: str) -> SkuImport:
    """The SKUs of a CSV file's text (blank lines are skipped but counted in line numbers)."""
    content = content.removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=_separator(content))
    try:
        header = [h.strip().lower() for h in next(reader, [])]  # "SKU", as spreadsheets title
    except csv.Error as exc:
        raise InvalidInput("csv.header", f"malformed CSV: {exc}") from None
    if not header:
        raise InvalidInput("csv", "is empty: expected a header row " + ",".join(SKU_FIELDS))
    named = [i for i, name in enumerate(header) if name]
    _check_header([header[i] for i in named])
    specs: list[SkuSpec] = []
    fields: list[str] = []
    errors: list[InvalidInput] = []
    try:
        for given in reader:
            where = f"row {reader.line_num}"
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
    except csv.Error as exc:
        errors.append(InvalidInput(f"row {reader.line_num}", f"malformed CSV: {exc}"))
    refuse_all(errors)
    if not specs:
        raise InvalidInput("csv", "has a header but no rows")
    batch = SkuImport(tuple(specs), tuple(fields))
    reject_duplicates(batch)
    return batch


def _separator(content: str) -> str:
    """What the header's columns are separated by: commas, or where it has none, semicolons
    (Excel's "CSV" where the comma is the decimal mark: German, French, Italian…) or tabs (a
    copy from a sheet)."""
    header = content.split("\n", 1)[0]
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
            known = ", ".join(SKU_FIELDS)
            raise InvalidInput(f"csv.header.{name}", f"unknown column; the columns are {known}")
        if name in seen:
            raise InvalidInput(f"csv.header.{name}", "appears twice")
        seen.add(name)
    missing = sorted(SKU_REQUIRED - seen)
    if missing:
        raise InvalidInput(f"csv.header.{missing[0]}", "required column is missing")
