"""Batches, settlement and the cut-off: the engine's steps that concern a terminal's batches, sans-I/O.

A request's record goes into its terminal's open batch (:func:`open_batch`), closed first if the daily
cut-off passed since it opened (:func:`close_if_past_cutoff`); the background sweep
(:func:`close_batches_at_cutoff`) closes those of terminals that stayed silent. A settlement (0500)
reconciles every batch no 0500 reconciled yet (:func:`settlement`); a UnionPay batch upload (0320) is
compared with the ledger's records of that batch (:func:`batch_upload`, with :mod:`gateway.core.uploads`).
A terminal signing on is told its batch number (:func:`batch_to_use`). The steps are generators of
queries like :func:`gateway.core.engine.process`, which calls them.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from gateway.core.decide import Decision
from gateway.core.events import CorrectionEvent
from gateway.core.model import (
    Batch,
    BatchState,
    ClosedBy,
    Kind,
    Request,
    SettlementTotals,
    Txn,
    TxnStatus,
    UploadedLine,
    next_batch_no,
)
from gateway.core.policy import Policy
from gateway.core.queries import (
    BatchClose,
    BatchTxns,
    CloseBatch,
    Context,
    CurrentBatch,
    Plan,
    StaleBatches,
    Step,
    SubStep,
    TerminalBatchTxns,
    UnreconciledBatches,
    UploadedLines,
)
from gateway.core.reasons import Reason
from gateway.core.records import correction_event, new_record, txn_line
from gateway.core.uploads import differences, kept_line


def open_batch(request: Request, ctx: Context, events: list[CorrectionEvent]) -> SubStep[Batch | None]:
    """The terminal's open batch for this request's record: a new one when the cut-off passed since the
    open one began (that one is closed first). Reversals open none (they belong with their original)."""
    create = request.kind is not Kind.REVERSAL
    batch: Batch | None = yield CurrentBatch(request.merchant_id, request.terminal_id, ctx.now, create)
    if batch is None:
        return None
    checked = yield from close_if_past_cutoff(batch, ctx, events)
    if checked is batch:
        return batch
    reopened: Batch | None = yield CurrentBatch(request.merchant_id, request.terminal_id, ctx.now, create)
    return reopened


def close_if_past_cutoff(batch: Batch | None, ctx: Context, events: list[CorrectionEvent]) -> SubStep[Batch | None]:
    """``batch`` as it stands at ``ctx.now``: an open batch opened before the latest cut-off is closed
    at that cut-off now, whatever the background sweep did yet (design §5: the cut-off is effective
    from its instant). Returns the batch unchanged when nothing was past it."""
    if batch is None or batch.state is not BatchState.OPEN:
        return batch
    cutoff = ctx.policy.last_cutoff(ctx.now)
    if cutoff is None or batch.opened_at >= cutoff:
        return batch
    yield from _close_at_cutoff(batch, cutoff, events)
    return replace(batch, state=BatchState.CLOSED, closed_at=cutoff, closed_by=ClosedBy.CUTOFF)


def _close_at_cutoff(batch: Batch, cutoff: datetime, events: list[CorrectionEvent]) -> SubStep[None]:
    closed: bool = yield CloseBatch(batch.id, cutoff)
    if closed:  # else another transaction closed it first, and published its event
        txns: list[Txn] = yield BatchTxns(batch.id)
        events.append(_batch_closed_event(batch, cutoff, ledger_totals(txns)))


def batch_to_use(latest: Batch | None, policy: Policy, now: datetime) -> str:
    """The batch number a terminal signing on is to use: its open batch's, else the number its next
    transaction opens (after a settlement, or once the cut-off passed its open batch, the next one)."""
    if latest is None:
        return next_batch_no(None)
    cutoff = policy.last_cutoff(now)
    if latest.state is BatchState.OPEN and (cutoff is None or latest.opened_at >= cutoff):
        return latest.batch_no
    return next_batch_no(latest.batch_no)


def close_batches_at_cutoff(policy: Policy, now: datetime) -> SubStep[list[CorrectionEvent]]:
    """The cut-off sweep: close every batch still open though the latest cut-off passed since it
    opened (terminals that forgot to settle, and were silent since), with a ``pos.batch.closed``
    event each. Requests close their own terminal's batches themselves (:func:`gateway.core.engine.process`)."""
    events: list[CorrectionEvent] = []
    cutoff = policy.last_cutoff(now)
    if cutoff is None:
        return events
    stale: list[Batch] = yield StaleBatches(cutoff)
    for batch in stale:
        yield from _close_at_cutoff(batch, cutoff, events)
    return events


def settlement(request: Request, pan_hmac: str | None, print_: str, ctx: Context) -> Step:
    """A 0500 reconciles every batch of the terminal that no 0500 reconciled yet: the open one and those
    the cut-off closed (the terminal does not know about the cut-off, its totals cover them all)."""
    totals = request.totals or SettlementTotals(0, 0, 0, 0)
    events: list[CorrectionEvent] = []
    current: Batch | None = yield CurrentBatch(
        request.merchant_id, request.terminal_id, ctx.now, create=False, exclusive=True
    )
    current = yield from close_if_past_cutoff(current, ctx, events)
    if current is not None and current.state is not BatchState.OPEN:
        current = None  # closed by the cut-off just now: it is among the unreconciled ones below
    batches: list[Batch] = yield UnreconciledBatches(request.merchant_id, request.terminal_id)
    if current is not None:
        batches = [*batches, current]
    txns: list[Txn] = []
    for batch in batches:
        txns += yield BatchTxns(batch.id)
    ledger = ledger_totals(txns)
    matched = ledger == totals
    reason = Reason.APPROVED if matched else Reason.SETTLEMENT_MISMATCH
    result = "settled" if matched else "mismatch"
    code = ctx.response_code(reason.value)
    decision = Decision(reason, outcome=result)
    last = batches[-1] if batches else None
    record = new_record(request, decision, code, None, None, pan_hmac, print_, None, last, ctx)
    closes = tuple(BatchClose(batch.id, ctx.now, result, totals, ledger) for batch in batches)
    plan = Plan(code, reason, None, None, record, batch_closes=closes, events=events)
    details: dict[str, object] = {
        "batch": last.batch_no if last is not None else None,
        "batches": [batch.batch_no for batch in batches],
        "terminal_totals": _totals_dict(totals),
        "ledger_totals": _totals_dict(ledger),
    }
    if not matched:
        details["transactions"] = [txn_line(txn) for txn in txns if txn.kind is not Kind.SETTLEMENT]
    plan.events.append(correction_event("batch", decision.outcome, request, record, None, code=code, details=details))
    return plan


def batch_upload(request: Request, print_: str, ctx: Context) -> Step:
    """A batch upload's lines are kept (cards masked and keyed-hashed); its end compares them with the
    ledger's records of that batch and publishes ``pos.batch.mismatch`` listing every transaction the two
    disagree on (:func:`gateway.core.uploads.differences`), or ``pos.batch.settled`` when they agree."""
    code = ctx.response_code(Reason.APPROVED)
    record = new_record(request, Decision(Reason.APPROVED), code, None, None, None, print_, None, None, ctx)
    plan = Plan(code, Reason.APPROVED, None, None, record)
    batch_no = request.terminal_batch or ""
    merchant, terminal = request.merchant_id, request.terminal_id
    if request.uploads:
        # the ledger's cards of these traces tell a PAN ending in 0 from the zeros that fill the field
        recorded = {txn.stan: txn.pan_hmac for txn in (yield TerminalBatchTxns(merchant, terminal, batch_no))}
        plan.uploads = tuple(kept_line(line, ctx.pan_key, recorded.get(line.stan)) for line in request.uploads)
    if request.upload_complete:
        txns: list[Txn] = yield TerminalBatchTxns(merchant, terminal, batch_no)
        uploaded: list[UploadedLine] = yield UploadedLines(merchant, terminal, batch_no)
        found = differences(txns, uploaded)
        details: dict[str, object] = {"batch": batch_no, "stage": "batch_upload", "uploaded": len(uploaded),
                                      "differences": found}  # fmt: skip
        event = correction_event("batch", "mismatch" if found else "settled", request, record, None, code=code,
                                 details=details)  # fmt: skip
        plan.events.append(replace(event, reason=Reason.SETTLEMENT_MISMATCH.value) if found else event)
    return plan


def _batch_closed_event(batch: Batch, cutoff: datetime, totals: SettlementTotals) -> CorrectionEvent:
    """``pos.batch.closed``: the gateway closed a batch at the cut-off, on its own (no request, no answer)."""
    return CorrectionEvent(
        kind="batch",
        outcome="closed",
        merchant_id=batch.merchant_id,
        terminal_id=batch.terminal_id,
        response_code=None,
        reason=ClosedBy.CUTOFF.value,
        subject_rrn=f"batch-{batch.batch_no}",
        request=None,
        details={
            "batch": batch.batch_no,
            "opened_at": batch.opened_at.isoformat(),
            "closed_at": cutoff.isoformat(),
            "ledger_totals": _totals_dict(totals),
        },
    )


def ledger_totals(txns: list[Txn]) -> SettlementTotals:
    """Debits: purchases and completions; credits: refunds; voided and reversed ones excluded."""
    debit_count = debit_amount = credit_count = credit_amount = 0
    for txn in txns:
        if txn.status is not TxnStatus.APPROVED:
            continue
        if txn.kind in (Kind.PURCHASE, Kind.COMPLETION):
            debit_count += 1
            debit_amount += txn.effective_amount
        elif txn.kind is Kind.REFUND:
            credit_count += 1
            credit_amount += txn.effective_amount
    return SettlementTotals(credit_count, credit_amount, debit_count, debit_amount)


def _totals_dict(totals: SettlementTotals) -> dict[str, object]:
    return {
        "credit_count": totals.credit_count,
        "credit_amount": totals.credit_amount,
        "debit_count": totals.debit_count,
        "debit_amount": totals.debit_amount,
    }


__all__ = [
    "batch_to_use",
    "batch_upload",
    "close_batches_at_cutoff",
    "close_if_past_cutoff",
    "ledger_totals",
    "open_batch",
    "settlement",
]
