"""Card number helpers: Luhn, masking, keyed hashing. Pure functions."""

from __future__ import annotations

import hmac


def luhn_valid(pan: str) -> bool:
    """True when ``pan`` is 12-19 digits and passes the Luhn (mod 10) check."""
    if not pan.isdigit() or not 12 <= len(pan) <= 19:
        return False
    total = 0
    for index, char in enumerate(reversed(pan)):
        digit = ord(char) - 48
        if index & 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def mask_pan(pan: str | None) -> str | None:
    """First 6 and last 4 digits, the rest as ``*`` (PCI DSS display rule)."""
    if not pan:
        return None
    if len(pan) < 11:
        return "*" * len(pan)
    return f"{pan[:6]}{'*' * (len(pan) - 10)}{pan[-4:]}"


def pan_digest(key: bytes, pan: str) -> str:
    """HMAC-SHA256 of the PAN under ``key``, hex: compares cards without storing them."""
    return hmac.digest(key, pan.encode("ascii"), "sha256").hex()


def pan_from_track2(track2: str) -> str | None:
    """The PAN part of track 2 equivalent data (DE35): digits before ``=`` or ``D``."""
    for separator in ("=", "D", "d"):
        if separator in track2:
            pan = track2.split(separator, 1)[0]
            return pan if pan.isdigit() else None
    return None
