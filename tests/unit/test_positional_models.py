"""The request and the records the hot path builds with positional arguments hold each value in its field.

``dialect.classify`` builds a :class:`Request`, ``engine._record`` and ``ledger_rows.txn_from_row`` a
:class:`Txn` positionally (keyword arguments cost CPython 3.11 about 1 µs more per call to match): two
values swapped between fields of the same type would pass mypy, so every value here is distinct and
compared with a model built by keyword.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from gateway.adapters.ledger_rows import TXN_COLUMNS, record_values, txn_from_row
from gateway.core.decide import Decision
from gateway.core.engine import Context, _record
from gateway.core.model import Batch, BatchState, Kind, Reference, Request, Txn, TxnStatus
from gateway.core.policy import Policy
from gateway.core.reasons import Reason
from gateway.protocol.dialect import classify
from gateway.protocol.message import Message

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
PAN = "4761739001010119"


def test_classify_puts_each_data_element_in_its_field() -> None:
    message = Message(
        "0200",
        {2: PAN, 3: "200000", 4: "000000001234", 7: "1129120000", 11: "000042", 14: "3012", 37: "000000000777",
         41: "TERM0001", 42: "MERCHANT0000001", 49: "840", 90: "0200000041112911595900000000000000000000000"[:42]},
    )  # fmt: skip
    expected = Request(
        kind=Kind.REFUND,
        mti="0200",
        processing_code="200000",
        stan="000042",
        transmission_time="1129120000",
        merchant_id="MERCHANT0000001",
        terminal_id="TERM0001",
        amount=1234,
        currency="840",
        pan=PAN,
        expiry="3012",
        reference=Reference(rrn="000000000777"),
        replacement_amount=None,
        network_code=None,
        totals=None,
        original_data=message.fields[90],
    )
    request = classify(message)
    assert request == expected
    assert request.masked_pan == "476173******0119"


def test_a_reversal_keeps_its_replacement_amount_and_network_fields_apart() -> None:
    message = Message(
        "0400",
        {2: PAN, 3: "000000", 4: "000000001000", 7: "1129120000", 11: "000043", 41: "TERM0001",
         42: "MERCHANT0000001", 49: "840", 70: "301", 95: "000000000400" + "0" * 30},
    )  # fmt: skip
    request = classify(message)
    assert (request.kind, request.replacement_amount, request.network_code) == (Kind.REVERSAL, 400, "301")
    assert request.reference == Reference(same_stan=True)


#: the record a partial refund of 12.34 makes, built by keyword: every value distinct from its neighbours'
REFUND_RECORD = Txn(
    id=0,
    kind=Kind.REFUND,
    mti="0200",
    processing_code="200000",
    merchant_id="MERCHANT0000001",
    terminal_id="TERM0001",
    stan="000042",
    transmission_time="1129120000",
    amount=1234,
    currency="840",
    pan_masked="476173******0119",
    pan_hmac="card-hmac",
    rrn="000000000900",
    approval_code="APPR02",
    response_code="00",
    reason=None,
    status=TxnStatus.APPROVED,
    effective_amount=1234,
    refunded_amount=0,
    completed=False,
    original_id=7,
    batch_id=11,
    created_at=NOW,
    fingerprint="print",
    reference=Reference(rrn="000000000777"),
)


def test_the_record_puts_each_value_in_its_field() -> None:
    request = Request(Kind.REFUND, "0200", "200000", "000042", "1129120000", "MERCHANT0000001", "TERM0001",
                      amount=1234, currency="840", pan=PAN, reference=Reference(rrn="000000000777"))  # fmt: skip
    original = replace(REFUND_RECORD, id=7, kind=Kind.PURCHASE, rrn="000000000777", original_id=None, batch_id=3)
    batch = Batch(id=11, merchant_id="MERCHANT0000001", terminal_id="TERM0001", batch_no="000001",
                  state=BatchState.OPEN, opened_at=NOW)  # fmt: skip
    ctx = Context(NOW, Policy(), b"key", lambda reason: "00")
    approved = _record(request, Decision(Reason.APPROVED), "00", "000000000900", "APPR02", "card-hmac", "print",
                       original, batch, ctx)  # fmt: skip
    assert approved == REFUND_RECORD
    declined = _record(request, Decision(Reason.EXCEEDS_REFUNDABLE), "13", None, None, None, "print", None, None, ctx)
    assert (declined.status, declined.reason) == (TxnStatus.DECLINED, "exceeds_refundable")
    assert declined.response_code == "13"
    assert (declined.original_id, declined.batch_id, declined.rrn, declined.pan_hmac) == (None, None, None, None)
    reversal = Request(Kind.REVERSAL, "0400", "000000", "000043", "1129120001", "MERCHANT0000001", "TERM0001")
    unmatched = _record(reversal, Decision(Reason.APPROVED, outcome="unmatched"), "00", None, None, None, "p",
                        None, None, ctx)  # fmt: skip
    assert (unmatched.status, unmatched.amount, unmatched.currency) == (TxnStatus.UNMATCHED, 0, "")


def test_a_record_read_back_from_a_row_puts_each_column_in_its_field() -> None:
    expected = replace(REFUND_RECORD, id=9, reason="why", status=TxnStatus.VOIDED, effective_amount=1200,
                       refunded_amount=34, completed=True, reversed_after_settlement=True)  # fmt: skip
    # the row as the table holds it, by column name: TXN_COLUMNS are those record_values fills
    row = {
        "id": 9,
        **dict(zip(TXN_COLUMNS, record_values(expected, 0), strict=True)),
        "completed": 1,
        "reversed_after_settlement": 1,
    }
    assert row["status"] == "voided" and row["ref_rrn"] == "000000000777" and row["reason"] == "why"
    assert txn_from_row(row, NOW) == expected
