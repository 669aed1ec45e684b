"""One request through the ledger, sans-I/O.

:func:`process` is a generator: it yields the queries it needs (:class:`Query` subclasses) and
receives their answers, then returns a :class:`Plan` of what to write. Each ledger adapter (SQLite,
PostgreSQL) drives it inside one serialising transaction, answering queries with its own SQL, then
applies the plan and commits. The orchestration and the rules are therefore written once and tested
in memory.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from gateway.core.cards import keyed_sha256, pan_digest
from gateway.core.decide import Decision, Snapshot, TxnChange, decide
from gateway.core.events import CorrectionEvent
from gateway.core.host import host_request
from gateway.core.model import (
    ORIGINAL_KINDS,
    REVERSIBLE_KINDS,
    Batch,
    BatchState,
    ClosedBy,
    ExceptionCase,
    Kind,
    Request,
    SettlementTotals,
    Txn,
    TxnStatus,
    UploadedLine,
    next_batch_no,
)
from gateway.core.policy import Policy, Velocity
from gateway.core.queries import (
    BatchClose,
    BatchTxns,
    CloseBatch,
    Context,
    CurrentBatch,
    FindDuplicate,
    FindOriginal,
    FindTombstone,
    GetBatch,
    GetTxn,
    NextRrn,
    PendingCorrections,
    Plan,
    RefundVelocity,
    SafEntry,
    StaleBatches,
    StandingCorrections,
    Step,
    SubStep,
    TerminalBatchTxns,
    UnreconciledBatches,
    UploadedLines,
)
from gateway.core.reasons import Reason
from gateway.core.records import correction_event, new_record, saf_event, txn_line
from gateway.core.uploads import differences, kept_line

_NEXT_RRN = NextRrn()
_NO_REFUNDS = Velocity()  #: immutable: one value serves every request that does not look refunds up

#: kinds that answer with a gateway RRN (DE37) and, approved, an approval code (DE38)
_RRN_KINDS = frozenset({Kind.PURCHASE, Kind.PREAUTH, Kind.COMPLETION, Kind.VOID, Kind.REFUND})
#: corrections publish events; plain purchases and pre-auths do not
EVENT_KINDS = {Kind.VOID: "void", Kind.REFUND: "refund", Kind.COMPLETION: "completion", Kind.REVERSAL: "reversal"}


#: 32 characters without I and O (easily misread on receipts)
_APPROVAL_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWX"


#: byte -> the character ``_APPROVAL_ALPHABET[byte % 32]``, for ``bytes.translate``
_APPROVAL_TABLE = bytes(ord(_APPROVAL_ALPHABET[byte % 32]) for byte in range(256))


def approval_code_for(key: bytes, rrn: str) -> str:
    """A 6-character approval code (DE38): a keyed hash (HMAC-SHA256 under the installation's key) of
    the unique RRN, so that codes are neither predictable from RRNs nor the same in every installation."""
    return keyed_sha256(key, b"DE38:" + rrn.encode())[:6].translate(_APPROVAL_TABLE).decode()


def fingerprint(key: bytes, request: Request) -> str:
    """Keyed hash of DE2, 3, 4, 37, 49 and 90: what a retransmission must repeat exactly."""
    reference = request.reference
    content = "|".join(
        (
            request.pan or "",
            request.processing_code,
            "" if request.amount is None else str(request.amount),
            request.currency or "",
            request.original_data or "",
            (reference.rrn or "") if reference is not None else "",
        )
    )
    return keyed_sha256(key, content.encode())[:16].hex()


def process(request: Request, ctx: Context) -> Step:
    """Decide one financial request against the ledger and plan what to record."""
    pan_hmac = pan_digest(ctx.pan_key, request.pan) if request.pan else None
    print_ = fingerprint(ctx.pan_key, request)
    since = ctx.now - ctx.policy.duplicate_ttl
    mti_class = request.mti_class
    earlier: Txn | None = yield FindDuplicate(
        request.merchant_id, request.terminal_id, request.stan, mti_class, since
    )
    if earlier is not None:
        return _duplicate(request, earlier, print_, ctx)
    kind = request.kind
    if kind is Kind.SETTLEMENT:
        return (yield from _settlement(request, pan_hmac, print_, ctx))
    if kind is Kind.BATCH_UPLOAD:
        return (yield from _batch_upload(request, print_, ctx))

    #: events of batches this request found past the cut-off (closed now, before it is decided)
    events: list[CorrectionEvent] = []
    original: Txn | None = None
    original_batch: Batch | None = None
    voided: Txn | None = None
    voided_preauth: Txn | None = None
    tombstone: Txn | None = None
    velocity = _NO_REFUNDS
    if kind is not Kind.REVERSAL:
        tombstone = yield FindTombstone(
            request.merchant_id, request.terminal_id, request.stan, mti_class, request.amount or 0, since
        )
    pending: tuple[Txn, ...] = ()
    if kind is not Kind.PURCHASE and kind is not Kind.PREAUTH:
        original = yield from _find_original(request, pan_hmac, since)
        if original is not None and ctx.policy.forward:
            pending = tuple((yield PendingCorrections(original.id)))
        if original is not None and original.batch_id is not None:
            original_batch = yield GetBatch(original.batch_id)
            original_batch = yield from _close_if_past_cutoff(original_batch, ctx, events)
        if kind is Kind.REVERSAL and original is not None and original.kind is Kind.VOID and original.original_id:
            voided = yield GetTxn(original.original_id)
            if voided is not None and voided.kind is Kind.COMPLETION and voided.original_id is not None:
                voided_preauth = yield GetTxn(voided.original_id)
    if kind is Kind.REFUND and ctx.policy.velocity_limited:
        day_start = ctx.policy.day_start(ctx.now)
        velocity = yield RefundVelocity(request.merchant_id, request.terminal_id, pan_hmac, day_start)

    snapshot = Snapshot(pan_hmac, original, voided, voided_preauth, original_batch, tombstone, velocity, pending)
    decision = decide(request, snapshot, ctx.policy, ctx.now)
    batch = yield from _open_batch(request, ctx, events)
    rrn: str | None = (yield _NEXT_RRN) if kind in _RRN_KINDS else None
    code = ctx.response_code(decision.reason)  # a StrEnum: the profile's table takes it as its text
    approved = rrn is not None and decision.reason is Reason.APPROVED
    if approved and kind in ctx.policy.forward:
        # the host decides: recorded pending (reserving what it would take), answered once it answers
        record = new_record(request, decision, code, rrn, None, pan_hmac, print_, original, batch, ctx)
        record.status, record.response_code = TxnStatus.PENDING, ctx.response_code(Reason.UPSTREAM_TIMEOUT)
        plan = Plan(record.response_code, Reason.UPSTREAM_PENDING, rrn, None, record, events=events)
        plan.host = host_request(record, original)
        return plan
    approval = approval_code_for(ctx.pan_key, rrn) if approved and rrn is not None else None
    record = new_record(request, decision, code, rrn, approval, pan_hmac, print_, original, batch, ctx)
    plan = Plan(code, decision.reason, rrn, approval, record, decision.changes, events=events)
    if kind is Kind.REVERSAL and original is not None and original.kind in ctx.policy.forward and decision.changes:
        # the host has it (or may): it gets the reversal too, through the store-and-forward queue
        partial = request.replacement_amount if original.kind is not Kind.VOID else None
        plan.saf.append(SafEntry(original.id, "reverse", partial if partial and partial < original.effective_amount
                                 else None))  # fmt: skip
        plan.events.append(saf_event("reversal_queued", original, reason="terminal_reversal"))
    kind_name = EVENT_KINDS.get(kind)
    if kind_name is not None:
        if decision.repeat:
            kind_name = "duplicate"
        after = apply_changes(original, decision.changes) if original is not None else None
        details: dict[str, object] = {}
        if decision.outcome == "conflict" and original is not None and after is not None:
            # what stands against the original, or against the pre-auth whose completion's void it reverses
            credited = voided_preauth or original
            standing: list[Txn] = yield StandingCorrections(credited.id)
            late = original_batch is not None and original_batch.state is BatchState.CLOSED
            details = _conflict_details(original, after, standing, late=late)
            plan.exception = _conflict_case(request, credited, details, ctx.now)
        event = correction_event(kind_name, decision.outcome, request, record, after or original, details=details)
        plan.events.append(event)
    return plan


def _open_batch(request: Request, ctx: Context, events: list[CorrectionEvent]) -> SubStep[Batch | None]:
    """The terminal's open batch for this request's record: a new one when the cut-off passed since the
    open one began (that one is closed first). Reversals open none (they belong with their original)."""
    create = request.kind is not Kind.REVERSAL
    batch: Batch | None = yield CurrentBatch(request.merchant_id, request.terminal_id, ctx.now, create)
    if batch is None:
        return None
    checked = yield from _close_if_past_cutoff(batch, ctx, events)
    if checked is batch:
        return batch
    reopened: Batch | None = yield CurrentBatch(request.merchant_id, request.terminal_id, ctx.now, create)
    return reopened


def _close_if_past_cutoff(batch: Batch | None, ctx: Context, events: list[CorrectionEvent]) -> SubStep[Batch | None]:
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
    event each. Requests close their own terminal's batches themselves (:func:`process`)."""
    events: list[CorrectionEvent] = []
    cutoff = policy.last_cutoff(now)
    if cutoff is None:
        return events
    stale: list[Batch] = yield StaleBatches(cutoff)
    for batch in stale:
        yield from _close_at_cutoff(batch, cutoff, events)
    return events


#: what each correction may point at (a void or refund finds refunds and voids too, to refuse them clearly)
_ORIGINAL_KINDS_FOR = {
    Kind.VOID: frozenset({Kind.PURCHASE, Kind.COMPLETION, Kind.PREAUTH, Kind.REFUND, Kind.VOID}),
    Kind.REFUND: frozenset(ORIGINAL_KINDS | {Kind.REFUND, Kind.VOID}),
    Kind.COMPLETION: frozenset(ORIGINAL_KINDS),
    Kind.REVERSAL: frozenset(REVERSIBLE_KINDS),
}


def _find_original(request: Request, pan_hmac: str | None, since: datetime) -> SubStep[Txn | None]:
    """The original a correction names (design §4 and §5, "Reversal" and "Duplicates")."""
    ref = request.reference
    if ref is None:  # an unreferenced refund
        return None
    merchant, terminal, kinds = request.merchant_id, request.terminal_id, _ORIGINAL_KINDS_FOR[request.kind]
    reversal = request.kind is Kind.REVERSAL
    found: Txn | None
    if ref.rrn is not None:
        found = yield FindOriginal(merchant, terminal, kinds, rrn=ref.rrn)
    elif ref.stan is not None:  # DE90: MTI + STAN + DE7 as sent, else MTI + STAN on this terminal lately
        # (a UnionPay void without DE37 names only the original trace, DE61.2: the latter alone)
        mti_class = ref.mti[:3] if ref.mti else None
        found = None
        if ref.transmission_time is not None:
            found = yield FindOriginal(
                merchant, terminal, kinds, mti_class=mti_class, stan=ref.stan, transmission_time=ref.transmission_time
            )
        if found is None or (reversal and found.terminal_id != terminal):
            found = yield FindOriginal(merchant, terminal, kinds, mti_class=mti_class, stan=ref.stan, since=since)
    elif ref.approval_code is not None:
        found = yield FindOriginal(merchant, terminal, kinds, approval_code=ref.approval_code, pan_hmac=pan_hmac)
    else:
        # a reversal without DE90: this terminal's latest request with its STAN, recent, of the same amount
        found = yield FindOriginal(merchant, terminal, kinds, stan=request.stan, since=since)
        if found is not None and found.amount != request.amount:
            return None
    if found is not None and reversal and found.terminal_id != terminal:
        return None  # a terminal reverses only its own requests
    return found


def apply_changes(original: Txn, changes: tuple[TxnChange, ...]) -> Txn:
    """The original as it stands after the decision's changes (for the event's balance)."""
    after = original.copy()
    for change in changes:
        if change.txn_id != original.id:
            continue
        if change.status is not None:
            after.status = change.status
        after.refunded_amount += change.refunded_delta
        if change.effective_amount is not None:
            after.effective_amount = change.effective_amount
        if change.completed is not None:
            after.completed = change.completed
    return after


def _conflict_details(before: Txn, after: Txn, standing: list[Txn], *, late: bool) -> dict[str, object]:
    """What an operator needs to resolve a reversal advice applied over refunds or a completion."""
    remaining = 0 if after.status is TxnStatus.REVERSED else after.effective_amount
    refunds = [txn for txn in standing if txn.kind is Kind.REFUND]
    completions = [txn for txn in standing if txn.kind is Kind.COMPLETION]
    return {
        "reversed_amount": before.effective_amount - remaining,
        "refunded_amount": before.refunded_amount,
        "completed_amount": sum(txn.effective_amount for txn in completions),
        #: what the card got back beyond what still stands of the original
        "credited_beyond": max(0, before.refunded_amount - remaining),
        "after_settlement": late,
        "refunds": [txn_line(txn) for txn in refunds],
        "completions": [txn_line(txn) for txn in completions],
    }


def _conflict_case(request: Request, credited: Txn, details: dict[str, object], now: datetime) -> ExceptionCase:
    """The operator's case about ``credited``: the original the card was credited beyond (for a reversed
    completion's void, the pre-auth now captured twice)."""
    if credited.kind is Kind.PREAUTH:
        standing = f"{details['completed_amount']} completed"
    else:
        standing = f"{details['refunded_amount']} refunded"
    summary = (
        f"reversal advice {request.mti} STAN {request.stan} reversed {details['reversed_amount']}; "
        f"{credited.kind} {credited.rrn or credited.stan} stands with {standing}"
    )
    return ExceptionCase(
        0, "reversal_conflict", request.merchant_id, request.terminal_id, credited.rrn, summary, details, now
    )


def _duplicate(request: Request, earlier: Txn, print_: str, ctx: Context) -> Plan:
    if earlier.fingerprint != print_:
        code = ctx.response_code(Reason.DUPLICATE_CONFLICT.value)
        plan = Plan(code, Reason.DUPLICATE_CONFLICT, None, None, replayed=False)
        plan.events.append(correction_event("duplicate", "conflict", request, None, None, earlier=earlier, code=code))
        return plan
    if earlier.status is TxnStatus.PENDING:
        # the first copy awaits the host's answer: the service repeats that answer when it comes (else 09)
        code = ctx.response_code(Reason.UPSTREAM_PENDING)
        return Plan(code, Reason.UPSTREAM_PENDING, earlier.rrn, None, replayed=True, replay_of=earlier.id)
    reason = Reason(earlier.reason) if earlier.reason else Reason.APPROVED
    plan = Plan(earlier.response_code, reason, earlier.rrn, earlier.approval_code, replayed=True, replay_of=earlier.id)
    plan.events.append(correction_event("duplicate", "replayed", request, None, None, earlier=earlier))
    return plan


def _settlement(request: Request, pan_hmac: str | None, print_: str, ctx: Context) -> Step:
    """A 0500 reconciles every batch of the terminal that no 0500 reconciled yet: the open one and those
    the cut-off closed (the terminal does not know about the cut-off, its totals cover them all)."""
    totals = request.totals or SettlementTotals(0, 0, 0, 0)
    events: list[CorrectionEvent] = []
    current: Batch | None = yield CurrentBatch(
        request.merchant_id, request.terminal_id, ctx.now, create=False, exclusive=True
    )
    current = yield from _close_if_past_cutoff(current, ctx, events)
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


def _batch_upload(request: Request, print_: str, ctx: Context) -> Step:
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
    "EVENT_KINDS",
    "Context",  # defined in gateway.core.queries; imported from here by the service, the app and the ledgers
    "apply_changes",
    "approval_code_for",
    "batch_to_use",
    "close_batches_at_cutoff",
    "fingerprint",
    "ledger_totals",
    "process",
]
