"""ISO 4217 active currency codes and their minor-unit exponents (prices are minor units)."""

from __future__ import annotations

import re
import unicodedata

# Digits grouped by thousands as a spreadsheet shows them: "1,000", "1 000", "1'000" (Swiss),
# with a (narrow) no-break space (French). Not "1.000": as a decimal point, that is 1.
_GROUPED = re.compile(r"[0-9]{1,3}([,' \u00a0\u202f])[0-9]{3}(?:\1[0-9]{3}){0,8}")

# A price in major units as spreadsheets show it, in ASCII digits: the whole part alone or
# grouped by thousands ("1,299.00", "1.299,00", "1 299,00"), then its decimals after a point
# or a comma ("149.99", "149,99"), which must not be the mark that groups.
_MAJOR = re.compile(
    r"(?P<whole>[0-9]{1,15}"
    r"|[0-9]{1,3}(?P<group>[,.' \u00a0\u202f])[0-9]{3}(?:(?P=group)[0-9]{3}){0,4})"
    r"(?P<point>[.,])(?P<part>[0-9]+)"
)

_BY_EXPONENT = {
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
}
_TWO = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP "
    "BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR "
    "FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW "
    "KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN "
    "NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD "
    "SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UZS VED "
    "VES WST XCD XCG YER ZAR ZMW ZWG"
)

MINOR_UNITS: dict[str, int] = {code: 2 for code in _TWO.split()}
for _exp, _codes in _BY_EXPONENT.items():
    MINOR_UNITS.update(dict.fromkeys(_codes.split(), _exp))


def is_currency(code: str) -> bool:
    return code in MINOR_UNITS


def major(amount: int, currency: str) -> str:
    """``amount`` minor units as a person reads them, in the currency's own decimals:
    12900 EUR is "129.00", 1500 JPY "1,500", 12345 KWD "12.345"."""
    places = MINOR_UNITS.get(currency, 2)
    sign, units = ("-" if amount < 0 else ""), abs(amount)
    whole, part = divmod(units, 10**places)
    return f"{sign}{whole:,}" + (f".{part:0{places}d}" if places else "")


def bare_amount(value: object, currency: str) -> str:
    """The number of a price as a spreadsheet or a person shows it, without the currency's
    sign or code around it: "149.99" of "€149.99", "149,99 €" or "EUR 149.99"."""
    text = str(value).strip()
    if currency and text.upper().startswith(currency):
        text = text[len(currency) :]
    elif currency and text.upper().endswith(currency):
        text = text[: -len(currency)]
    text = text.strip()
    while text and unicodedata.category(text[0]) == "Sc":  # a currency sign: € $ £ ¥ ...
        text = text[1:].lstrip()
    while text and unicodedata.category(text[-1]) == "Sc":
        text = text[:-1].rstrip()
    return text


def in_minor_units(value: object, currency: str) -> int | None:
    """A price written in the currency's major units, as a spreadsheet shows it ("149.99",
    "149,99", "€149.99", "1.299,00" or 149.99 of EUR; "1,500" of JPY), in minor units (14999);
    None when it is not one: no decimals, more decimals than the currency has, one mark both
    grouping and separating the decimals, or no number at all."""
    if isinstance(value, bool):
        return None
    places = MINOR_UNITS.get(currency, 0)
    bare = bare_amount(value, currency)
    if not places:  # a yen is its own minor unit: only its thousands marks are in the way
        return int(re.sub("[^0-9]", "", bare)) if _GROUPED.fullmatch(bare) else None
    found = _MAJOR.fullmatch(bare)
    if found is None or len(found["part"]) > places or found["group"] == found["point"]:
        return None
    if not found["group"] and found["point"] == "," and len(found["part"]) == 3:
        return None  # "1,499": as likely the thousands of a whole price as a decimal comma
    return int(re.sub("[^0-9]", "", found["whole"]) + found["part"].ljust(places, "0"))


def price_hint(value: object, currency: str) -> str:
    """What an error refusing ``value`` as a price in ``currency``'s minor units can add:
    the amount in minor units of a price written in major units ("minor units: 149.99 EUR is
    14999"), or that a currency without decimals has no minor unit; "" when neither is known."""
    minor = in_minor_units(value, currency)
    if minor is not None and isinstance(value, float) and value.is_integer():
        # a program's float, as likely cents (12.99 * 100 is 1299.0) as a price in euros
        return f"an integer: {int(value)}, or {minor} if {value} {currency} was meant"
    if minor is not None:
        return f"minor units: {bare_amount(value, currency)} {currency} is {minor}"
    written = "" if isinstance(value, bool) else bare_amount(value, currency)
    if MINOR_UNITS.get(currency) == 0 and _MAJOR.fullmatch(written):  # "12.99" of JPY
        return (
            f"{currency} has no minor unit: a price in {currency} is a whole number of {currency}"
        )
    return ""


def ungrouped(text: str) -> str:
    """What an error says of a count written with thousands separators ("1,000"): the count
    without them; "" for any other text. Not for an amount: "1,499" of EUR is 149900 cents."""
    if not _GROUPED.fullmatch(text):
        return ""
    return f" (without its thousands separators: {re.sub('[^0-9]', '', text)})"
