"""Rows and models: the record columns and the mapping between rows and the domain's values.

Rows are anything indexable by column name (``sqlite3.Row``, ``asyncpg.Record``); the caller converts
the database's moments (see ``Dialect.moment``) and passes them in.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from gateway.core.model import (
    Batch,
    BatchState,
    BatchSummary,
    ClosedBy,
    ExceptionCase,
    Kind,
    Reference,
    SettlementTotals,
    Txn,
    TxnStatus,
)
from gateway.core.queries import BatchClose

#: the txns columns a new record fills, in the order of :func:`record_values`
TXN_COLUMNS: tuple[str, ...] = (
    "kind", "mti", "mti_class", "processing_code", "merchant_id", "terminal_id", "stan", "transmission_time",
    "amount", "currency", "pan_masked", "pan_hmac", "rrn", "approval_code", "response_code", "reason", "status",
    "effective_amount", "refunded_amount", "completed", "original_id", "batch_id", "created_at", "fingerprint",
    "ref_rrn", "ref_mti", "ref_stan", "ref_time", "ref_approval", "ref_same_stan", "terminal_batch",
)  # fmt: skip


def record_values(record: Txn, created_at: Any) -> tuple[Any, ...]:
    """The values of :data:`TXN_COLUMNS` for a new record (``created_at`` in the adapter's form)."""
    ref = record.reference
    # str() of a StrEnum member is its value (``.value`` is a property: two Python calls in 3.11)
    return (
        str(record.kind),
        record.mti,
        record.mti[:3],
        record.processing_code,
        record.merchant_id,
        record.terminal_id,
        record.stan,
        record.transmission_time,
        record.amount,
        record.currency,
        record.pan_masked,
        record.pan_hmac,
        record.rrn,
        record.approval_code,
        record.response_code,
        record.reason,
        str(record.status),
        record.effective_amount,
        record.refunded_amount,
        record.completed,
        record.original_id,
        record.batch_id,
        created_at,
        record.fingerprint,
        ref.rrn if ref else None,
        ref.mti if ref else None,
        ref.stan if ref else None,
        ref.transmission_time if ref else None,
        ref.approval_code if ref else None,
        ref.same_stan if ref else False,
        record.terminal_batch,
    )




def txn_from_row(row: Any, created_at: datetime) -> Txn:
    """A ledger record from its row (``created_at`` already converted by the adapter)."""
    reference = None
    if row["ref_rrn"] or row["ref_stan"] or row["ref_approval"] or row["ref_same_stan"]:
        reference = Reference(
            rrn=row["ref_rrn"],
            mti=row["ref_mti"],
            stan=row["ref_stan"],
            transmission_time=row["ref_time"],
            approval_code=row["ref_approval"],
            same_stan=bool(row["ref_same_stan"]),
        )
    return Txn(
        id=int(row["id"]),
        kind=Kind(row["kind"]),
        mti=row["mti"],
        processing_code=row["processing_code"],
        merchant_id=row["merchant_id"],
        terminal_id=row["terminal_id"],
        stan=row["stan"],
        transmission_time=row["transmission_time"],
        amount=int(row["amount"]),
        currency=row["currency"],
        pan_masked=row["pan_masked"],
        pan_hmac=row["pan_hmac"],
        rrn=row["rrn"],
        approval_code=row["approval_code"],
        response_code=row["response_code"],
        reason=row["reason"],
        status=TxnStatus(row["status"]),
        effective_amount=int(row["effective_amount"]),
        refunded_amount=int(row["refunded_amount"]),
        completed=bool(row["completed"]),
        original_id=row["original_id"],
        batch_id=row["batch_id"],
        created_at=created_at,
        fingerprint=row["fingerprint"],
        reference=reference,
        reversed_after_settlement=bool(row["reversed_after_settlement"]),
        terminal_batch=row["terminal_batch"],
    )


def batch_from_row(row: Any, opened_at: datetime, closed_at: datetime | None) -> Batch:
    closed_by = row["closed_by"]
    return Batch(
        id=int(row["id"]),
        merchant_id=row["merchant_id"],
        terminal_id=row["terminal_id"],
        batch_no=row["batch_no"],
        state=BatchState(row["state"]),
        opened_at=opened_at,
        closed_at=closed_at,
        closed_by=ClosedBy(closed_by) if closed_by else None,
        result=row["result"],
    )


def reconcile_values(close: BatchClose, closed_at: Any) -> tuple[Any, ...]:
    """The values of a batch's reconciliation by a 0500, in the order of each ledger's statement:
    closed at (kept when the cut-off closed it earlier), result, terminal totals, ledger totals, id."""
    return (
        closed_at,
        close.result,
        totals_text(close.terminal_totals),
        totals_text(close.ledger_totals),
        close.batch_id,
    )


#: the exceptions columns a new case fills, in the order of :func:`exception_values`
EXCEPTION_COLUMNS: tuple[str, ...] = (
    "kind", "merchant_id", "terminal_id", "original_rrn", "summary", "details", "created_at",
)  # fmt: skip


def exception_values(case: ExceptionCase, created_at: Any) -> tuple[Any, ...]:
    return (
        case.kind,
        case.merchant_id,
        case.terminal_id,
        case.original_rrn,
        case.summary,
        orjson.dumps(case.details).decode(),
        created_at,
    )


def exception_from_row(row: Any, created_at: datetime, resolved_at: datetime | None) -> ExceptionCase:
    return ExceptionCase(
        id=int(row["id"]),
        kind=row["kind"],
        merchant_id=row["merchant_id"],
        terminal_id=row["terminal_id"],
        original_rrn=row["original_rrn"],
        summary=row["summary"],
        details=orjson.loads(row["details"]),
        created_at=created_at,
        resolved_at=resolved_at,
        resolved_by=row["resolved_by"],
        resolution=row["resolution"],
    )


def summary_from_row(row: Any, batch: Batch) -> BatchSummary:
    """A batch listing line: the batch and its ledger totals (columns dc, da, cc, ca, currency, result)."""
    return BatchSummary(
        merchant_id=batch.merchant_id,
        terminal_id=batch.terminal_id,
        batch_no=batch.batch_no,
        state=batch.state,
        opened_at=batch.opened_at,
        closed_at=batch.closed_at,
        debit_count=int(row["dc"] or 0),
        debit_amount=int(row["da"] or 0),
        credit_count=int(row["cc"] or 0),
        credit_amount=int(row["ca"] or 0),
        currency=row["currency"],
        result=batch.result or (ClosedBy.CUTOFF.value if batch.closed_by is ClosedBy.CUTOFF else None),
    )


def totals_text(totals: SettlementTotals) -> str:
    """Batch totals as stored: credits count, credits amount, debits count, debits amount."""
    return f"{totals.credit_count},{totals.credit_amount},{totals.debit_count},{totals.debit_amount}"
