"""The ``iso87`` dialect: what a decoded message means and how it is answered (design section 4).

Pure: a :class:`~gateway.protocol.message.Message` in, a classified
:class:`~gateway.core.model.Request` out (or :class:`DialectError`, answered with 30), and the
response message built from the request and the decision. :data:`DIALECT` is what
:func:`gateway.protocol.dialect.dialect_for` gives a profile naming ``iso87``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Final

from gateway.core.cards import pan_from_track2
from gateway.core.model import Kind, Reference, Request, SettlementTotals
from gateway.protocol.dialect import Dialect, DialectError, UnsupportedMessage
from gateway.protocol.message import Message

#: fields a response copies from its request when present
ECHO_FIELDS: tuple[int, ...] = (3, 4, 7, 11, 12, 13, 41, 42, 49, 70, 90)
_ECHO_BELOW_37 = tuple(number for number in ECHO_FIELDS if number < 37)
_ECHO_ABOVE_39 = tuple(number for number in ECHO_FIELDS if number > 39)

_BY_MTI_AND_PURPOSE: dict[tuple[str, str], Kind] = {
    ("010", "00"): Kind.PREAUTH,
    ("020", "00"): Kind.PURCHASE,
    ("020", "02"): Kind.VOID,
    ("020", "20"): Kind.REFUND,
    ("022", "00"): Kind.COMPLETION,
    ("050", "92"): Kind.SETTLEMENT,
}
_REVERSAL_CLASSES = frozenset({"040", "042"})
_NETWORK_CLASSES = frozenset({"080"})
#: fields every request of a kind must carry (the PAN, DE2 or DE35, is checked separately). DE7 is not
#: among them: many terminals never send it (the ledger keeps the time of receipt); when sent it is
#: echoed, and a reversal's DE90 may quote it. docs/profiles.md lists the same (a test keeps them equal).
REQUIRED_FIELDS: dict[Kind, tuple[int, ...]] = {
    Kind.NETWORK: (11, 70),
    Kind.PREAUTH: (3, 4, 11, 41, 42, 49),
    Kind.PURCHASE: (3, 4, 11, 41, 42, 49),
    Kind.COMPLETION: (3, 4, 11, 41, 42, 49),
    Kind.VOID: (3, 4, 11, 41, 42, 49),
    Kind.REFUND: (3, 4, 11, 41, 42, 49),
    Kind.REVERSAL: (3, 11, 41, 42),
    Kind.SETTLEMENT: (3, 11, 41, 42, 74, 76, 86, 88),
}
_NEEDS_PAN = frozenset({Kind.PREAUTH, Kind.PURCHASE, Kind.COMPLETION, Kind.VOID, Kind.REFUND})
#: the kinds that point at an original (see :func:`_reference`)
_REFERENCING = frozenset({Kind.VOID, Kind.REFUND, Kind.COMPLETION, Kind.REVERSAL})


@functools.lru_cache(maxsize=256)
def response_mti(mti: str) -> str | None:
    """The MTI of the answer (0200 -> 0210, 0421 -> 0430), or None when ``mti`` is not a request.

    Cached: it is asked three times per request, and there are only a few dozen MTIs.
    """
    if len(mti) != 4 or not mti.isdigit() or int(mti[2]) % 2 == 1:
        return None
    return f"{mti[:2]}{int(mti[2]) + 1}0"


def classify(message: Message) -> Request:
    """Turn a decoded request into a typed :class:`Request`."""
    mti = message.mti
    fields = message.fields
    mti_class = mti[:3]
    if response_mti(mti) is None:
        raise UnsupportedMessage(f"MTI {mti} is not a request")
    processing_code = fields.get(3, "")
    if mti_class in _NETWORK_CLASSES:
        kind = Kind.NETWORK
    elif mti_class in _REVERSAL_CLASSES:
        kind = Kind.REVERSAL
    else:
        found = _BY_MTI_AND_PURPOSE.get((mti_class, processing_code[:2]))
        if found is None:
            if 3 not in fields and mti_class in {"010", "020", "022", "050"}:
                raise DialectError("missing", 3)
            raise UnsupportedMessage(f"MTI {mti} with processing code {processing_code[:2]!r}")
        kind = found
    for number in REQUIRED_FIELDS[kind]:
        if not fields.get(number):
            raise DialectError("missing", number)
    for number in (41, 42):
        if "=" in fields.get(number, ""):
            # track 2's field separator: card data slid into an id (a shifted bitmap); it must not be
            # recorded or published as a terminal or merchant
            raise DialectError("holds track data ('=')", number)
    pan = fields.get(2)
    if pan is None and 35 in fields:
        pan = pan_from_track2(fields[35])
        if pan is None:
            raise DialectError("track 2 without a PAN", 35)
    if pan is not None:
        for number in (41, 42):
            if holds_card_digits(fields.get(number, ""), pan):
                # part of the request's own card number in an id (a shifted bitmap, a bad terminal set-up):
                # it must not be recorded, published or logged as a terminal or merchant
                raise DialectError("holds card data", number)
    if kind in _NEEDS_PAN and not pan:
        raise DialectError("missing (needs DE2 or DE35)", 2)
    if pan is not None and not (pan.isdigit() and 12 <= len(pan) <= 19):
        raise DialectError("PAN must be 12-19 digits", 2)
    expiry = fields.get(14)
    if expiry is not None and (len(expiry) != 4 or not expiry.isdigit() or not 1 <= int(expiry[2:]) <= 12):
        raise DialectError("expiry must be YYMM", 14)
    return Request(
        kind=kind,
        mti=mti,
        processing_code=processing_code,
        stan=fields.get(11, ""),
        transmission_time=fields.get(7, ""),  # "" when not sent
        merchant_id=fields.get(42, "").strip(),
        terminal_id=fields.get(41, "").strip(),
        amount=_amount(fields.get(4), 4),
        currency=fields.get(49),
        pan=pan,
        expiry=expiry,
        reference=_reference(kind, fields),
        replacement_amount=_replacement(fields.get(95)),
        network_code=fields.get(70),
        totals=_totals(fields) if kind is Kind.SETTLEMENT else None,
        original_data=fields.get(90),
    )


#: digits of the card number an id may share with it by chance (8: about one numeric id in a million)
_CARD_FRAGMENT = 8


_DIGIT_RUN: Final = re.compile(f"[0-9]{{{_CARD_FRAGMENT}}}")


def holds_card_digits(value: str, pan: str) -> bool:
    """Whether ``value`` holds 8 or more consecutive digits of ``pan``."""
    if not _DIGIT_RUN.search(value):  # most ids: no 8 digits in a row at all
        return False
    return any(pan[start:start + _CARD_FRAGMENT] in value for start in range(len(pan) - _CARD_FRAGMENT + 1))


def _amount(value: str | None, field: int) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise DialectError("amount must be digits", field)
    return int(value)


def _original_data(value: str) -> Reference:
    if len(value) != 42 or not value.isdigit():
        raise DialectError("original data elements must be 42 digits", 90)
    return Reference(mti=value[:4], stan=value[4:10], transmission_time=value[10:20])


def _reference(kind: Kind, fields: Mapping[int, str]) -> Reference | None:
    if kind not in _REFERENCING:
        return None
    de90 = fields.get(90)
    de37 = fields.get(37)
    if kind is Kind.VOID:
        if de90:
            return _original_data(de90)
        return Reference(rrn=de37) if de37 else None
    if kind is Kind.REFUND:
        if de37:
            return Reference(rrn=de37)
        return _original_data(de90) if de90 else None
    if kind is Kind.COMPLETION:
        if de90:
            return _original_data(de90)
        de38 = fields.get(38)
        return Reference(approval_code=de38) if de38 else None
    if kind is Kind.REVERSAL:
        return _original_data(de90) if de90 else Reference(same_stan=True)
    return None


def _replacement(value: str | None) -> int | None:
    if value is None:
        return None
    if len(value) < 12 or not value[:12].isdigit():
        raise DialectError("replacement amounts must start with 12 digits", 95)
    return int(value[:12])


def _totals(fields: Mapping[int, str]) -> SettlementTotals:
    return SettlementTotals(
        credit_count=_amount(fields.get(74), 74) or 0,
        credit_amount=_amount(fields.get(86), 86) or 0,
        debit_count=_amount(fields.get(76), 76) or 0,
        debit_amount=_amount(fields.get(88), 88) or 0,
    )


def build_response(
    request: Message,
    response_code: str,
    *,
    rrn: str | None = None,
    approval_code: str | None = None,
) -> Message:
    """The answer to ``request``: MTI + 10, echoed fields, DE37 / DE38 / DE39."""
    mti = response_mti(request.mti)
    if mti is None:
        raise ValueError("not a request MTI")
    source = request.fields
    # built in field-number order: the echoed fields below 37, then 37-39, then the echoed rest
    fields = {number: source[number] for number in _ECHO_BELOW_37 if number in source}
    if rrn is not None:
        fields[37] = rrn
    if approval_code is not None:
        fields[38] = approval_code
    fields[39] = response_code
    for number in _ECHO_ABOVE_39:
        if number in source:
            fields[number] = source[number]
    return Message(mti, fields)


class Iso87:
    """The ``iso87`` dialect as :class:`gateway.protocol.dialect.Dialect` (this module's functions)."""

    name = "iso87"
    response_mti = staticmethod(response_mti)
    classify = staticmethod(classify)
    build_response = staticmethod(build_response)


DIALECT: Dialect = Iso87()
