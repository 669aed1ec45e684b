"""The refund controls: pure decisions over a ledger snapshot (design section 5).

``decide()`` takes the classified request, what the ledger knows about its original, the policy and
the time, and returns a :class:`Decision`: a reason (``approved`` or why not) and the changes to
record. No I/O, no clock, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from gateway.core.cards import luhn_valid
from gateway.core.model import (
    REFUNDABLE_KINDS,
    REVERSIBLE_KINDS,
    VOIDABLE_KINDS,
    Batch,
    BatchState,
    Kind,
    Request,
    Txn,
    TxnStatus,
)
from gateway.core.policy import Policy, Velocity
from gateway.core.reasons import Reason


@dataclass(slots=True)
class TxnChange:
    """A change to an existing ledger record, decided by a correction."""

    txn_id: int
    status: TxnStatus | None = None
    refunded_delta: int = 0
    effective_amount: int | None = None
    completed: bool | None = None
    reversed_after_settlement: bool | None = None


@dataclass(slots=True)
class Snapshot:
    """What the ledger knows that the decision depends on (read inside the serialising transaction)."""

    pan_hmac: str | None = None
    original: Txn | None = None
    #: for a reversal of a void: the record the void voided, and when that is a completion, its pre-auth
    voided: Txn | None = None
    voided_preauth: Txn | None = None
    original_batch: Batch | None = None
    #: an unmatched reversal that names this request (it arrived first)
    tombstone: Txn | None = None
    velocity: Velocity = field(default_factory=Velocity)
    #: corrections of the original sent to the acquirer host and not answered yet: they reserve what
    #: they would take (read with the original locked, so concurrent corrections queue behind them)
    pending: tuple[Txn, ...] = ()

    @property
    def reserved(self) -> int:
        """What pending corrections would take from the original's refundable amount (a void: all of it)."""
        original = self.original
        if original is None or not self.pending:
            return 0
        if any(txn.kind is Kind.VOID for txn in self.pending):
            return original.refundable
        return sum(txn.effective_amount for txn in self.pending if txn.kind is Kind.REFUND)


@dataclass(slots=True)
class Decision:
    reason: Reason
    changes: tuple[TxnChange, ...] = ()
    #: how a correction event calls this outcome (approved, declined, applied, unmatched, late, replayed)
    outcome: str = ""
    #: a reversal that repeats an earlier one: answered like the first, nothing changed
    repeat: bool = False

    @property
    def approved(self) -> bool:
        return self.reason is Reason.APPROVED


def _declined(reason: Reason) -> Decision:
    return Decision(reason, outcome="declined")


def _approved(*changes: TxnChange) -> Decision:
    return Decision(Reason.APPROVED, tuple(changes), outcome="approved")


def decide(request: Request, snapshot: Snapshot, policy: Policy, now: datetime) -> Decision:
    """Decide one financial request. Settlement is decided by the engine (it is a comparison of totals)."""
    kind = request.kind
    if snapshot.tombstone is not None and kind is not Kind.REVERSAL:
        # the terminal reversed this very request before it arrived: whatever it is, it must not move money
        return _declined(Reason.REVERSED_BEFORE_ARRIVAL)
    if kind is Kind.PURCHASE or kind is Kind.PREAUTH:
        if kind in policy.forward:  # the host decides: the gateway checked format, duplicates, allow-list
            return _approved() if (request.amount or 0) > 0 else _declined(Reason.INVALID_AMOUNT)
        return decide_standin(request, snapshot, policy, now)
    if kind is Kind.VOID:
        return decide_void(request, snapshot)
    if kind is Kind.REFUND:
        return decide_refund(request, snapshot, policy, now)
    if kind is Kind.COMPLETION:
        return decide_completion(request, snapshot, policy, now)
    if kind is Kind.REVERSAL:
        return decide_reversal(request, snapshot)
    return _declined(Reason.UNSUPPORTED_MESSAGE)


def card_expired(expiry: str, now: datetime) -> bool:
    """DE14 is YYMM; a card is valid through the last day of that month."""
    year, month = 2000 + int(expiry[:2]), int(expiry[2:4])
    return (year, month) < (now.year, now.month)


def decide_standin(request: Request, snapshot: Snapshot, policy: Policy, now: datetime) -> Decision:
    """Stand-in approval of purchases and pre-auths (no upstream host)."""
    amount = request.amount or 0
    if amount <= 0:
        return _declined(Reason.INVALID_AMOUNT)
    if policy.check_luhn and not luhn_valid(request.pan or ""):
        return _declined(Reason.LUHN_FAILED)
    if policy.check_expiry and request.expiry and card_expired(request.expiry, now):
        return _declined(Reason.EXPIRED_CARD)
    if policy.standin_max_amount is not None and amount > policy.standin_max_amount:
        return _declined(Reason.OVER_LIMIT)
    return _approved()


def _finality(original: Txn) -> Reason | None:
    if original.status is TxnStatus.VOIDED:
        return Reason.ALREADY_VOIDED
    if original.status is TxnStatus.REVERSED:
        return Reason.ALREADY_REVERSED
    return None


def _same_card(request_hmac: str | None, original: Txn) -> bool:
    return request_hmac is not None and request_hmac == original.pan_hmac


def decide_void(request: Request, snapshot: Snapshot) -> Decision:
    original = snapshot.original
    if original is None:
        return _declined(Reason.ORIGINAL_NOT_FOUND)
    if not original.approved:
        return _declined(Reason.ORIGINAL_NOT_APPROVED)
    reference = request.reference
    if original.kind not in VOIDABLE_KINDS or (
        reference is not None and reference.expects is not None and original.kind not in reference.expects
    ):
        return _declined(Reason.NOT_VOIDABLE)
    final = _finality(original)
    if final is not None:
        return _declined(final)
    if original.refunded_amount > 0 or original.completed or snapshot.pending:
        return _declined(Reason.HAS_LATER_ACTIVITY)
    if original.terminal_id != request.terminal_id:
        return _declined(Reason.TERMINAL_MISMATCH)
    if snapshot.original_batch is None or snapshot.original_batch.state is not BatchState.OPEN:
        return _declined(Reason.BATCH_SETTLED)
    if not _same_card(snapshot.pan_hmac, original):
        return _declined(Reason.PAN_MISMATCH)
    if request.currency != original.currency:
        return _declined(Reason.CURRENCY_MISMATCH)
    if request.amount != original.effective_amount:
        return _declined(Reason.AMOUNT_MISMATCH)
    changes = [TxnChange(original.id, status=TxnStatus.VOIDED)]
    if original.kind is Kind.COMPLETION and original.original_id is not None:
        # a voided completion gives its pre-auth back: it may be completed again
        changes.append(TxnChange(original.original_id, completed=False))
    return _approved(*changes)


def decide_refund(request: Request, snapshot: Snapshot, policy: Policy, now: datetime) -> Decision:
    amount = request.amount or 0
    original = snapshot.original
    if request.reference is None:
        if not policy.allows_unreferenced_refund(request.merchant_id, request.terminal_id):
            return _declined(Reason.UNREFERENCED_REFUND_DISABLED)
        if amount <= 0:
            return _declined(Reason.INVALID_AMOUNT)
        return _velocity(amount, snapshot.velocity, policy) or _approved()
    if original is None:
        return _declined(Reason.ORIGINAL_NOT_FOUND)
    if not original.approved:
        return _declined(Reason.ORIGINAL_NOT_APPROVED)
    if original.kind not in REFUNDABLE_KINDS:
        return _declined(Reason.NOT_REFUNDABLE)
    final = _finality(original)
    if final is not None:
        return _declined(final)
    if not _same_card(snapshot.pan_hmac, original):
        return _declined(Reason.PAN_MISMATCH)
    if request.currency != original.currency:
        return _declined(Reason.CURRENCY_MISMATCH)
    if amount <= 0:
        return _declined(Reason.INVALID_AMOUNT)
    if amount > original.refundable - snapshot.reserved:
        return _declined(Reason.EXCEEDS_REFUNDABLE)
    if now - original.created_at > policy.refund_window:
        return _declined(Reason.REFUND_WINDOW_EXPIRED)
    return _velocity(amount, snapshot.velocity, policy) or _approved(TxnChange(original.id, refunded_delta=amount))


def _velocity(amount: int, velocity: Velocity, policy: Policy) -> Decision | None:
    for limit, count in (
        (policy.terminal_daily_refund_count, velocity.terminal_count),
        (policy.card_daily_refund_count, velocity.card_count),
    ):
        if limit is not None and count + 1 > limit:
            return _declined(Reason.REFUND_VELOCITY_COUNT)
    for limit, total in (
        (policy.terminal_daily_refund_amount, velocity.terminal_amount),
        (policy.card_daily_refund_amount, velocity.card_amount),
    ):
        if limit is not None and total + amount > limit:
            return _declined(Reason.REFUND_VELOCITY_AMOUNT)
    return None


def decide_completion(request: Request, snapshot: Snapshot, policy: Policy, now: datetime) -> Decision:
    preauth = snapshot.original
    amount = request.amount or 0
    if preauth is None:
        return _declined(Reason.ORIGINAL_NOT_FOUND)
    if not preauth.approved:
        return _declined(Reason.ORIGINAL_NOT_APPROVED)
    if preauth.kind is not Kind.PREAUTH:
        return _declined(Reason.NOT_COMPLETABLE)
    final = _finality(preauth)
    if final is not None:
        return _declined(final)
    if preauth.completed or any(txn.kind is Kind.COMPLETION for txn in snapshot.pending):
        return _declined(Reason.ALREADY_COMPLETED)
    if snapshot.pending:  # a void of the pre-auth awaits the host
        return _declined(Reason.HAS_LATER_ACTIVITY)
    if not _same_card(snapshot.pan_hmac, preauth):
        return _declined(Reason.PAN_MISMATCH)
    if request.currency != preauth.currency:
        return _declined(Reason.CURRENCY_MISMATCH)
    if amount <= 0:
        return _declined(Reason.INVALID_AMOUNT)
    if now - preauth.created_at > policy.preauth_validity:
        return _declined(Reason.PREAUTH_EXPIRED)
    if amount * 100 > preauth.effective_amount * (100 + policy.completion_tolerance_pct):
        return _declined(Reason.AMOUNT_MISMATCH)
    return _approved(TxnChange(preauth.id, completed=True))


def decide_reversal(request: Request, snapshot: Snapshot) -> Decision:
    """Reversals are idempotent; advices (0420/0421) are never refused.

    An advice applied while refunds or a completion stand against the original credits the card
    beyond what it paid: its outcome is ``conflict``, for an operator to resolve (design §5).
    """
    original = snapshot.original
    if original is None or original.kind not in REVERSIBLE_KINDS:
        if request.is_advice:
            return Decision(Reason.APPROVED, outcome="unmatched")
        return Decision(Reason.REVERSAL_UNMATCHED, outcome="unmatched")
    if original.status is TxnStatus.REVERSED:
        return Decision(Reason.APPROVED, outcome="replayed", repeat=True)
    if original.status is TxnStatus.PENDING:
        # still awaiting the host's answer: it stands for nothing yet, and the host gets a reversal
        partial = request.replacement_amount
        if partial is not None and 0 < partial < original.effective_amount:
            return Decision(Reason.APPROVED, (TxnChange(original.id, effective_amount=partial),), outcome="applied")
        return Decision(Reason.APPROVED, (TxnChange(original.id, status=TxnStatus.REVERSED),), outcome="applied")
    if original.status is not TxnStatus.APPROVED:
        # declined, or voided already: nothing stands that could be reversed
        return Decision(Reason.APPROVED, outcome="applied")
    later_activity = original.refunded_amount > 0 or original.completed or bool(snapshot.pending)
    preauth = snapshot.voided_preauth
    if preauth is not None and (preauth.completed or preauth.status is not TxnStatus.APPROVED):
        # reversing a completion's void re-opens that completion: the pre-auth was completed again, voided
        # or reversed since, so it would be captured twice
        later_activity = True
    if later_activity and not request.is_advice:
        return _declined(Reason.HAS_LATER_ACTIVITY)
    late = snapshot.original_batch is not None and snapshot.original_batch.state is BatchState.CLOSED
    partial = request.replacement_amount
    if partial is not None and partial >= original.effective_amount:
        # a "partial" reversal to the full amount or more reverses nothing
        return Decision(Reason.APPROVED, outcome="late" if late else "applied")
    partial_change = partial is not None and partial > 0 and original.kind is not Kind.VOID
    remaining = partial if partial is not None and partial_change else 0
    # what still stands after the reversal must cover the refunds; a completion stands on its own
    conflict = later_activity and (
        original.completed or original.refunded_amount > remaining or original.kind is Kind.VOID
    )
    outcome = "conflict" if conflict else "late" if late else "applied"
    changes: list[TxnChange] = []
    if partial is not None and partial_change:
        changes.append(TxnChange(original.id, effective_amount=partial, reversed_after_settlement=late or None))
        if original.kind is Kind.REFUND and original.original_id is not None:
            changes.append(TxnChange(original.original_id, refunded_delta=partial - original.effective_amount))
        return Decision(Reason.APPROVED, tuple(changes), outcome=outcome)
    changes.append(TxnChange(original.id, status=TxnStatus.REVERSED, reversed_after_settlement=late or None))
    parent_id = original.original_id
    if parent_id is not None:
        if original.kind is Kind.VOID:
            changes.append(TxnChange(parent_id, status=TxnStatus.APPROVED))
            if preauth is not None and not conflict:
                changes.append(TxnChange(preauth.id, completed=True))  # its completion stands again
        elif original.kind is Kind.REFUND:
            changes.append(TxnChange(parent_id, refunded_delta=-original.effective_amount))
        elif original.kind is Kind.COMPLETION:
            changes.append(TxnChange(parent_id, completed=False))
    return Decision(Reason.APPROVED, tuple(changes), outcome=outcome)
