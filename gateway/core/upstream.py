"""The acquirer host's answer to a pending record, sans-I/O (design §5, "Upstream host").

With an upstream configured, :func:`gateway.core.engine.process` records an approved purchase,
pre-auth, void, refund or completion as *pending* (it reserves what it would take from its original:
the rules count pending corrections) and the service sends it to the host with no transaction open.
:func:`conclude` then decides, in a second transaction, what the host's answer (or its absence) makes
of the record:

- the host answered: its DE39 and DE38 are the terminal's answer. Approved, the correction's changes
  are decided again against the original as it stands now (the reservation kept every refusable
  request away; only a reversal advice, which cannot be refused, may have changed it: then the
  changes are not applied and an operator gets a case). Declined, nothing changes.
- no answer in time (or the gateway stopped before it came): 91 ``upstream_timeout`` and a reversal
  for the host in the store-and-forward queue, since the host may have approved it.
- no connection to the host (nothing was sent): 91 ``upstream_unavailable``, or, with
  ``policy.standin_when_down``, the stand-in rules decide and an advice for the host is queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.decide import Snapshot, decide, decide_standin
from gateway.core.engine import EVENT_KINDS, apply_changes, approval_code_for
from gateway.core.model import Kind, Request, Txn, TxnStatus
from gateway.core.queries import Context, GetBatch, GetTxn, Outcome, PendingCorrections, Plan, SafEntry, Step
from gateway.core.reasons import Reason
from gateway.core.records import correction_event, saf_event

#: the host's code for an approval (ISO 8583: 00; some hosts answer 08 "honour with identification")
HOST_APPROVED = frozenset({"00", "08", "10", "11"})


@dataclass(frozen=True, slots=True)
class HostAnswer:
    """The host answered: its DE39, and DE38 when it approved."""

    response_code: str
    approval_code: str | None = None


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """The host did not answer: ``sent`` when the request went out (or may have), False when there was no
    connection to send it on."""

    sent: bool


def conclude(txn_id: int, request: Request | None, result: HostAnswer | NoAnswer, ctx: Context) -> Step:
    """Decide what ``result`` makes of the pending record ``txn_id``. ``request`` is the terminal's
    request (in memory: it holds the PAN); None when the gateway restarted since, and then ``result``
    can only be a :class:`NoAnswer` that was sent (the host may have it)."""
    record: Txn | None = yield GetTxn(txn_id)
    if record is None:
        raise LookupError(f"no record {txn_id}")
    if record.status is not TxnStatus.PENDING:
        # concluded meanwhile without this answer: reversed by the terminal, or given up as unanswered
        # (its reversal is queued for the host either way): the terminal gets what the ledger says
        reason = Reason(record.reason) if record.reason else Reason.UPSTREAM_TIMEOUT
        return Plan(record.response_code, reason, record.rrn, None)
    original: Txn | None = (yield GetTxn(record.original_id)) if record.original_id is not None else None

    if isinstance(result, HostAnswer):
        if result.response_code in HOST_APPROVED:
            return (yield from _approve(record, original, request, result.response_code, result.approval_code, ctx))
        return _decline(record, original, request, result.response_code, Reason.UPSTREAM_DECLINED)
    if result.sent:
        plan = _decline(record, original, request, ctx.response_code(Reason.UPSTREAM_TIMEOUT), Reason.UPSTREAM_TIMEOUT)
        plan.saf.append(SafEntry(record.id, "reverse"))
        plan.events.append(saf_event("reversal_queued", record, reason=Reason.UPSTREAM_TIMEOUT.value))
        return plan
    if not ctx.policy.standin_when_down or request is None:
        code = ctx.response_code(Reason.UPSTREAM_UNAVAILABLE)
        return _decline(record, original, request, code, Reason.UPSTREAM_UNAVAILABLE)
    # stand in: purchases and pre-auths by the stand-in rules, corrections as the rules approved them
    if record.kind in (Kind.PURCHASE, Kind.PREAUTH):
        standin = decide_standin(request, Snapshot(), ctx.policy, record.created_at)
        if not standin.approved:
            return _decline(record, original, request, ctx.response_code(standin.reason), standin.reason)
    assert record.rrn is not None
    approval = approval_code_for(ctx.pan_key, record.rrn)
    plan = yield from _approve(record, original, request, ctx.response_code(Reason.APPROVED), approval, ctx)
    if plan.outcome is not None and plan.outcome.status is TxnStatus.APPROVED:
        plan.saf.append(SafEntry(record.id, "advise"))
    return plan


def _approve(
    record: Txn, original: Txn | None, request: Request | None, code: str, approval: str | None, ctx: Context
) -> Step:
    approved = Outcome(record.id, TxnStatus.APPROVED, code, None, approval)
    plan = Plan(code, Reason.APPROVED, record.rrn, approval, outcome=approved)
    kind_name = EVENT_KINDS.get(record.kind)
    if kind_name is None or original is None or request is None:
        return plan  # a purchase or pre-auth (no event), or an unreferenced refund
    # decided again as the original stands now, this record's own reservation left out
    others = [txn for txn in (yield PendingCorrections(original.id)) if txn.id != record.id]
    batch = (yield GetBatch(original.batch_id)) if original.batch_id is not None else None
    snapshot = Snapshot(record.pan_hmac, original, original_batch=batch, pending=tuple(others))
    decision = decide(request, snapshot, ctx.policy, record.created_at)
    if not decision.approved:
        # only a reversal advice can have changed the original since: the host moved the money, the
        # ledger cannot; an operator resolves it
        plan.events.append(correction_event(kind_name, "conflict", request, _as(record, approved), original,
                                  code=code, details={"upstream_conflict": str(decision.reason)}))  # fmt: skip
        return plan
    plan.changes = decision.changes
    after = apply_changes(original, decision.changes)
    plan.events.append(correction_event(kind_name, "approved", request, _as(record, approved), after))
    return plan


def _decline(record: Txn, original: Txn | None, request: Request | None, code: str, reason: Reason) -> Plan:
    outcome = Outcome(record.id, TxnStatus.DECLINED, code, reason.value, None)
    plan = Plan(code, reason, record.rrn, None, outcome=outcome)
    kind_name = EVENT_KINDS.get(record.kind)
    if kind_name is not None and request is not None:
        plan.events.append(correction_event(kind_name, "declined", request, _as(record, outcome), original))
    return plan


def _as(record: Txn, outcome: Outcome) -> Txn:
    """The record as its outcome leaves it (for its event)."""
    after = record.copy()
    after.status, after.response_code, after.reason = outcome.status, outcome.response_code, outcome.reason
    after.approval_code = outcome.approval_code
    return after
