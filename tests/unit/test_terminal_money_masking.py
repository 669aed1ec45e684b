"""Amounts in major units on the command line, minor units inside; PANs masked 6 + 4."""

from __future__ import annotations

import pytest

from terminal_emulator.masking import mask_pan, masked_fields
from terminal_emulator.money import AmountError, format_minor, parse_major


@pytest.mark.parametrize(("text", "currency", "minor"), [
    ("12.34", "840", 1234), ("12", "840", 1200), ("0.01", "978", 1), ("1500", "392", 1500), ("1.234", "048", 1234),
])
def test_major_units_become_integer_minor_units(text: str, currency: str, minor: int) -> None:
    assert parse_major(text, currency) == minor


@pytest.mark.parametrize("text", ["12.345", "-1", "abc", "1e20", "NaN"])
def test_amounts_the_currency_cannot_hold_are_refused(text: str) -> None:
    with pytest.raises(AmountError):
        parse_major(text, "840")


def test_a_yen_amount_with_decimals_is_refused() -> None:
    with pytest.raises(AmountError):
        parse_major("10.5", "392")


def test_minor_units_print_as_major_units() -> None:
    assert format_minor(1234, "840") == "12.34"
    assert format_minor(5, "840") == "0.05"
    assert format_minor(1500, "392") == "1500"


def test_a_pan_is_masked_to_its_first_six_and_last_four_digits() -> None:
    assert mask_pan("4761739001010119") == "476173******0119"
    assert mask_pan("5500005555555559123") == "550000*********9123"


def test_printed_fields_hold_no_pan_track_pin_or_emv_data() -> None:
    shown = masked_fields({2: "4761739001010119", 35: "4761739001010119=28122011758928889", 52: "0123456789ABCDEF",
                           55: "9F2608AABBCCDD", 4: "000000001234"})
    assert shown == {"2": "476173******0119", "4": "000000001234", "35": "476173******0119=****",
                     "52": "<redacted>", "55": "<redacted>"}
    assert "4761739001010119" not in repr(shown)


def test_the_pans_inside_a_unionpay_batch_upload_are_masked() -> None:
    from terminal_emulator.codec import IsoMessage

    entry = "0100000456" + "62596500123456710000" + "000000286050"
    upload = IsoMessage("0320", {11: "000458", 48: entry, 60: "00000123201"})
    shown = upload.masked()
    assert shown["48"] == "0100000456" + "625965**********0000" + "000000286050"
    assert "6259650012345671" not in repr(upload)
    settlement = IsoMessage("0500", {48: "0" * 62})
    assert settlement.masked()["48"] == "0" * 62  # totals are not card data
