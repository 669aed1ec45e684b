"""Request builders for the ``iso87`` dialect (design section 4). Pure: time and STAN are passed in.

| request    | MTI            | DE3    | reference                                         |
|------------|----------------|--------|---------------------------------------------------|
| purchase   | 0200           | 000000 |                                                   |
| preauth    | 0100           | 000000 |                                                   |
| completion | 0220           | 000000 | DE90 (pre-auth MTI+STAN+DE7), DE38 approval code  |
| void       | 0200           | 020000 | DE37 original RRN                                 |
| refund     | 0200           | 200000 | DE37 original RRN (none: unreferenced)            |
| reversal   | 0400/0420 (+1) | orig.  | DE90, optional DE95 partial amount                |
| settlement | 0500           | 920000 | totals DE74/86 (credits), DE76/88 (debits)        |
| echo       | 0800           |        | DE70 301                                          |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from .codec import IsoMessage

__all__ = [
    "DEFAULT_PAN",
    "PROCESSING_CODES",
    "Stamp",
    "Totals",
    "TransactionKind",
    "completion",
    "echo",
    "original_data_elements",
    "preauth",
    "purchase",
    "refund",
    "replacement_amounts",
    "response_mti",
    "reversal",
    "settlement",
    "stamp",
    "void",
]

#: The built-in test card (Luhn-valid, public test number).
DEFAULT_PAN = "4761739001010119"

TransactionKind = str  # "purchase" | "preauth" | "completion" | "void" | "refund"

PROCESSING_CODES: Mapping[str, str] = {
    "purchase": "000000",
    "preauth": "000000",
    "completion": "000000",
    "void": "020000",
    "refund": "200000",
    "settlement": "920000",
}

REQUEST_MTIS: Mapping[str, str] = {
    "purchase": "0200",
    "preauth": "0100",
    "completion": "0220",
    "void": "0200",
    "refund": "0200",
}


@dataclass(frozen=True, slots=True)
class Stamp:
    """Per-request identity: STAN (DE11), transmission time (DE7, UTC) and local time (DE12/13)."""

    stan: str
    transmitted: str
    local_time: str
    local_date: str


@dataclass(frozen=True, slots=True)
class Totals:
    """Batch totals as the terminal counts them (amounts in minor units)."""

    credits_count: int = 0
    credits_amount: int = 0
    debits_count: int = 0
    debits_amount: int = 0


def stamp(stan: int, now: datetime) -> Stamp:
    """``now`` must be timezone-aware; DE7 is UTC, DE12/DE13 the terminal's local time."""
    utc = now.astimezone(UTC)
    local = now.astimezone()
    return Stamp(
        stan=f"{stan:06d}",
        transmitted=utc.strftime("%m%d%H%M%S"),
        local_time=local.strftime("%H%M%S"),
        local_date=local.strftime("%m%d"),
    )


def response_mti(request_mti: str) -> str:
    """``0200`` -> ``0210``; repeats answer with the base response (``0401`` -> ``0410``)."""
    return f"{request_mti[:2]}{int(request_mti[2]) + 1}0"


def original_data_elements(mti: str, stan: str, transmitted: str) -> str:
    """DE90: original MTI (4) + STAN (6) + DE7 (10) + acquirer id (11) + forwarding id (11), zeros."""
    return f"{mti}{stan}{transmitted}" + "0" * 22


def replacement_amounts(actual_amount: int) -> str:
    """DE95: the actual (remaining) transaction amount in the first 12 digits, the rest zeros."""
    return f"{actual_amount:012d}" + "0" * 30


def _financial(
    mti: str,
    processing_code: str,
    st: Stamp,
    *,
    tid: str,
    mid: str,
    pan: str,
    amount: int,
    currency: str,
    expiry: str | None = None,
    extra: Mapping[int, str] | None = None,
) -> IsoMessage:
    fields: dict[int, str] = {
        2: pan,
        3: processing_code,
        4: f"{amount:012d}",
        7: st.transmitted,
        11: st.stan,
        12: st.local_time,
        13: st.local_date,
        41: tid,
        42: mid,
        49: currency,
    }
    if expiry:
        fields[14] = expiry
    if extra:
        fields.update(extra)
    return IsoMessage(mti=mti, fields=dict(sorted(fields.items())))


def purchase(
    st: Stamp, *, tid: str, mid: str, pan: str, amount: int, currency: str, expiry: str | None = None
) -> IsoMessage:
    return _financial("0200", "000000", st, tid=tid, mid=mid, pan=pan, amount=amount, currency=currency,
                      expiry=expiry)


def preauth(
    st: Stamp, *, tid: str, mid: str, pan: str, amount: int, currency: str, expiry: str | None = None
) -> IsoMessage:
    return _financial("0100", "000000", st, tid=tid, mid=mid, pan=pan, amount=amount, currency=currency,
                      expiry=expiry)


def completion(
    st: Stamp,
    *,
    tid: str,
    mid: str,
    pan: str,
    amount: int,
    currency: str,
    approval_code: str | None,
    original: tuple[str, str, str] | None,
) -> IsoMessage:
    """``original`` = (pre-auth MTI, STAN, DE7) for DE90; ``approval_code`` goes in DE38."""
    extra: dict[int, str] = {}
    if original is not None:
        extra[90] = original_data_elements(*original)
    if approval_code:
        extra[38] = approval_code
    return _financial("0220", "000000", st, tid=tid, mid=mid, pan=pan, amount=amount, currency=currency,
                      extra=extra)


def void(
    st: Stamp, *, tid: str, mid: str, pan: str, amount: int, currency: str, original_rrn: str
) -> IsoMessage:
    return _financial("0200", "020000", st, tid=tid, mid=mid, pan=pan, amount=amount, currency=currency,
                      extra={37: original_rrn})


def refund(
    st: Stamp,
    *,
    tid: str,
    mid: str,
    pan: str,
    amount: int,
    currency: str,
    original_rrn: str | None = None,
    original: tuple[str, str, str] | None = None,
) -> IsoMessage:
    """Referenced by DE37 (``original_rrn``), or by DE90 (``original``), or unreferenced (neither)."""
    extra: dict[int, str] = {}
    if original_rrn:
        extra[37] = original_rrn
    elif original is not None:
        extra[90] = original_data_elements(*original)
    return _financial("0200", "200000", st, tid=tid, mid=mid, pan=pan, amount=amount, currency=currency,
                      extra=extra)


def reversal(
    st: Stamp,
    *,
    tid: str,
    mid: str,
    pan: str | None,
    processing_code: str,
    amount: int,
    currency: str,
    original: tuple[str, str, str],
    advice: bool = False,
    partial_amount: int | None = None,
) -> IsoMessage:
    """0400 (or 0420 advice) pointing at ``original`` (MTI, STAN, DE7) with DE90; DE95 if partial."""
    fields: dict[int, str] = {
        3: processing_code,
        4: f"{amount:012d}",
        7: st.transmitted,
        11: st.stan,
        12: st.local_time,
        13: st.local_date,
        41: tid,
        42: mid,
        49: currency,
        90: original_data_elements(*original),
    }
    if pan:
        fields[2] = pan
    if partial_amount is not None:
        fields[95] = replacement_amounts(partial_amount)
    return IsoMessage(mti="0420" if advice else "0400", fields=dict(sorted(fields.items())))


def settlement(st: Stamp, *, tid: str, mid: str, currency: str, totals: Totals) -> IsoMessage:
    fields: dict[int, str] = {
        3: "920000",
        7: st.transmitted,
        11: st.stan,
        41: tid,
        42: mid,
        49: currency,
        74: f"{totals.credits_count:010d}",
        76: f"{totals.debits_count:010d}",
        86: f"{totals.credits_amount:016d}",
        88: f"{totals.debits_amount:016d}",
    }
    return IsoMessage(mti="0500", fields=fields)


def echo(st: Stamp, *, tid: str, mid: str, code: str = "301") -> IsoMessage:
    """Network management: ``301`` echo, ``001`` sign-on, ``002`` sign-off."""
    return IsoMessage(mti="0800", fields={7: st.transmitted, 11: st.stan, 41: tid, 42: mid, 70: code})
