"""Card data masking: a PAN is shown as its first 6 and last 4 digits, track/PIN/EMV data never."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["REDACTED_FIELDS", "mask_batch_upload", "mask_pan", "masked_fields"]

#: Data elements never shown at all: track 3 (36), track 1 (45), PIN block (52), EMV data (55).
REDACTED_FIELDS = frozenset({36, 45, 52, 55})


def mask_pan(pan: str) -> str:
    """``4761739001010119`` -> ``476173******0119`` (first 6 + last 4; shorter numbers keep last 4)."""
    if len(pan) >= 13:
        return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
    if len(pan) > 4:
        return "*" * (len(pan) - 4) + pan[-4:]
    return "*" * len(pan)


def mask_batch_upload(value: str) -> str:
    """Field 48 of a UnionPay batch upload (0320): count n2, then per transaction organisation n2,
    trace n6, PAN n20, amount n12; each PAN masked (first 6 + last 4 of its 20 digits)."""
    out = [value[:2]]
    for start in range(2, len(value), 40):
        entry = value[start : start + 40]
        out.append(entry[:8] + mask_pan(entry[8:28]) + entry[28:] if len(entry) == 40 else "*" * len(entry))
    return "".join(out)


def masked_fields(fields: Mapping[int, str], mti: str = "") -> dict[str, str]:
    """Fields keyed by text number, ordered, safe to print or store."""
    out: dict[str, str] = {}
    for number in sorted(fields):
        value = fields[number]
        if number == 48 and mti.startswith("032"):
            out["48"] = mask_batch_upload(value)
        elif number == 2:
            out["2"] = mask_pan(value)
        elif number == 35:
            pan = value.replace("D", "=").split("=", 1)[0]
            out["35"] = mask_pan(pan) + "=****"
        elif number in REDACTED_FIELDS:
            out[str(number)] = "<redacted>"
        else:
            out[str(number)] = value
    return out
