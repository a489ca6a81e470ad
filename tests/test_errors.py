"""How an error message quotes the input it refuses."""

from __future__ import annotations

from flashsale.errors import SHOWN_CHARACTERS, shown


def test_short_values_are_quoted_whole() -> None:
    assert shown("sale-1") == "'sale-1'"
    assert shown(12.5) == "12.5"


def test_a_long_string_is_cut_and_its_length_named() -> None:
    quoted = shown("x" * 5000)
    assert quoted == "'" + "x" * (SHOWN_CHARACTERS - 2) + "…' (5000 characters)"


def test_a_long_value_of_another_kind_is_cut_as_text() -> None:
    value = list(range(1000))
    assert (
        shown(value)
        == repr(value)[:SHOWN_CHARACTERS] + f"… ({len(repr(value))} characters as text)"
    )
