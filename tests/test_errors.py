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
    text = ",".join(map(str, value)).join("[]")  # as JSON spells it
    assert shown(value) == text[:SHOWN_CHARACTERS] + f"… ({len(text)} characters as text)"


def test_a_json_value_is_quoted_as_json_says_it() -> None:
    # An admin API caller who sent `"stock": true` was told "got True" (Python's spelling).
    assert (shown(True), shown(False), shown(None)) == ("true", "false", "null")
    assert shown({"a": [1, None]}) == '{"a":[1,null]}'
    assert shown([1, "x"]) == '[1,"x"]'
