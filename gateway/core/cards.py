"""Card number helpers: Luhn, masking, keyed hashing. Pure functions."""

from __future__ import annotations

import hmac
import re

_MASKED = re.compile(r"[0-9]{6}\*{1,9}[0-9]{4}")
#: what each digit adds when the Luhn algorithm doubles it (2 x 7 = 14 -> 1 + 4 = 5)
_DOUBLED = str.maketrans("0123456789", "0246813579")


def luhn_checksum_ok(digits: str) -> bool:
    """True when an all-ASCII-digit string passes the Luhn (mod 10) check (any length).

    Every second digit from the right is replaced by what it adds when doubled, then the ASCII codes
    are summed in C: no Python loop per digit.
    """
    if not digits.isascii():
        return False
    data = (digits[-1::-2] + digits[-2::-2].translate(_DOUBLED)).encode("ascii")
    return (sum(data) - 48 * len(data)) % 10 == 0


def luhn_valid(pan: str) -> bool:
    """True when ``pan`` is 12-19 ASCII digits and passes the Luhn (mod 10) check."""
    return pan.isdigit() and 12 <= len(pan) <= 19 and luhn_checksum_ok(pan)


def mask_pan(pan: str | None) -> str | None:
    """The PAN as it may be shown (PCI DSS): first 6 and last 4 digits, the rest as ``*``.

    A masked PAN passes unchanged; anything else that is not 11 or more ASCII digits is starred whole,
    so that no card data leaks through an unexpected format.
    """
    if pan is None:
        return None
    value = pan.strip()
    if _MASKED.fullmatch(value):
        return value
    if value.isdigit() and value.isascii() and len(value) >= 11:
        return f"{value[:6]}{'*' * (len(value) - 10)}{value[-4:]}"
    return "*" * len(value) or None


def keyed_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under ``key``."""
    return hmac.digest(key, data, "sha256")


def pan_digest(key: bytes, pan: str) -> str:
    """HMAC-SHA256 of the PAN under ``key``, hex: compares cards without storing them."""
    return keyed_sha256(key, pan.encode("ascii")).hex()


def pan_from_track2(track2: str) -> str | None:
    """The PAN part of track 2 equivalent data (DE35): digits before ``=`` or ``D``."""
    for separator in ("=", "D", "d"):
        if separator in track2:
            pan = track2.split(separator, 1)[0]
            return pan if pan.isdigit() else None
    return None
