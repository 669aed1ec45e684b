"""Request builders of the iso87 dialect."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from terminal_emulator import messages
from terminal_emulator.messages import Stamp, response_mti

ST = Stamp(stan="000042", transmitted="1122103015", local_time="113015", local_date="1122")
COMMON: dict[str, Any] = {"tid": "TERM0001", "mid": "MERCHANT0000001", "pan": "4761739001010119", "currency": "840"}


def test_de7_is_utc_and_de12_de13_are_local_time() -> None:
    now = datetime(2026, 11, 22, 10, 30, 15, tzinfo=timezone(timedelta(hours=1)))
    st = messages.stamp(7, now)
    assert st.stan == "000007"
    assert st.transmitted == "1122093015"
    local = now.astimezone()
    assert st.local_time == local.strftime("%H%M%S")
    assert st.local_date == local.strftime("%m%d")


def test_a_sale_carries_the_fields_the_dialect_requires() -> None:
    sale = messages.purchase(ST, amount=1234, **COMMON)
    assert sale.mti == "0200"
    assert sorted(sale.fields) == [2, 3, 4, 7, 11, 12, 13, 41, 42, 49]
    assert sale.fields[3] == "000000"
    assert sale.fields[4] == "000000001234"


def test_a_void_refers_to_the_original_rrn_with_processing_code_020000() -> None:
    void = messages.void(ST, amount=1234, original_rrn="000000000007", **COMMON)
    assert (void.mti, void.fields[3], void.fields[37]) == ("0200", "020000", "000000000007")


def test_a_refund_without_a_reference_carries_neither_de37_nor_de90() -> None:
    refund = messages.refund(ST, amount=100, **COMMON)
    assert refund.fields[3] == "200000"
    assert 37 not in refund.fields
    assert 90 not in refund.fields


def test_a_completion_points_at_the_preauth_with_de90_and_its_approval_code() -> None:
    done = messages.completion(ST, amount=100, approval_code="A1B2C3", original=("0100", "000007", "1122093000"),
                               **COMMON)
    assert done.mti == "0220"
    assert done.fields[90] == "0100" + "000007" + "1122093000" + "0" * 22
    assert done.fields[38] == "A1B2C3"


def test_a_partial_reversal_sends_the_remaining_amount_in_de95() -> None:
    rev = messages.reversal(ST, tid="T", mid="M", pan=None, processing_code="000000", amount=1000, currency="840",
                            original=("0200", "000001", "1122093000"), partial_amount=600)
    assert rev.mti == "0400"
    assert rev.fields[95] == "000000000600" + "0" * 30
    assert 2 not in rev.fields
    advice = messages.reversal(ST, tid="T", mid="M", pan="4761739001010119", processing_code="200000",
                               amount=1, currency="840", original=("0200", "000001", "1122093000"), advice=True)
    assert advice.mti == "0420"
    assert advice.fields[3] == "200000"


def test_settlement_puts_credits_in_74_86_and_debits_in_76_88() -> None:
    settle = messages.settlement(ST, tid="T", mid="M", currency="840",
                                 totals=messages.Totals(credits_count=1, credits_amount=234, debits_count=2,
                                                        debits_amount=5734))
    assert settle.mti == "0500"
    assert settle.fields[3] == "920000"
    assert (settle.fields[74], settle.fields[86]) == ("0000000001", "0000000000000234")
    assert (settle.fields[76], settle.fields[88]) == ("0000000002", "0000000000005734")


def test_an_echo_is_0800_with_de70_301() -> None:
    echo = messages.echo(messages.stamp(1, datetime.now(UTC)), tid="T", mid="M")
    assert (echo.mti, echo.fields[70]) == ("0800", "301")


def test_responses_are_the_request_class_plus_ten_and_repeats_answer_as_the_base() -> None:
    assert response_mti("0200") == "0210"
    assert response_mti("0401") == "0410"
    assert response_mti("0421") == "0430"
    assert response_mti("0800") == "0810"
