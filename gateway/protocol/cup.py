"""The ``cup`` dialect: UnionPay-style POS terminals (profile ``cup-pos``, docs/profiles.md).

A request is named by its MTI, processing code (DE3) and transaction type (DE60.1), with the condition
code (DE25) checked against them; a correction points at its original through DE37 (RRN), DE38
(approval code) or DE61 (original batch, trace and date). DE60.2 is the terminal's batch number,
DE60.3 a network management code. Settlement totals travel in DE48 and the answer's reconciliation
result is a digit in DE48, not a response code.

Pure, like :mod:`gateway.protocol.iso87`: a :class:`Message` in, a :class:`Request` out (or
:class:`DialectError`, answered 30, or :class:`UnsupportedMessage`, answered 40), and the answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.core.model import Kind, Reference, Request, SettlementTotals, UploadLine
from gateway.protocol.dialect import AnswerFacts, Dialect, DialectError, FunctionDialect, UnsupportedMessage
from gateway.protocol.fields import amount, card_number, expiry
from gateway.protocol.iso87 import response_mti
from gateway.protocol.message import Message


@dataclass(frozen=True, slots=True)
class Transaction:
    """A row of the UnionPay transaction table: what one MTI + DE3 + DE60.1 means."""

    name: str
    kind: Kind
    condition: str  #: DE25: 00 for the sale family, 06 for the pre-authorisation family
    #: how it names its original: "rrn" (DE37, else the trace in DE61.2), "approval" (DE38) or "" (none)
    by: str = ""
    #: for a void: the only kind of original it may void (a sale void cannot void a pre-auth)
    voids: Kind | None = None


#: (MTI class, DE3, DE60.1) -> the transaction (docs/profiles.md "cup-pos" keeps the same table)
TRANSACTIONS: dict[tuple[str, str, str], Transaction] = {
    ("020", "000000", "22"): Transaction("purchase", Kind.PURCHASE, "00"),
    ("020", "200000", "23"): Transaction("void", Kind.VOID, "00", "rrn", Kind.PURCHASE),
    ("022", "200000", "25"): Transaction("refund", Kind.REFUND, "00", "rrn"),
    ("010", "030000", "10"): Transaction("preauth", Kind.PREAUTH, "06"),
    ("010", "200000", "11"): Transaction("preauth void", Kind.VOID, "06", "approval", Kind.PREAUTH),
    ("020", "000000", "20"): Transaction("completion", Kind.COMPLETION, "06", "approval"),
    ("022", "000000", "24"): Transaction("completion advice", Kind.COMPLETION, "06", "approval"),
    ("020", "200000", "21"): Transaction("completion void", Kind.VOID, "06", "rrn", Kind.COMPLETION),
}
#: a reversal repeats its original's DE3 and DE60: (DE3, DE60.1) -> the transaction it reverses
_REVERSED = {(code, kind): txn for (_, code, kind), txn in TRANSACTIONS.items()}
_REVERSAL_CLASSES = frozenset({"040", "042"})
#: DE60.3 of a sign-on: 001 single-DES keys, 003 double-length keys, 004 with a track-data key
SIGN_ON_CODES = frozenset({"001", "003", "004"})
#: DE60.3 of an echo test (回响测试, 0820): answered 00 at once, as iso87's 0800 echo
ECHO_CODE = "301"
#: DE60.3 of a settlement (批结算) and of a batch upload's lines (批上送)
SETTLEMENT_CODE = "201"
#: DE60.3 of the end of a batch upload (批上送结束)
UPLOAD_END_CODES = frozenset({"202", "207"})

_FINANCIAL = (3, 4, 11, 25, 41, 42, 49, 60)
#: fields every request of a kind must carry (the PAN, DE2 or DE35, is checked separately)
REQUIRED_FIELDS: dict[Kind, tuple[int, ...]] = {
    Kind.NETWORK: (11, 41, 42, 60),
    Kind.PREAUTH: _FINANCIAL,
    Kind.PURCHASE: _FINANCIAL,
    Kind.COMPLETION: _FINANCIAL,
    Kind.VOID: _FINANCIAL,
    Kind.REFUND: _FINANCIAL,
    #: DE4 finds the original (the same amount, design §5)
    Kind.REVERSAL: (3, 4, 11, 41, 42, 60),
    Kind.SETTLEMENT: (11, 41, 42, 48, 60),
    Kind.BATCH_UPLOAD: (11, 41, 42, 60),
}
_NEEDS_PAN = frozenset({Kind.PREAUTH, Kind.PURCHASE, Kind.COMPLETION, Kind.VOID, Kind.REFUND})
#: track 2's separator in an id: "=", or the BCD nibble D between digits (a terminal id may hold a letter D)
_TRACK_SEPARATOR = re.compile(r"=|[0-9][Dd][0-9]")


def _private(fields: Mapping[int, str]) -> tuple[str, str, str]:
    """DE60 as (60.1 transaction type, 60.2 batch number, 60.3 network management code)."""
    value = fields.get(60)
    if not value:
        raise DialectError("missing", 60)
    if len(value) < 8:
        raise DialectError("must hold 60.1 and 60.2 (8 digits)", 60)
    return value[:2], value[2:8], value[8:11]


def _kind(mti: str, fields: Mapping[int, str]) -> tuple[Kind, Transaction | None]:
    mti_class = mti[:3]
    processing_code = fields.get(3, "")
    if mti_class not in {"010", "020", "022", "032", "040", "042", "050", "080", "082"}:
        raise UnsupportedMessage(f"MTI {mti}")
    txn_type, _, network_code = _private(fields)
    if mti_class == "080":
        if txn_type == "00" and network_code in SIGN_ON_CODES:
            return Kind.NETWORK, None
        raise UnsupportedMessage(f"network management {txn_type}/{network_code}")
    if mti_class == "082":
        if network_code == ECHO_CODE:
            return Kind.NETWORK, None
        raise UnsupportedMessage(f"0820 with 60.3 {network_code}")
    if mti_class == "050":
        if network_code == SETTLEMENT_CODE:
            return Kind.SETTLEMENT, None
        raise UnsupportedMessage(f"0500 with 60.3 {network_code}")
    if mti_class == "032":
        if network_code == SETTLEMENT_CODE or network_code in UPLOAD_END_CODES:
            return Kind.BATCH_UPLOAD, None
        raise UnsupportedMessage(f"0320 with 60.3 {network_code}")
    if 3 not in fields:
        raise DialectError("missing", 3)
    if mti_class in _REVERSAL_CLASSES:
        reversed_txn = _REVERSED.get((processing_code, txn_type))
        if reversed_txn is None:
            raise UnsupportedMessage(f"reversal of {processing_code}/{txn_type}")
        return Kind.REVERSAL, reversed_txn
    found = TRANSACTIONS.get((mti_class, processing_code, txn_type))
    if found is None:  # balance inquiry, offline sale, instalments, ...: function not supported (40)
        raise UnsupportedMessage(f"MTI {mti} {processing_code}/{txn_type}")
    return found.kind, found


def classify(message: Message) -> Request:
    """Turn a decoded request into a typed :class:`Request`."""
    mti = message.mti
    fields = message.fields
    if response_mti(mti) is None:
        raise UnsupportedMessage(f"MTI {mti} is not a request")
    kind, txn = _kind(mti, fields)
    for number in REQUIRED_FIELDS[kind]:
        if not fields.get(number):
            raise DialectError("missing", number)
    if txn is not None and kind is not Kind.REVERSAL and fields[25] != txn.condition:
        raise DialectError(f"condition code must be {txn.condition} for a {txn.name}", 25)
    pan = card_number(fields, required=kind in _NEEDS_PAN, track_separator=_TRACK_SEPARATOR)
    _, batch_no, network_code = _private(fields)
    uploading = kind is Kind.BATCH_UPLOAD and network_code == SETTLEMENT_CODE
    return Request(
        kind=kind,
        mti=mti,
        processing_code=fields.get(3, ""),
        stan=fields.get(11, ""),
        transmission_time="",  # UnionPay terminals send no DE7: the ledger keeps the time of receipt
        merchant_id=fields.get(42, "").strip(),
        terminal_id=fields.get(41, "").strip(),
        amount=amount(fields.get(4), 4),
        currency=fields.get(49),
        pan=pan,
        expiry=expiry(fields),
        reference=_reference(kind, txn, fields),
        network_code=network_code or None,
        totals=settlement_totals(fields[48]) if kind is Kind.SETTLEMENT else None,
        terminal_batch=batch_no,
        assigns_batch=kind is Kind.NETWORK and mti[:3] == "080",  # a sign-on: its answer names the batch to use
        uploads=upload_lines(fields.get(48, "")) if uploading else (),
        upload_complete=kind is Kind.BATCH_UPLOAD and not uploading,
    )


def _reference(kind: Kind, txn: Transaction | None, fields: Mapping[int, str]) -> Reference | None:
    if kind is Kind.REVERSAL:
        # a 0400 repeats its original's DE11: this terminal's request with that trace and amount, lately
        return Reference(same_stan=True)
    if txn is None or not txn.by:
        return None
    expects = frozenset({txn.voids}) if txn.voids is not None else None
    if txn.by == "approval":
        de38 = fields.get(38, "").strip()
        return Reference(approval_code=de38, expects=expects) if de38 else None
    de37 = fields.get(37, "").strip()
    if de37:
        return Reference(rrn=de37, expects=expects)
    trace = _original_trace(fields.get(61))
    if kind is Kind.VOID and trace is not None:
        # no RRN: the original trace (61.2) of this terminal, within the duplicate window
        return Reference(stan=trace, expects=expects)
    return None  # a refund without DE37: unreferenced (allowed per terminal only)


def _original_trace(value: str | None) -> str | None:
    """DE61.2, the original's trace number, when DE61 carries one (61.1 batch n6, 61.2 trace n6)."""
    if value is None or len(value) < 12:
        return None
    trace = value[6:12]
    return trace if trace.strip("0") else None


_TOTALS_DIGITS = 31  #: debit amount n12, count n3, credit amount n12, count n3, result n1


def settlement_totals(value: str) -> SettlementTotals:
    """DE48 of a 0500: domestic totals, then (optional) foreign-card totals; the gateway does not know
    which network a card belongs to, so it compares their sums with the ledger's."""
    if len(value) not in (_TOTALS_DIGITS, 2 * _TOTALS_DIGITS):
        raise DialectError("settlement totals must be 31 or 62 digits", 48)
    debit_amount = debit_count = credit_amount = credit_count = 0
    for start in range(0, len(value), _TOTALS_DIGITS):
        part = value[start:start + _TOTALS_DIGITS]
        debit_amount += int(part[0:12])
        debit_count += int(part[12:15])
        credit_amount += int(part[15:27])
        credit_count += int(part[27:30])
    return SettlementTotals(credit_count, credit_amount, debit_count, debit_amount)


#: one line of a batch upload's DE48: card organisation n2, trace n6, card number n20 (the PAN left-aligned,
#: filled with zeros), amount n12; the field starts with the number of lines, n2 (at most 8)
_LINE_DIGITS = 40


def upload_lines(value: str) -> tuple[UploadLine, ...]:
    """The lines of a batch upload (0320, 60.3 = 201)."""
    count = int(value[:2]) if value[:2].isdigit() else 0
    if not 1 <= count <= 8 or len(value) != 2 + count * _LINE_DIGITS:
        raise DialectError("batch upload lines must be n2 count + 40 digits each (1 to 8)", 48)
    lines = []
    for start in range(2, len(value), _LINE_DIGITS):
        line = value[start:start + _LINE_DIGITS]
        card = line[8:28]
        if card.startswith("0") or not card.endswith("0") or len(card.rstrip("0")) < 2:
            # a PAN starts with its industry identifier (1-9) and has at most 19 digits
            raise DialectError("a batch upload line's card number must be a PAN filled with zeros to 20", 48)
        lines.append(UploadLine(line[2:8], int(line[28:40]), card))
    return tuple(lines)


#: the reconciliation result digit of a 0510's DE48, by the decision's reason (1 balanced, 2 not balanced)
RESULT_DIGITS = {"approved": "1", "settlement_mismatch": "2"}
#: anything else the gateway answers a settlement with (a refused terminal, a ledger failure)
RESULT_ERROR = "3"


def _settlement_result(totals: str, reason: str | None) -> str:
    digit = RESULT_DIGITS.get(reason or "", RESULT_ERROR)
    answer = totals[:30] + digit + totals[31:]
    foreign = answer[_TOTALS_DIGITS:]
    if foreign.strip("0"):  # foreign-card totals sent: the same comparison answered them
        answer = answer[:-1] + digit
    return answer


#: fields an answer copies from its request when present (DE60: see :func:`build_response`)
ECHO_FIELDS: tuple[int, ...] = (2, 3, 4, 11, 25, 41, 42, 49)


def build_response(
    request: Message,
    response_code: str,
    *,
    rrn: str | None = None,
    approval_code: str | None = None,
    facts: AnswerFacts | None = None,
) -> Message:
    """The answer to ``request``: MTI + 10, the echoed fields, the host's local time in DE12 / DE13,
    DE37 / DE38 / DE39, DE60 (60.1 + 60.2 for a transaction; all of it, with the batch to use, for a
    sign-on or settlement) and, for a settlement, its totals with the result digit in DE48."""
    mti = response_mti(request.mti)
    if mti is None:
        raise ValueError("not a request MTI")
    source = request.fields
    facts = facts or AnswerFacts()
    fields = {number: source[number] for number in ECHO_FIELDS if number in source}
    if facts.local_time is not None:
        fields[12] = facts.local_time.strftime("%H%M%S")
        fields[13] = facts.local_time.strftime("%m%d")
    if rrn is not None:
        fields[37] = rrn
    if approval_code is not None:
        fields[38] = approval_code
    fields[39] = response_code
    totals = source.get(48)
    if request.mti[:3] == "050" and totals is not None and len(totals) in (_TOTALS_DIGITS, 2 * _TOTALS_DIGITS):
        fields[48] = _settlement_result(totals, facts.reason)
    private = source.get(60)
    if private:
        fields[60] = _answer_private(request.mti, private, facts.batch_no)
    return Message(mti, dict(sorted(fields.items())))


def _answer_private(mti: str, private: str, batch_no: str | None) -> str:
    if mti[:3] in {"080", "082", "050", "032"}:
        if batch_no is not None and len(private) >= 8:
            return private[:2] + batch_no + private[8:]
        return private
    return private[:8]


DIALECT: Dialect = FunctionDialect("cup", response_mti, classify, build_response)
