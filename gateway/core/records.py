"""What a request leaves behind: its ledger record and the correction events about records.

:func:`new_record` builds the record a plan writes for a request; :func:`correction_event` and
:func:`saf_event` build the facts (:mod:`gateway.core.events`) a plan publishes. Shared by the request
flow (:mod:`gateway.core.engine`), batches and settlement (:mod:`gateway.core.batches`) and the acquirer
host's answers (:mod:`gateway.core.upstream`). Pure.
"""

from __future__ import annotations

from gateway.core.decide import Decision
from gateway.core.events import BalanceInfo, CorrectionEvent, OriginalInfo, RequestInfo
from gateway.core.model import Batch, Kind, Request, Txn, TxnStatus, balance_status
from gateway.core.queries import Context
from gateway.core.reasons import Reason


def new_record(
    request: Request,
    decision: Decision,
    code: str,
    rrn: str | None,
    approval: str | None,
    pan_hmac: str | None,
    print_: str,
    original: Txn | None,
    batch: Batch | None,
    ctx: Context,
) -> Txn:
    """The record a plan writes for ``request`` (the ledger gives it its id)."""
    amount = request.amount or 0
    approved = decision.reason is Reason.APPROVED
    return Txn(
        id=0,  # the ledger's
        kind=request.kind,
        mti=request.mti,
        processing_code=request.processing_code,
        merchant_id=request.merchant_id,
        terminal_id=request.terminal_id,
        stan=request.stan,
        transmission_time=request.transmission_time,
        amount=amount,
        currency=request.currency or "",
        pan_masked=request.masked_pan,
        pan_hmac=pan_hmac,
        rrn=rrn,
        approval_code=approval,
        response_code=code,
        reason=None if approved else str(decision.reason),
        status=_record_status(request, decision),
        effective_amount=amount,
        refunded_amount=0,
        completed=False,
        original_id=original.id if original is not None else None,
        batch_id=batch.id if batch is not None else None,
        created_at=ctx.now,
        fingerprint=print_,
        reference=request.reference,
        terminal_batch=request.terminal_batch,
    )


def _record_status(request: Request, decision: Decision) -> TxnStatus:
    if request.kind is Kind.REVERSAL and decision.outcome == "unmatched":
        return TxnStatus.UNMATCHED  # a tombstone: refuses the request it names, should it come
    return TxnStatus.APPROVED if decision.approved else TxnStatus.DECLINED


def txn_line(txn: Txn) -> dict[str, object]:
    """A record as an event's details list it (a conflict's refunds, a mismatched settlement's records)."""
    return {
        "kind": txn.kind.value,
        "mti": txn.mti,
        "stan": txn.stan,
        "rrn": txn.rrn,
        "amount": txn.effective_amount,
        "currency": txn.currency,
        "status": txn.status.value,
        "response_code": txn.response_code,
    }


#: the reason a conflict's event and exception give (the reversal itself is approved: 00)
CONFLICT_REASON = "credited_beyond_original"


def original_info(txn: Txn) -> OriginalInfo:
    return OriginalInfo(
        mti=txn.mti,
        stan=txn.stan,
        rrn=txn.rrn or "",
        approval_code=txn.approval_code,
        amount=txn.amount,
        currency=txn.currency,
        batch=str(txn.batch_id or 0).zfill(6),
        approved_at=txn.created_at,
    )


def balance_info(txn: Txn) -> BalanceInfo:
    return BalanceInfo(
        original_amount=txn.amount,
        refunded=txn.refunded_amount,
        reversed=txn.amount - txn.effective_amount if txn.status is not TxnStatus.REVERSED else txn.amount,
        refundable=txn.refundable,
        status=balance_status(txn),
    )


def _event_reason(kind: str, outcome: str, record: Txn | None) -> str | None:
    if record is not None and record.reason is not None:
        return record.reason
    if outcome == "late":
        return "reversed_after_settlement"
    if outcome == "unmatched":
        return Reason.REVERSAL_UNMATCHED.value
    if outcome == "conflict":
        return CONFLICT_REASON if kind == "reversal" else Reason.DUPLICATE_CONFLICT.value
    return None


def correction_event(
    kind: str,
    outcome: str,
    request: Request,
    record: Txn | None,
    original: Txn | None,
    *,
    earlier: Txn | None = None,
    code: str | None = None,
    details: dict[str, object] | None = None,
) -> CorrectionEvent:
    source = record or earlier
    rrn = record.rrn if record is not None else (earlier.rrn if earlier is not None else None)
    info = RequestInfo(request.mti, request.stan, rrn, request.amount, request.currency, request.masked_pan)
    extra = dict(details or {})
    if earlier is not None:
        extra["first_response_code"] = earlier.response_code
        extra["first_received_at"] = earlier.created_at.isoformat()
    return CorrectionEvent(
        kind=kind,
        outcome=outcome,
        merchant_id=request.merchant_id,
        terminal_id=request.terminal_id,
        response_code=code or (source.response_code if source is not None else "00"),
        reason=_event_reason(kind, outcome, record),
        subject_rrn=(original.rrn if original is not None and original.rrn else rrn) or request.stan,
        request=info,
        original=original_info(original) if original is not None else None,
        balance=balance_info(original) if original is not None else None,
        details=extra,
    )


def saf_event(outcome: str, txn: Txn, *, reason: str | None = None, details: dict[str, object] | None = None
              ) -> CorrectionEvent:  # fmt: skip
    """``pos.upstream.<outcome>`` (reversal_queued, reversal_acknowledged, reversal_failed) about the record
    the host gets a reversal for."""
    return CorrectionEvent(
        kind="upstream",
        outcome=outcome,
        merchant_id=txn.merchant_id,
        terminal_id=txn.terminal_id,
        response_code=None,
        reason=reason,
        subject_rrn=txn.rrn or txn.stan,
        request=RequestInfo(txn.mti, txn.stan, txn.rrn, txn.amount, txn.currency, txn.pan_masked),
        original=original_info(txn) if txn.rrn else None,
        details=details or {},
    )


__all__ = [
    "CONFLICT_REASON",
    "balance_info",
    "correction_event",
    "new_record",
    "original_info",
    "saf_event",
    "txn_line",
]
