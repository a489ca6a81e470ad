"""The text of a file or body a merchandiser saved, as Windows tools save it too: UTF-8, with
or without a byte-order mark (Notepad, PowerShell 7, Excel's "CSV UTF-8"), or UTF-16 with one
(PowerShell 5's ``>`` and ``Out-File``, Excel's "Unicode Text"). A file in a Windows code
page (Excel's plain "CSV" in Western Europe) cannot be told from another code page, so it is
refused, saying where its first byte that is not UTF-8 is and how to save it as UTF-8."""

from __future__ import annotations

import codecs

from flashsale.errors import InvalidInput

# The byte-order marks read, UTF-8's and UTF-16's (either byte order); the mark is dropped.
MARKS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))  # fmt: skip


def has_mark(raw: bytes) -> bool:
    return raw.startswith(tuple(mark for mark, _ in MARKS))


def as_text(raw: bytes, field: str, what: str = "") -> str:
    """``raw`` decoded by its byte-order mark, else as UTF-8; bad input named ``field``
    (``what``, a file's name, opens the message) when it is neither."""
    codec, start = next(((c, len(m)) for m, c in MARKS if raw.startswith(m)), ("utf-8", 0))
    try:
        return raw[start:].decode(codec)
    except UnicodeDecodeError as exc:
        at = start + exc.start
        line = raw[:at].count(b"\n") + 1
        said = f"{what} is" if what else "is"
        name = "UTF-8" if codec == "utf-8" else "UTF-16"
        raise InvalidInput(
            field,
            f"{said} not {name} text (byte 0x{raw[at]:02x} on line "
            f'{line}): save it as UTF-8 (Excel: "CSV UTF-8")',
        ) from None
