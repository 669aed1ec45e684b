"""The pure rules, in memory: every check of design section 5 passes and fails where it should."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.decide import Snapshot, TxnChange, card_expired, decide
from gateway.core.model import Batch, BatchState, Kind, Reference, Request, Txn, TxnStatus
from gateway.core.policy import Policy, Velocity
from gateway.core.reasons import Reason

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
CARD = "4761739001010119"
OPEN = Batch(1, "M1", "T1", "000001", BatchState.OPEN, NOW)
CLOSED = replace(OPEN, state=BatchState.CLOSED)


def original(kind: Kind = Kind.PURCHASE, amount: int = 10_000, **changes: object) -> Txn:
    txn = Txn(
        id=7, kind=kind, mti="0200", processing_code="000000", merchant_id="M1", terminal_id="T1",
        stan="000001", transmission_time="1122120000", amount=amount, currency="840",
        pan_masked="476173******0119", pan_hmac="card-a", rrn="000000000001", approval_code="ABC123",
        response_code="00", reason=None, status=TxnStatus.APPROVED, effective_amount=amount,
        refunded_amount=0, completed=False, original_id=None, batch_id=1, created_at=NOW - timedelta(hours=1),
        fingerprint="f",
    )
    return replace(txn, **changes)  # type: ignore[arg-type]


def request(kind: Kind, amount: int | None = 10_000, mti: str = "0200", **changes: object) -> Request:
    req = Request(
        kind=kind, mti=mti, processing_code="000000", stan="000002", transmission_time="1122120100",
        merchant_id="M1", terminal_id="T1", amount=amount, currency="840", pan=CARD,
        reference=Reference(rrn="000000000001"),
    )
    return replace(req, **changes)  # type: ignore[arg-type]


def snap(orig: Txn | None = None, **changes: object) -> Snapshot:
    base = Snapshot(pan_hmac="card-a", original=orig, original_batch=OPEN)
    return replace(base, **changes)  # type: ignore[arg-type]


POLICY = Policy()


# ----------------------------------------------------------------------------- void

@pytest.mark.parametrize(
    ("orig", "snapshot_changes", "request_changes", "reason"),
    [
        (None, {}, {}, Reason.ORIGINAL_NOT_FOUND),
        (original(status=TxnStatus.DECLINED), {}, {}, Reason.ORIGINAL_NOT_APPROVED),
        (original(kind=Kind.REFUND), {}, {}, Reason.NOT_VOIDABLE),
        (original(status=TxnStatus.VOIDED), {}, {}, Reason.ALREADY_VOIDED),
        (original(status=TxnStatus.REVERSED), {}, {}, Reason.ALREADY_REVERSED),
        (original(refunded_amount=1), {}, {}, Reason.HAS_LATER_ACTIVITY),
        (original(kind=Kind.PREAUTH, completed=True), {}, {}, Reason.HAS_LATER_ACTIVITY),
        (original(), {}, {"terminal_id": "T2"}, Reason.TERMINAL_MISMATCH),
        (original(), {"original_batch": CLOSED}, {}, Reason.BATCH_SETTLED),
        (original(), {"pan_hmac": "card-b"}, {}, Reason.PAN_MISMATCH),
        (original(), {}, {"currency": "978"}, Reason.CURRENCY_MISMATCH),
        (original(), {}, {"amount": 9_999}, Reason.AMOUNT_MISMATCH),
        (original(), {}, {}, Reason.APPROVED),
    ],
)
def test_void_checks_in_the_documented_order(
    orig: Txn | None, snapshot_changes: dict[str, object], request_changes: dict[str, object], reason: Reason
) -> None:
    decision = decide(request(Kind.VOID, **request_changes), snap(orig, **snapshot_changes), POLICY, NOW)
    assert decision.reason is reason


def test_an_approved_void_marks_the_original_voided() -> None:
    decision = decide(request(Kind.VOID), snap(original()), POLICY, NOW)
    assert decision.changes == (TxnChange(7, status=TxnStatus.VOIDED),)


def test_voiding_a_completion_gives_the_preauth_back() -> None:
    completion = original(kind=Kind.COMPLETION, original_id=3)
    decision = decide(request(Kind.VOID), snap(completion), POLICY, NOW)
    assert TxnChange(3, completed=False) in decision.changes


# ----------------------------------------------------------------------------- refund

@pytest.mark.parametrize(
    ("orig", "snapshot_changes", "request_changes", "reason"),
    [
        (None, {}, {"reference": None}, Reason.UNREFERENCED_REFUND_DISABLED),
        (None, {}, {}, Reason.ORIGINAL_NOT_FOUND),
        (original(status=TxnStatus.DECLINED), {}, {}, Reason.ORIGINAL_NOT_APPROVED),
        (original(kind=Kind.PREAUTH), {}, {}, Reason.NOT_REFUNDABLE),
        (original(status=TxnStatus.VOIDED), {}, {}, Reason.ALREADY_VOIDED),
        (original(status=TxnStatus.REVERSED), {}, {}, Reason.ALREADY_REVERSED),
        (original(), {"pan_hmac": "card-b"}, {}, Reason.PAN_MISMATCH),
        (original(), {}, {"currency": "978"}, Reason.CURRENCY_MISMATCH),
        (original(), {}, {"amount": 0}, Reason.INVALID_AMOUNT),
        (original(refunded_amount=6_000), {}, {"amount": 5_000}, Reason.EXCEEDS_REFUNDABLE),
        (original(effective_amount=4_000), {}, {"amount": 5_000}, Reason.EXCEEDS_REFUNDABLE),
        (original(created_at=NOW - timedelta(days=31)), {}, {"amount": 1}, Reason.REFUND_WINDOW_EXPIRED),
        (original(refunded_amount=6_000), {}, {"amount": 4_000}, Reason.APPROVED),
        (original(created_at=NOW - timedelta(days=29)), {}, {"amount": 1}, Reason.APPROVED),
    ],
)
def test_refund_checks_in_the_documented_order(
    orig: Txn | None, snapshot_changes: dict[str, object], request_changes: dict[str, object], reason: Reason
) -> None:
    decision = decide(request(Kind.REFUND, **request_changes), snap(orig, **snapshot_changes), POLICY, NOW)
    assert decision.reason is reason


def test_unreferenced_refunds_are_allowed_per_terminal_only() -> None:
    allowed = Policy(unreferenced_refund_terminals=frozenset({"M1/T1"}))
    req = request(Kind.REFUND, reference=None)
    assert decide(req, snap(), allowed, NOW).approved
    assert not decide(replace(req, terminal_id="T9"), snap(), allowed, NOW).approved


def test_velocity_count_answers_before_amount_and_both_are_off_by_default() -> None:
    limits = Policy(card_daily_refund_count=2, terminal_daily_refund_amount=5_000)
    req = request(Kind.REFUND, amount=1_000)
    full = Velocity(terminal_count=2, terminal_amount=4_500, card_count=2, card_amount=4_500)
    assert decide(req, snap(original(), velocity=full), limits, NOW).reason is Reason.REFUND_VELOCITY_COUNT
    over_amount = replace(full, card_count=1)
    assert decide(req, snap(original(), velocity=over_amount), limits, NOW).reason is Reason.REFUND_VELOCITY_AMOUNT
    assert decide(req, snap(original(), velocity=full), POLICY, NOW).approved


@given(
    amount=st.integers(0, 20_000),
    effective=st.integers(1, 10_000),
    refunded=st.integers(0, 10_000),
)
def test_a_refund_is_approved_only_within_the_refundable_balance(amount: int, effective: int, refunded: int) -> None:
    orig = original(effective_amount=effective, refunded_amount=min(refunded, effective))
    decision = decide(request(Kind.REFUND, amount=amount), snap(orig), POLICY, NOW)
    if decision.approved:
        assert 0 < amount <= effective - orig.refunded_amount
        assert decision.changes == (TxnChange(7, refunded_delta=amount),)
    else:
        assert decision.changes == ()


# ----------------------------------------------------------------------------- completion

@pytest.mark.parametrize(
    ("orig", "request_changes", "reason"),
    [
        (None, {}, Reason.ORIGINAL_NOT_FOUND),
        (original(kind=Kind.PREAUTH, status=TxnStatus.DECLINED), {}, Reason.ORIGINAL_NOT_APPROVED),
        (original(kind=Kind.PURCHASE), {}, Reason.NOT_COMPLETABLE),
        (original(kind=Kind.PREAUTH, status=TxnStatus.VOIDED), {}, Reason.ALREADY_VOIDED),
        (original(kind=Kind.PREAUTH, completed=True), {}, Reason.ALREADY_COMPLETED),
        (original(kind=Kind.PREAUTH, created_at=NOW - timedelta(days=31)), {}, Reason.PREAUTH_EXPIRED),
        (original(kind=Kind.PREAUTH), {"amount": 11_501}, Reason.AMOUNT_MISMATCH),
        (original(kind=Kind.PREAUTH), {"amount": 11_500}, Reason.APPROVED),
    ],
)
def test_completion_checks(orig: Txn | None, request_changes: dict[str, object], reason: Reason) -> None:
    decision = decide(request(Kind.COMPLETION, mti="0220", **request_changes), snap(orig), POLICY, NOW)
    assert decision.reason is reason


# ----------------------------------------------------------------------------- reversal

def test_a_reversal_advice_without_original_is_accepted_and_a_request_answers_unmatched() -> None:
    advice = decide(request(Kind.REVERSAL, mti="0420"), snap(None), POLICY, NOW)
    assert advice.approved and advice.outcome == "unmatched"
    req = decide(request(Kind.REVERSAL, mti="0400"), snap(None), POLICY, NOW)
    assert req.reason is Reason.REVERSAL_UNMATCHED


def test_a_second_reversal_changes_nothing() -> None:
    decision = decide(request(Kind.REVERSAL, mti="0400"), snap(original(status=TxnStatus.REVERSED)), POLICY, NOW)
    assert decision.approved and decision.repeat and decision.changes == ()


def test_reversing_a_void_reopens_its_original_and_a_refund_gives_its_amount_back() -> None:
    void = original(kind=Kind.VOID, original_id=3)
    decision = decide(request(Kind.REVERSAL, mti="0420"), snap(void), POLICY, NOW)
    assert TxnChange(3, status=TxnStatus.APPROVED) in decision.changes
    refund = original(kind=Kind.REFUND, amount=400, original_id=3)
    decision = decide(request(Kind.REVERSAL, mti="0420"), snap(refund), POLICY, NOW)
    assert TxnChange(3, refunded_delta=-400) in decision.changes


def test_a_partial_reversal_sets_the_effective_amount() -> None:
    decision = decide(request(Kind.REVERSAL, mti="0420", replacement_amount=600), snap(original()), POLICY, NOW)
    assert decision.changes == (TxnChange(7, effective_amount=600),)


def test_a_reversal_after_settlement_is_accepted_as_late() -> None:
    decision = decide(request(Kind.REVERSAL, mti="0420"), snap(original(), original_batch=CLOSED), POLICY, NOW)
    assert decision.approved and decision.outcome == "late"
    assert decision.changes[0].reversed_after_settlement is True


def test_a_reversal_request_over_later_activity_is_refused_but_an_advice_applies() -> None:
    refunded = original(refunded_amount=100)
    assert decide(request(Kind.REVERSAL, mti="0400"), snap(refunded), POLICY, NOW).reason is (
        Reason.HAS_LATER_ACTIVITY
    )
    assert decide(request(Kind.REVERSAL, mti="0420"), snap(refunded), POLICY, NOW).approved


# ----------------------------------------------------------------------------- stand-in

def test_stand_in_declines_by_rule_and_approves_the_rest() -> None:
    limited = Policy(standin_max_amount=5_000)
    assert decide(request(Kind.PURCHASE, amount=5_001), snap(), limited, NOW).reason is Reason.OVER_LIMIT
    assert decide(request(Kind.PURCHASE, pan="4761739001010118"), snap(), POLICY, NOW).reason is Reason.LUHN_FAILED
    assert decide(request(Kind.PURCHASE, expiry="2610"), snap(), POLICY, NOW).reason is Reason.EXPIRED_CARD
    assert decide(request(Kind.PURCHASE, expiry="2611"), snap(), POLICY, NOW).approved
    assert decide(request(Kind.PREAUTH, amount=0), snap(), POLICY, NOW).reason is Reason.INVALID_AMOUNT
    tomb = original(kind=Kind.REVERSAL, status=TxnStatus.UNMATCHED)
    assert decide(request(Kind.PURCHASE), snap(tombstone=tomb), POLICY, NOW).reason is Reason.REVERSED_BEFORE_ARRIVAL


def test_a_card_is_valid_through_the_last_day_of_its_expiry_month() -> None:
    assert not card_expired("2611", NOW)
    assert card_expired("2610", NOW)
    assert not card_expired("2701", NOW)


@pytest.mark.parametrize(
    ("key", "rrn", "code"),
    [
        (b"test-key", "000000000001", "1ESGFL"),
        (b"test-key", "633012345678", "WVCC2S"),
        (b"another-key", "000000000001", "84KPPD"),
    ],
)
def test_approval_codes_stay_what_they_were_for_the_same_key_and_rrn(key: bytes, rrn: str, code: str) -> None:
    """DE38 is derived from the RRN under the installation's key; receipts rely on it not changing."""
    from gateway.core.engine import approval_code_for

    assert approval_code_for(key, rrn) == code


@given(st.text(alphabet="0123456789", min_size=12, max_size=12))
def test_approval_codes_are_six_characters_without_i_or_o(rrn: str) -> None:
    from gateway.core.engine import approval_code_for

    code = approval_code_for(b"test-key", rrn)
    assert len(code) == 6
    assert set(code) <= set("0123456789ABCDEFGHJKLMNPQRSTUVWX")  # no I or O, easily misread


def test_approval_codes_are_keyed_not_a_plain_hash_of_the_rrn() -> None:
    """Issue 22: with an unkeyed hash every installation gave RRN 000000000001 the code 1J2M97."""
    from gateway.core.engine import approval_code_for

    codes = {approval_code_for(key, "000000000001") for key in (b"a", b"b", b"c", b"d")}
    assert len(codes) == 4
    assert "1J2M97" not in codes


def test_a_txn_copy_copies_every_field_and_shares_no_state() -> None:
    from dataclasses import fields

    values = {field.name: object() for field in fields(Txn)}  # a distinct value per field
    txn = Txn(**values)  # type: ignore[arg-type]
    clone = txn.copy()
    assert clone is not txn
    assert {name: getattr(clone, name) for name in values} == values
    clone.refunded_amount = 5  # type: ignore[assignment]
    assert txn.refunded_amount is values["refunded_amount"]
