"""The terminal's journal: counters, batch totals, corrections and the pending reversal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from terminal_emulator.journal import Journal, JournalError, PendingReversal, TransactionRecord, load_journal
from terminal_emulator.messages import Totals


def _record(kind: str, stan: str, amount: int, *, rrn: str | None = None, batch: int = 1,
            original_rrn: str | None = None, original_stan: str | None = None) -> TransactionRecord:
    mti = {"preauth": "0100", "completion": "0220"}.get(kind, "0200")
    code = {"void": "020000", "refund": "200000"}.get(kind, "000000")
    return TransactionRecord(kind=kind, mti=mti, processing_code=code, stan=stan, transmitted="1122103015",
                             amount=amount, currency="840", masked_pan="476173******0119", batch=batch,
                             at="2026-11-22T10:30:15+00:00", rrn=rrn, original_rrn=original_rrn,
                             original_stan=original_stan)


def _approve(journal: Journal, record: TransactionRecord, rrn: str) -> None:
    journal.add(record)
    journal.record_response(record, "00", rrn, "A1B2C3")


def test_the_stan_counts_from_one_and_wraps_after_999999() -> None:
    journal = Journal()
    assert journal.next_stan() == 1
    journal.stan = 999_999
    assert journal.next_stan() == 1


def test_totals_count_approved_purchases_and_completions_as_debits_and_refunds_as_credits() -> None:
    journal = Journal()
    _approve(journal, _record("purchase", "000001", 1234), "R1")
    _approve(journal, _record("preauth", "000002", 5000), "R2")
    _approve(journal, _record("completion", "000003", 4500, original_rrn="R2"), "R3")
    _approve(journal, _record("refund", "000004", 234, original_rrn="R1"), "R4")
    declined = _record("purchase", "000005", 999)
    journal.add(declined)
    journal.record_response(declined, "14", "R5", None)
    assert journal.totals() == Totals(credits_count=1, credits_amount=234, debits_count=2, debits_amount=5734)


def test_a_voided_sale_leaves_the_totals_and_a_reversed_void_brings_it_back() -> None:
    journal = Journal()
    sale = _record("purchase", "000001", 800)
    _approve(journal, sale, "R1")
    void = _record("void", "000002", 800, original_rrn="R1")
    _approve(journal, void, "R2")
    assert sale.status == "voided"
    assert journal.totals() == Totals()
    journal.apply_reversal(void, None)
    assert sale.status == "approved"
    assert journal.totals().debits_amount == 800


def test_refunds_add_up_on_the_original_and_a_reversed_refund_gives_its_amount_back() -> None:
    journal = Journal()
    sale = _record("purchase", "000001", 1000)
    _approve(journal, sale, "R1")
    refund = _record("refund", "000002", 300, original_rrn="R1")
    _approve(journal, refund, "R2")
    assert sale.refunded == 300
    journal.apply_reversal(refund, None)
    assert sale.refunded == 0
    assert refund.status == "reversed"


def test_a_partial_reversal_keeps_the_sale_at_its_remaining_amount() -> None:
    journal = Journal()
    sale = _record("purchase", "000001", 1000)
    _approve(journal, sale, "R1")
    journal.apply_reversal(sale, 600)
    assert journal.totals() == Totals(debits_count=1, debits_amount=600)


def test_an_answer_clears_the_reversal_stored_before_sending() -> None:
    journal = Journal()
    sale = _record("purchase", "000001", 1000)
    journal.add(sale)
    journal.pending_reversal = PendingReversal.for_record(sale)
    journal.record_response(sale, "05", "R1", None)
    assert journal.pending_reversal is None
    assert sale.status == "declined"


def test_an_unanswered_sale_is_out_of_the_totals_once_its_reversal_is_answered_whatever_the_code() -> None:
    journal = Journal()
    sale = _record("purchase", "000001", 1000)
    journal.add(sale)
    pending = PendingReversal.for_record(sale)
    journal.pending_reversal = pending
    journal.record_unanswered(sale)
    journal.record_reversal_answer(pending, "25")
    assert journal.pending_reversal is None
    assert sale.status == "reversed"
    assert journal.totals() == Totals()


def test_a_repeated_reversal_goes_as_0401() -> None:
    pending = PendingReversal.for_record(_record("purchase", "000001", 1000))
    assert pending.current_mti() == "0400"
    pending.attempts = 1
    assert pending.current_mti() == "0401"
    advice = PendingReversal.for_record(_record("purchase", "000001", 1000), advice=True)
    advice.attempts = 2
    assert advice.current_mti() == "0421"


def test_settlement_opens_a_new_batch_and_old_sales_stay_findable() -> None:
    journal = Journal()
    _approve(journal, _record("purchase", "000001", 1000), "R1")
    journal.close_batch()
    assert journal.batch == 2
    assert journal.totals() == Totals()
    assert journal.find_by_rrn("R1") is not None


def test_the_journal_file_round_trips_and_holds_no_full_pan(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "journal.json"
    journal = load_journal(path)
    journal.next_stan()
    sale = _record("purchase", "000001", 1234)
    journal.add(sale)
    journal.pending_reversal = PendingReversal.for_record(sale)
    journal.save()
    text = path.read_text()
    assert "4761739001010119" not in text
    assert "476173******0119" in text
    again = load_journal(path)
    assert again.to_dict() == journal.to_dict()
    assert not list(path.parent.glob("*.tmp"))


def test_a_corrupt_journal_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    path.write_text("{not json")
    with pytest.raises(JournalError, match="not valid JSON"):
        load_journal(path)
    path.write_text(json.dumps({"transactions": [{"kind": "purchase"}]}))
    with pytest.raises(JournalError, match="malformed"):
        load_journal(path)


def test_old_records_of_closed_batches_are_dropped_first_when_the_journal_is_full() -> None:
    journal = Journal()
    for i in range(600):
        journal.add(_record("purchase", f"{i:06d}", 1, batch=1))
    journal.close_batch()
    for i in range(600):
        journal.add(_record("purchase", f"{600 + i:06d}", 1, batch=2))
    assert len(journal.transactions) == 1000
    assert sum(1 for t in journal.transactions if t.batch == 2) == 600


def test_the_last_sale_is_the_latest_approved_purchase_or_completion() -> None:
    from terminal_emulator.journal import Journal, TransactionRecord

    def record(kind: str, stan: str, status: str) -> TransactionRecord:
        return TransactionRecord(kind=kind, mti="0200", processing_code="000000", stan=stan, transmitted="1122101010",
                                 amount=100, currency="840", masked_pan="476173******0119", batch=1,
                                 at="2026-11-22T10:10:10+00:00", status=status, rrn=f"00000000{stan[-4:]}")  # fmt: skip

    journal = Journal()
    assert journal.last_sale() is None
    for kind, stan, status in (("purchase", "000001", "approved"), ("completion", "000002", "approved"),
                               ("purchase", "000003", "voided"), ("refund", "000004", "approved"),
                               ("purchase", "000005", "declined")):  # fmt: skip
        journal.add(record(kind, stan, status))
    last = journal.last_sale()
    assert last is not None and last.stan == "000002"


def test_the_batch_number_wraps_after_999999() -> None:
    journal = Journal(batch=999_999)
    journal.close_batch()
    assert journal.batch == 1


def test_totals_can_select_cards_so_unionpay_counts_domestic_and_foreign_apart() -> None:
    journal = Journal()
    _approve(journal, _record("purchase", "000001", 1000), "R1")
    domestic = _record("purchase", "000002", 700)
    domestic.masked_pan = "621700*********0122"
    _approve(journal, domestic, "R2")
    unionpay = journal.totals(lambda r: r.masked_pan.startswith("62"))
    others = journal.totals(lambda r: not r.masked_pan.startswith("62"))
    assert (unionpay.debits_count, unionpay.debits_amount, others.debits_count, others.debits_amount) == (1, 700, 1,
                                                                                                          1000)
    assert journal.totals() == Totals(debits_count=2, debits_amount=1700)


def test_a_journal_written_before_dates_and_request_fields_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    old = _record("purchase", "000001", 100, rrn="R1")
    data = Journal(path=path, stan=1, transactions=[old]).to_dict()
    for record in data["transactions"]:
        del record["date"], record["request_fields"]
    path.write_text(json.dumps(data))
    loaded = load_journal(path)
    assert loaded.transactions[0].date is None
    assert loaded.transactions[0].request_fields == {}
    pending = PendingReversal.for_record(loaded.transactions[0])
    assert (pending.reason, pending.original_fields) == ("98", {})
