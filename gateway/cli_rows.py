"""The operator commands' records as JSON-ready dicts (``iso-gateway batches|transactions|exceptions|saf
status --json``), one function per kind of row. Card numbers appear only masked: a record holds no other.
"""

from __future__ import annotations

from typing import Any

from gateway.core.model import BatchSummary, ExceptionCase, SafItem, Txn


def batch_dict(batch: BatchSummary) -> dict[str, Any]:
    return {
        "merchant_id": batch.merchant_id,
        "terminal_id": batch.terminal_id,
        "batch_no": batch.batch_no,
        "state": str(batch.state),
        "opened_at": batch.opened_at,
        "closed_at": batch.closed_at,
        "debit_count": batch.debit_count,
        "debit_amount": batch.debit_amount,
        "credit_count": batch.credit_count,
        "credit_amount": batch.credit_amount,
        "currency": batch.currency,
        "result": getattr(batch, "result", None),
    }


def txn_dict(txn: Txn) -> dict[str, Any]:
    return {
        "id": txn.id,
        "created_at": txn.created_at,
        "merchant_id": txn.merchant_id,
        "terminal_id": txn.terminal_id,
        "kind": str(txn.kind),
        "mti": txn.mti,
        "stan": txn.stan,
        "rrn": txn.rrn,
        "amount": txn.amount,
        "currency": txn.currency,
        "pan": txn.pan_masked,
        "response_code": txn.response_code,
        "status": str(txn.status),
    }


def exception_dict(case: ExceptionCase) -> dict[str, Any]:
    return {
        "id": case.id,
        "kind": case.kind,
        "merchant_id": case.merchant_id,
        "terminal_id": case.terminal_id,
        "original_rrn": case.original_rrn,
        "summary": case.summary,
        "details": case.details,
        "created_at": case.created_at,
        "status": "resolved" if case.resolved else "open",
        "resolved_at": case.resolved_at,
        "resolved_by": case.resolved_by,
        "resolution": case.resolution,
    }


def saf_dict(item: SafItem) -> dict[str, Any]:
    txn = item.txn
    return {
        "id": item.id,
        "action": item.action,
        "state": item.state,
        "queued_at": item.created_at,
        "attempts": item.attempts,
        "last_attempt_at": item.last_attempt_at,
        "finished_at": item.finished_at,
        "host_response_code": item.response_code,
        "last_error": item.last_error,
        "amount": item.amount,
        "record": txn_dict(txn),
    }
