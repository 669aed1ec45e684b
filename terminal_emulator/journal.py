"""The terminal's journal: STAN counter, batch number, transactions and the pending reversal.

The state transitions are plain methods (no I/O); :func:`load_journal` / :meth:`Journal.save` read
and write the JSON file atomically (temporary file + ``os.replace``).

Card data: the journal keeps masked PANs only (first 6 + last 4). A follow-up (void, refund,
completion, a reversal sent by a later process) uses the card given on the command line, else the
built-in test card, as a real terminal re-reads the card instead of remembering it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .messages import Totals

__all__ = [
    "MAX_RECORDS",
    "Journal",
    "JournalError",
    "PendingReversal",
    "TransactionRecord",
    "load_journal",
]

#: Records kept in the file; older records from closed batches are dropped first.
MAX_RECORDS = 1000

_VERSION = 1

# Record statuses.
SENT = "sent"  # on the wire, no answer yet (only visible after a crash)
APPROVED = "approved"
DECLINED = "declined"
UNANSWERED = "unanswered"  # timed out; its reversal is pending
REVERSED = "reversed"
VOIDED = "voided"


class JournalError(ValueError):
    """The journal file cannot be read."""


@dataclass(slots=True)
class TransactionRecord:
    """One request the terminal made, and what became of it. Amounts in minor units."""

    kind: str  # purchase | preauth | completion | void | refund
    mti: str
    processing_code: str
    stan: str  # DE11
    transmitted: str  # DE7
    amount: int
    currency: str
    masked_pan: str
    batch: int
    at: str  # ISO 8601 UTC
    status: str = SENT
    response_code: str | None = None  # DE39
    rrn: str | None = None  # DE37
    approval_code: str | None = None  # DE38
    original_rrn: str | None = None  # the reference of a void / refund / completion
    original_stan: str | None = None
    refunded: int = 0  # approved refunds against this record
    reversed_to: int | None = None  # the remaining amount after a partial reversal
    completed: bool = False  # a pre-auth that has an approved completion
    date: str | None = None  # MMDD the transaction is known by (the host's DE13 when answered)
    #: the request's fields without card data (str keys, for JSON): what a UnionPay reversal repeats
    request_fields: dict[str, str] = field(default_factory=dict)

    @property
    def effective_amount(self) -> int:
        return self.amount if self.reversed_to is None else self.reversed_to

    @property
    def original(self) -> tuple[str, str, str]:
        """(MTI, STAN, DE7): what DE90 of a reversal or completion points at."""
        return (self.mti, self.stan, self.transmitted)


@dataclass(slots=True)
class PendingReversal:
    """A reversal the terminal owes the host (store-and-forward).

    It is stored *before* a reversible request goes out and cleared when that request is answered,
    so a time-out or a crash always leaves it behind. Its STAN and DE7 are assigned at the first
    send and kept for the repeats. ``attempts`` counts sends: the first goes as 0400 (0420 for an
    advice), repeats as 0401 (0421). No PAN is stored (DE2 is added when sending).
    """

    mti: str
    processing_code: str
    amount: int
    currency: str
    original_mti: str
    original_stan: str
    original_transmitted: str
    masked_pan: str
    partial_amount: int | None = None
    attempts: int = 0
    stan: str | None = None
    transmitted: str | None = None
    local_time: str | None = None
    local_date: str | None = None
    #: DE39 of a UnionPay reversal: 98 the original got no answer, 06 other (the cashier's)
    reason: str = "98"
    #: the original request's fields without card data (str keys): what a UnionPay reversal repeats
    original_fields: dict[str, str] = field(default_factory=dict)

    @property
    def original(self) -> tuple[str, str, str]:
        return (self.original_mti, self.original_stan, self.original_transmitted)

    def current_mti(self, repeat_mti: Callable[[str], str] = lambda mti: mti[:3] + "1") -> str:
        """The first send's MTI, then the dialect's repeat (iso87: 0400 then 0401)."""
        return self.mti if self.attempts == 0 else repeat_mti(self.mti)

    @classmethod
    def for_record(
        cls, record: TransactionRecord, *, advice: bool = False, partial_amount: int | None = None,
        reason: str = "98",
    ) -> PendingReversal:
        return cls(
            mti="0420" if advice else "0400",
            processing_code=record.processing_code,
            amount=record.amount,
            currency=record.currency,
            original_mti=record.mti,
            original_stan=record.stan,
            original_transmitted=record.transmitted,
            masked_pan=record.masked_pan,
            partial_amount=partial_amount,
            reason=reason,
            original_fields=dict(record.request_fields),
        )


@dataclass
class Journal:
    """The terminal's memory. ``path`` ``None`` keeps it in memory only."""

    path: Path | None = None
    stan: int = 0
    batch: int = 1
    transactions: list[TransactionRecord] = field(default_factory=list)
    pending_reversal: PendingReversal | None = None

    # --- counters ------------------------------------------------------------------------------
    def next_stan(self) -> int:
        """Advance the STAN (DE11): 1..999999, then wraps to 1."""
        self.stan = self.stan % 999_999 + 1
        return self.stan

    # --- queries -------------------------------------------------------------------------------
    def find_by_rrn(self, rrn: str) -> TransactionRecord | None:
        for record in reversed(self.transactions):
            if record.rrn == rrn:
                return record
        return None

    def find_by_stan(self, stan: str) -> TransactionRecord | None:
        for record in reversed(self.transactions):
            if record.stan == stan:
                return record
        return None

    def last(self, *kinds: str, status: str | None = None) -> TransactionRecord | None:
        for record in reversed(self.transactions):
            if (not kinds or record.kind in kinds) and (status is None or record.status == status):
                return record
        return None

    def last_sale(self) -> TransactionRecord | None:
        """The latest approved purchase or completion: what ``--last`` refunds or voids."""
        return self.last("purchase", "completion", status=APPROVED)

    def totals(self, select: Callable[[TransactionRecord], bool] | None = None) -> Totals:
        """Totals of the open batch: approved purchases and completions (debits) and refunds
        (credits); voided and reversed transactions are excluded. ``select`` keeps some records only
        (UnionPay counts domestic and foreign cards apart)."""
        credits_count = credits_amount = debits_count = debits_amount = 0
        for record in self.batch_records():
            if select is not None and not select(record):
                continue
            if record.kind in ("purchase", "completion"):
                debits_count += 1
                debits_amount += record.effective_amount
            elif record.kind == "refund":
                credits_count += 1
                credits_amount += record.effective_amount
        return Totals(credits_count, credits_amount, debits_count, debits_amount)

    # --- transitions ---------------------------------------------------------------------------
    def add(self, record: TransactionRecord) -> None:
        self.transactions.append(record)
        self._trim()

    def record_response(
        self, record: TransactionRecord, response_code: str | None, rrn: str | None, approval_code: str | None
    ) -> None:
        """The host answered ``record``: approved (DE39 00) or declined."""
        record.response_code = response_code
        record.rrn = rrn or record.rrn
        record.approval_code = approval_code or record.approval_code
        approved = response_code == "00"
        record.status = APPROVED if approved else DECLINED
        if self.pending_reversal is not None and self.pending_reversal.original_stan == record.stan:
            self.pending_reversal = None
        if not approved:
            return
        original = self._original_of(record)
        if original is None:
            return
        if record.kind == "void":
            original.status = VOIDED
        elif record.kind == "refund":
            original.refunded += record.amount
        elif record.kind == "completion":
            original.completed = True

    def record_unanswered(self, record: TransactionRecord) -> None:
        record.status = UNANSWERED

    def record_reversal_answer(self, pending: PendingReversal, response_code: str | None) -> None:
        """The host answered the pending reversal: it is delivered, whatever the code."""
        if self.pending_reversal is pending:
            self.pending_reversal = None
        original = self.find_by_stan(pending.original_stan)
        if original is None:
            return
        if original.status in (SENT, UNANSWERED):
            # The terminal never saw an answer: whatever the host says (00, or 25 when it never got
            # the original), the transaction did not happen.
            original.status = REVERSED
        elif response_code == "00":
            self.apply_reversal(original, pending.partial_amount)

    def apply_reversal(self, original: TransactionRecord, partial_amount: int | None) -> None:
        if partial_amount is not None and original.status == APPROVED:
            original.reversed_to = partial_amount
            return
        was_approved = original.status == APPROVED
        original.status = REVERSED
        if not was_approved:
            return
        # Undoing a correction re-opens what it changed.
        target = self._original_of(original)
        if target is None:
            return
        if original.kind == "void" and target.status == VOIDED:
            target.status = APPROVED
        elif original.kind == "refund":
            target.refunded = max(0, target.refunded - original.amount)
        elif original.kind == "completion":
            target.completed = False

    def close_batch(self) -> None:
        """Settlement closes the batch whatever its outcome (batch numbers 1..999999, then 1 again)."""
        self.batch = self.batch % 999_999 + 1

    def batch_records(self) -> list[TransactionRecord]:
        """What the open batch's totals count: approved purchases, completions and refunds."""
        return [r for r in self.transactions
                if r.batch == self.batch and r.status == APPROVED and r.kind in ("purchase", "completion", "refund")]

    def _original_of(self, record: TransactionRecord) -> TransactionRecord | None:
        if record.original_stan is not None:
            found = self.find_by_stan(record.original_stan)
            if found is not None and found is not record:
                return found
        if record.original_rrn is not None:
            return self.find_by_rrn(record.original_rrn)
        return None

    def _trim(self) -> None:
        excess = len(self.transactions) - MAX_RECORDS
        if excess <= 0:
            return
        keep: list[TransactionRecord] = []
        for record in self.transactions:
            if excess > 0 and record.batch < self.batch:
                excess -= 1
                continue
            keep.append(record)
        self.transactions = keep

    # --- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "stan": self.stan,
            "batch": self.batch,
            "transactions": [asdict(t) for t in self.transactions],
            "pending_reversal": asdict(self.pending_reversal) if self.pending_reversal else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> Journal:
        try:
            pending_raw = data.get("pending_reversal")
            return cls(
                path=path,
                stan=int(data.get("stan", 0)),
                batch=int(data.get("batch", 1)),
                transactions=[TransactionRecord(**t) for t in data.get("transactions", [])],
                pending_reversal=PendingReversal(**pending_raw) if pending_raw else None,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise JournalError(f"journal {path} is malformed: {type(exc).__name__}") from None

    def save(self) -> None:
        """Write atomically: a crash leaves the old or the new journal, never half of one."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_journal(path: Path | str | None) -> Journal:
    """Read the journal at ``path`` (a fresh one when the file does not exist yet)."""
    if path is None:
        return Journal()
    p = Path(path)
    try:
        raw = p.read_text("utf-8")
    except FileNotFoundError:
        return Journal(path=p)
    except OSError as exc:
        raise JournalError(f"cannot read journal {p}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise JournalError(f"journal {p} is not valid JSON") from None
    if not isinstance(data, dict):
        raise JournalError(f"journal {p} is malformed")
    return Journal.from_dict(data, path=p)
