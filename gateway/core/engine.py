"""One request through the ledger, sans-I/O.

:func:`process` is a generator: it yields the queries it needs (:class:`Query` subclasses) and
receives their answers, then returns a :class:`Plan` of what to write. Each ledger adapter (SQLite,
PostgreSQL) drives it inside one serialising transaction, answering queries with its own SQL, then
applies the plan and commits. The orchestration and the rules are therefore written once and tested
in memory.

Here: the request flow (duplicates, the original a correction names, the decision, the answer, the
events). The steps that concern batches (the open batch, the cut-off, settlement, batch upload) are in
:mod:`gateway.core.batches`; the queries, the plan and the context in :mod:`gateway.core.queries`; the
record and the events a plan carries are built by :mod:`gateway.core.records`.
"""

from __future__ import annotations

from datetime import datetime

from gateway.core.batches import batch_upload, close_if_past_cutoff, open_batch, settlement
from gateway.core.cards import keyed_sha256, pan_digest
from gateway.core.decide import Snapshot, TxnChange, decide
from gateway.core.events import CorrectionEvent
from gateway.core.host import host_request
from gateway.core.model import (
    ORIGINAL_KINDS,
    REVERSIBLE_KINDS,
    Batch,
    BatchState,
    ExceptionCase,
    Kind,
    Request,
    Txn,
    TxnStatus,
)
from gateway.core.policy import Velocity
from gateway.core.queries import (
    Context,
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
    StandingCorrections,
    Step,
    SubStep,
)
from gateway.core.reasons import Reason
from gateway.core.records import correction_event, new_record, saf_event, txn_line

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
        return (yield from settlement(request, pan_hmac, print_, ctx))
    if kind is Kind.BATCH_UPLOAD:
        return (yield from batch_upload(request, print_, ctx))

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
            original_batch = yield from close_if_past_cutoff(original_batch, ctx, events)
        if kind is Kind.REVERSAL and original is not None and original.kind is Kind.VOID and original.original_id:
            voided = yield GetTxn(original.original_id)
            if voided is not None and voided.kind is Kind.COMPLETION and voided.original_id is not None:
                voided_preauth = yield GetTxn(voided.original_id)
    if kind is Kind.REFUND and ctx.policy.velocity_limited:
        day_start = ctx.policy.day_start(ctx.now)
        velocity = yield RefundVelocity(request.merchant_id, request.terminal_id, pan_hmac, day_start)

    snapshot = Snapshot(pan_hmac, original, voided, voided_preauth, original_batch, tombstone, velocity, pending)
    decision = decide(request, snapshot, ctx.policy, ctx.now)
    batch = yield from open_batch(request, ctx, events)
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


__all__ = [
    "EVENT_KINDS",
    "Context",  # defined in gateway.core.queries; imported from here by the service, the app and the ledgers
    "apply_changes",
    "approval_code_for",
    "fingerprint",
    "process",
]
