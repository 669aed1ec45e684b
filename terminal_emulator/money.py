"""Amounts: the CLI takes major units (``12.34``), everything else works in integer minor units."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

__all__ = ["AmountError", "currency_exponent", "format_minor", "parse_major"]

# ISO 4217 numeric codes whose minor unit is not 2 digits (the common ones).
_EXPONENTS: dict[str, int] = {
    "392": 0,  # JPY
    "410": 0,  # KRW
    "704": 0,  # VND
    "152": 0,  # CLP
    "352": 0,  # ISK
    "952": 0,  # XOF
    "950": 0,  # XAF
    "048": 3,  # BHD
    "368": 3,  # IQD
    "400": 3,  # JOD
    "414": 3,  # KWD
    "434": 3,  # LYD
    "512": 3,  # OMR
    "788": 3,  # TND
}


class AmountError(ValueError):
    """An amount that cannot be expressed in the currency's minor units."""


def currency_exponent(currency: str) -> int:
    """Number of minor-unit digits for an ISO 4217 numeric currency (2 unless known otherwise)."""
    return _EXPONENTS.get(currency, 2)


def parse_major(text: str, currency: str = "840") -> int:
    """``"12.34"`` in USD -> ``1234``. Refuses negatives and more decimals than the currency has."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise AmountError(f"not an amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise AmountError(f"not a valid amount: {text!r}")
    exponent = currency_exponent(currency)
    minor = value.scaleb(exponent)
    if minor != minor.to_integral_value():
        raise AmountError(f"{text!r} has more than {exponent} decimals for currency {currency}")
    result = int(minor)
    if result >= 10**12:
        raise AmountError(f"{text!r} does not fit 12 digits")
    return result


def format_minor(amount: int, currency: str = "840") -> str:
    """``1234`` in USD -> ``"12.34"``."""
    exponent = currency_exponent(currency)
    if exponent == 0:
        return str(amount)
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), 10**exponent)
    return f"{sign}{whole}.{frac:0{exponent}d}"
