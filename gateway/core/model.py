"""Typed domain model: classified requests, ledger records, batches and balances.

Stdlib only. Money is an ``int`` of minor units with an ISO 4217 numeric currency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gateway.core.cards import mask_pan


class Kind(StrEnum):
    """What a request means (design section 4)."""

    NETWORK = "network"
    PREAUTH = "preauth"
    PURCHASE = "purchase"
    COMPLETION = "completion"
    VOID = "void"
    REFUND = "refund"
    REVERSAL = "reversal"
    SETTLEMENT = "settlement"
    #: the transactions of a settled batch, listed by the terminal after a settlement that did not balance
    BATCH_UPLOAD = "batch_upload"


#: kinds whose approval creates money movement that corrections may point at
ORIGINAL_KINDS = frozenset({Kind.PURCHASE, Kind.PREAUTH, Kind.COMPLETION})
VOIDABLE_KINDS = frozenset({Kind.PURCHASE, Kind.COMPLETION, Kind.PREAUTH})
REFUNDABLE_KINDS = frozenset({Kind.PURCHASE, Kind.COMPLETION})
REVERSIBLE_KINDS = frozenset({Kind.PURCHASE, Kind.PREAUTH, Kind.COMPLETION, Kind.VOID, Kind.REFUND})
#: kinds that are recorded in the ledger and checked for retransmission
FINANCIAL_KINDS = frozenset(set(Kind) - {Kind.NETWORK})


class TxnStatus(StrEnum):
    """Where a recorded request stands. VOIDED and REVERSED are final."""

    APPROVED = "approved"
    DECLINED = "declined"
    VOIDED = "voided"
    REVERSED = "reversed"
    #: a reversal that found no original (its tombstone)
    UNMATCHED = "unmatched"
    #: sent to the acquirer host, its answer awaited: reserves what it would take from its original
    PENDING = "pending"


#: statuses of records that were answered approved (voided or reversed later)
_ANSWERED_APPROVED = frozenset({TxnStatus.APPROVED, TxnStatus.VOIDED, TxnStatus.REVERSED})


class BatchState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class ClosedBy(StrEnum):
    """What closed a batch: the terminal's 0500, or the daily cut-off (a terminal that forgot)."""

    SETTLEMENT = "settlement"
    CUTOFF = "cutoff"


@dataclass(slots=True)
class Reference:
    """How a correction points at its original (design section 4).

    ``rrn`` is DE37; ``mti``, ``stan`` and ``transmission_time`` come from DE90 (original data
    elements); ``approval_code`` is DE38 (pre-auth completions without DE90). ``same_stan`` marks a
    reversal that carries no DE90 and therefore means "my own STAN, my own terminal". ``expects`` narrows
    what a void may void when the dialect names it (UnionPay: a sale void, a pre-auth void, a completion
    void); None: any voidable kind.
    """

    rrn: str | None = None
    mti: str | None = None
    stan: str | None = None
    transmission_time: str | None = None
    approval_code: str | None = None
    same_stan: bool = False
    expects: frozenset[Kind] | None = None


@dataclass(frozen=True, slots=True)
class SettlementTotals:
    """Batch totals (DE74 credits count, DE86 credits amount, DE76 debits count, DE88 debits amount)."""

    credit_count: int
    credit_amount: int
    debit_count: int
    debit_amount: int


@dataclass(slots=True)
class UploadLine:
    """One transaction a terminal lists in a batch upload (cup 0320, DE48). ``card`` stays in memory."""

    stan: str  #: the transaction's trace number (DE11)
    amount: int  #: minor units
    #: the card number as listed: the PAN left-aligned and filled with zeros to 20 digits
    card: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class UploadedLine:
    """An uploaded line as the ledger keeps it: the card masked and keyed-hashed, never in full."""

    stan: str
    amount: int
    pan_masked: str | None
    pan_hmac: str | None


# Request, Reference (here), Message (protocol), Snapshot, Decision and TxnChange (decide) are
# per-request values that nothing changes once built. Like the engine's queries they are plain
# slots dataclasses, not frozen ones: a frozen dataclass pays object.__setattr__ per field (about
# 1 µs for a Request), 2.4% of the instructions of a purchase for these six together.
@dataclass(slots=True)
class Request:
    """A classified request. ``pan`` is the full card number, kept in memory only (never in repr)."""

    kind: Kind
    mti: str
    processing_code: str  #: DE3
    stan: str  #: DE11
    #: DE7, MMDDhhmmss; "" when the terminal sent none (many never do: the ledger keeps the receipt time)
    transmission_time: str
    merchant_id: str  #: DE42
    terminal_id: str  #: DE41
    amount: int | None = None  #: DE4, minor units
    currency: str | None = None  #: DE49
    pan: str | None = field(default=None, repr=False)  #: DE2, or the PAN part of DE35
    expiry: str | None = None  #: DE14, YYMM
    reference: Reference | None = None
    replacement_amount: int | None = None  #: DE95 first 12 digits (partial reversal)
    network_code: str | None = None  #: DE70
    totals: SettlementTotals | None = None  #: DE74/76/86/88 for settlement
    original_data: str | None = None  #: DE90 as sent (part of the retransmission fingerprint)
    #: the batch number the terminal gave (cup DE60.2), kept on its record; None when the dialect has none
    terminal_batch: str | None = None
    #: a sign-on whose answer names the batch number the terminal is to use (cup DE60.2)
    assigns_batch: bool = False
    #: a batch upload's lines (cup 0320, 60.3 = 201)
    uploads: tuple[UploadLine, ...] = ()
    #: the end of a batch upload (cup 0320, 60.3 = 202 / 207): the lines are compared with the ledger
    upload_complete: bool = False
    #: the PAN as logs, events and the ledger show it (first 6 + last 4), worked out once
    masked_pan: str | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.masked_pan = mask_pan(self.pan)

    @property
    def is_advice(self) -> bool:
        """xx20 / xx21: an advice (the terminal already acted; accept-only for reversals)."""
        return self.mti[2] == "2"

    @property
    def mti_class(self) -> str:
        """The MTI without its repeat flag: 0200 and 0201 share class ``020``."""
        return self.mti[:3]


@dataclass(slots=True)
class Txn:
    """One recorded request and its answer, and (for originals) its running state."""

    id: int
    kind: Kind
    mti: str
    processing_code: str
    merchant_id: str
    terminal_id: str
    stan: str
    transmission_time: str
    amount: int  #: as requested (DE4), 0 when absent
    currency: str
    pan_masked: str | None
    pan_hmac: str | None
    rrn: str | None
    approval_code: str | None
    response_code: str
    reason: str | None
    status: TxnStatus
    #: amount still standing after partial reversals (equals ``amount`` until one arrives)
    effective_amount: int
    #: Σ effective amounts of approved, unreversed refunds against this original
    refunded_amount: int
    #: a pre-auth with a standing completion
    completed: bool
    original_id: int | None
    batch_id: int | None
    created_at: datetime
    fingerprint: str
    reference: Reference | None = None
    reversed_after_settlement: bool = False
    #: the batch number the terminal gave (cup DE60.2); None when its dialect has none
    terminal_batch: str | None = None

    @property
    def approved(self) -> bool:
        """Approved when it was answered (voided or reversed later does not change that)."""
        return self.status in _ANSWERED_APPROVED

    @property
    def refundable(self) -> int:
        if self.status is not TxnStatus.APPROVED or self.kind not in REFUNDABLE_KINDS:
            return 0
        return max(0, self.effective_amount - self.refunded_amount)

    def copy(self) -> Txn:
        """A shallow copy (the record as it stood, for an event's balance after a change)."""
        return dataclasses.replace(self)


@dataclass(slots=True)
class Batch:
    """A terminal's batch: opened by its first transaction, closed by settlement or the cut-off."""

    id: int
    merchant_id: str
    terminal_id: str
    batch_no: str  #: 6 digits, counting per terminal
    state: BatchState
    opened_at: datetime
    closed_at: datetime | None = None
    closed_by: ClosedBy | None = None
    #: "settled" or "mismatch" once a 0500 reconciled it; None before (a batch the cut-off closed
    #: stays unreconciled until the terminal's next 0500)
    result: str | None = None


def next_batch_no(previous: str | None) -> str:
    """The batch number after ``previous`` (6 digits, 000001 again after 999999); 000001 for a first batch."""
    return f"{int(previous) % 999_999 + 1:06d}" if previous is not None else "000001"


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """A batch with its ledger totals, for listings."""

    merchant_id: str
    terminal_id: str
    batch_no: str
    state: BatchState
    opened_at: datetime
    closed_at: datetime | None
    debit_count: int
    debit_amount: int
    credit_count: int
    credit_amount: int
    currency: str | None
    #: "settled" or "mismatch" once reconciled by a 0500; "cutoff" for a batch the cut-off closed and no
    #: 0500 reconciled yet; None while open
    result: str | None = None


def balance_status(txn: Txn) -> str:
    """A human status for an original's balance, as published in events."""
    status = txn.status
    if status is TxnStatus.VOIDED:
        return "voided"
    if status is TxnStatus.REVERSED:
        return "reversed"
    if status is not TxnStatus.APPROVED:
        return status.value
    if txn.kind is Kind.PREAUTH:
        return "completed" if txn.completed else "authorized"
    if txn.refunded_amount and txn.refunded_amount >= txn.effective_amount:
        return "refunded"
    if txn.refunded_amount:
        return "partially_refunded"
    if txn.effective_amount < txn.amount:
        return "partially_reversed"
    return "approved"


@dataclass(slots=True)
class ExceptionCase:
    """Something the gateway had to apply that an operator must look at and resolve.

    Today one kind: ``reversal_conflict``, a reversal advice (which cannot be refused) applied over
    refunds or a completion that stand against its original, so the card is credited beyond what it
    paid. ``details`` holds JSON-compatible values only (amounts, RRNs, masked PANs).
    """

    id: int  #: the ledger's; 0 until recorded
    kind: str
    merchant_id: str
    terminal_id: str
    original_rrn: str | None
    summary: str  #: one line for listings
    details: dict[str, object]
    created_at: datetime
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution: str | None = None

    @property
    def resolved(self) -> bool:
        return self.resolved_at is not None


@dataclass(slots=True)
class SafItem:
    """An entry of the acquirer host's store-and-forward queue: a reversal (``reverse``) of ``txn``, or an
    advice (``advise``) of a stand-in approval, sent in queue order until the host answers it."""

    id: int
    txn: Txn
    action: str  #: reverse | advise
    amount: int | None  #: a partial reversal's new amount (DE95); None: all of it
    state: str  #: queued | acknowledged | failed
    created_at: datetime
    attempts: int = 0
    last_attempt_at: datetime | None = None
    finished_at: datetime | None = None
    response_code: str | None = None  #: the host's DE39
    last_error: str | None = None
