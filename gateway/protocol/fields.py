"""Checks of data elements that every dialect makes the same way: the card number (DE2 or DE35), card
data slid into the terminal and merchant ids (DE41, DE42), amounts and the expiry date.

Pure. Each failure is a :class:`~gateway.protocol.dialect.DialectError` naming the field, never its value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gateway.core.cards import pan_from_track2
from gateway.protocol.dialect import DialectError

#: digits of the card number an id may share with it by chance (8: about one numeric id in a million)
_CARD_FRAGMENT = 8
#: track 2's field separator as ISO 8583 text carries it
TRACK_SEPARATOR_EQUALS = re.compile("=")


_DIGIT_RUN = re.compile(f"[0-9]{{{_CARD_FRAGMENT}}}")


def holds_card_digits(value: str, pan: str) -> bool:
    """Whether ``value`` holds 8 or more consecutive digits of ``pan``."""
    if not _DIGIT_RUN.search(value):  # most ids: no 8 digits in a row at all
        return False
    return any(pan[start:start + _CARD_FRAGMENT] in value for start in range(len(pan) - _CARD_FRAGMENT + 1))


def card_number(
    fields: Mapping[int, str], *, required: bool, track_separator: re.Pattern[str] = TRACK_SEPARATOR_EQUALS
) -> str | None:
    """The request's PAN (DE2, else the PAN part of DE35), once DE41 and DE42 are shown to hold no card data;
    ``required``: a request of a kind that needs one.

    ``track_separator`` finds track 2's field separator in an id (``=`` in ISO text; BCD profiles also
    carry it as the nibble ``D``): card data slid into an id (a shifted bitmap, a bad terminal set-up)
    must not be recorded, published or logged as a terminal or merchant.
    """
    for number in (41, 42):
        if track_separator.search(fields.get(number, "")):
            raise DialectError("holds track data ('=')", number)
    pan = fields.get(2)
    if pan is None and 35 in fields:
        pan = pan_from_track2(fields[35])
        if pan is None:
            raise DialectError("track 2 without a PAN", 35)
    if pan is not None:
        for number in (41, 42):
            if holds_card_digits(fields.get(number, ""), pan):
                raise DialectError("holds card data", number)
    if required and not pan:
        raise DialectError("missing (needs DE2 or DE35)", 2)
    if pan is not None and not (pan.isdigit() and 12 <= len(pan) <= 19):
        raise DialectError("PAN must be 12-19 digits", 2)
    return pan


def amount(value: str | None, field: int) -> int | None:
    """A numeric amount in minor units, or None when the field is absent."""
    if value is None:
        return None
    if not value.isdigit():
        raise DialectError("amount must be digits", field)
    return int(value)


def expiry(fields: Mapping[int, str]) -> str | None:
    """DE14 (YYMM) when sent."""
    value = fields.get(14)
    if value is not None and (len(value) != 4 or not value.isdigit() or not 1 <= int(value[2:]) <= 12):
        raise DialectError("expiry must be YYMM", 14)
    return value
