"""A state machine over the real SQLite ledger driving the pure engine.

Random sequences of purchases, pre-auths, completions, voids, refunds (at either terminal), reversals
(full, partial, requests and advices, by DE90 with the right or a restamped DE7, or by STAN alone with
the right or a wrong amount, from the original's terminal or another one), corrections whose reversal
advice overtook them, settlements with the right or wrong totals, retransmissions (with a new DE7, or
with other content) and time passing across daily cut-offs and the duplicate window. After every step:

- money out never exceeds money in for an original, and every credit beyond it raised an operator case:
  the approved refunds standing against a purchase or completion never exceed what stands of it (its
  effective amount, nothing once reversed), and a pre-auth has at most one approved completion, unless
  the ledger holds a ``reversal_conflict`` case naming that original;
- no refund was ever approved beyond the original's refundable balance at that moment;
- REVERSED records stay reversed; VOIDED ones stay voided unless their void was reversed;
- a retransmission changes nothing and gets the first answer; other content gets 94;
- a reversal names only its own terminal's requests (another terminal's changes nothing), a STAN-only
  one only a recent request of the same amount, a DE90 one with a wrong DE7 only a recent request;
- a correction whose reversal advice arrived first is refused with ``reversed_before_arrival``;
- a void of a sale from before the latest cut-off is never approved;
- a 0500 with the ledger's totals of every unreconciled batch answers 00, other totals 95;
- the balances the ledger stores equal a fold over its records.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import uuid
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from gateway.adapters.ledger import SqliteLedger
from gateway.core.engine import Context
from gateway.core.model import Kind, Reference, Request, SettlementTotals, Txn, TxnStatus
from gateway.core.policy import Policy
from gateway.core.reasons import ISO87_CODES
from gateway.events import render_event
from gateway.ports import LedgerResult

CARDS = ("4761739001010119", "4111111111111111")
MID = "MERCHANT0000001"
TERMINALS = ("TERM0001", "TERM0002")
#: a refund's amount as a share of what the original still has to refund, in percent (past 100: refused)
SHARES = st.integers(min_value=0, max_value=120)
#: mostly the right card, terminal, etc.: what the rules must refuse is the rarer case
MOSTLY = st.sampled_from([True, True, True, False])
#: what a correction that a reversal advice overtakes is
LATE_KINDS = st.sampled_from(["purchase", "refund", "void", "completion"])


def _code(reason: str) -> str:
    return ISO87_CODES.get(reason, "96")


def _render(event: object) -> tuple[str, str, bytes]:
    event_id = uuid.uuid4().hex
    topic, payload = render_event(
        event,  # type: ignore[arg-type]
        event_id=event_id,
        instance_id="sm",
        time=datetime(2026, 11, 22, tzinfo=UTC),
        topic_prefix="sm",
    )
    return event_id, topic, payload


def _state(txns: list[Txn], *, leave_out: int = 0) -> list[tuple[object, ...]]:
    """What may change of the records (the ``leave_out`` newest ones aside: a step's own new records)."""
    kept = txns[: len(txns) - leave_out] if leave_out else txns
    return [(t.id, t.status, t.refunded_amount, t.effective_amount, t.completed) for t in kept]


class LedgerMachine(RuleBasedStateMachine):
    #: RRNs of approved purchases, pre-auths and completions: what refunds, voids and completions name
    originals = Bundle("originals")
    #: RRNs of approved refunds and voids: what reversals name besides the originals
    corrections = Bundle("corrections")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.ledger = SqliteLedger(Path(self.dir.name) / "sm.db", synchronous="OFF")
        self.loop.run_until_complete(self.ledger.open())
        self.now = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
        self.stan = itertools.count(1)
        self.policy = Policy(unreferenced_refund_terminals=frozenset({"TERM0002"}), cutoff=time(23, 30))
        self.reversed_ids: set[int] = set()
        self.requests: list[tuple[Request, LedgerResult, datetime]] = []
        #: the card behind each RRN the machine holds
        self.cards: dict[str, str] = {}
        #: retransmission keys (terminal, STAN, MTI class) STAN-only reversals used, and when
        self.stan_keys: dict[tuple[str, str, str], datetime] = {}

    def teardown(self) -> None:
        self.loop.run_until_complete(self.ledger.close())
        self.loop.close()
        self.dir.cleanup()

    # ------------------------------------------------------------------ helpers

    def _txns(self) -> list[Txn]:
        return self.loop.run_until_complete(self.ledger.all_txns())

    def _send(self, request: Request) -> LedgerResult:
        self.now += timedelta(seconds=1)
        ctx = Context(self.now, self.policy, b"key", _code)
        return self.loop.run_until_complete(self.ledger.process(request, ctx, _render))

    def _record(self, request: Request) -> LedgerResult:
        result = self._send(request)
        self.requests.append((request, result, self.now))
        return result

    def _request(
        self,
        kind: Kind,
        mti: str,
        pc: str,
        amount: int | None,
        card: str,
        terminal: str,
        reference: Reference | None = None,
        *,
        stan: str | None = None,
        **extra: object,
    ) -> Request:
        return Request(
            kind=kind,
            mti=mti,
            processing_code=pc,
            stan=stan or f"{next(self.stan):06d}",
            transmission_time=self.now.strftime("%m%d%H%M%S"),
            merchant_id=MID,
            terminal_id=terminal,
            amount=amount,
            currency="840",
            pan=card,
            reference=reference,
            **extra,  # type: ignore[arg-type]
        )

    def _by_rrn(self, rrn: str) -> Txn:
        return next(t for t in self._txns() if t.rrn == rrn)

    def _approved(self, result: LedgerResult, card: str) -> MultipleResults[str]:
        """The RRN of an approved request, for later rules to name; nothing for a refused one."""
        if result.response_code != "00" or result.rrn is None:
            return multiple()
        self.cards[result.rrn] = card
        return multiple(result.rrn)

    def _within_window(self, moment: datetime) -> bool:
        return moment >= self.now + timedelta(seconds=1) - self.policy.duplicate_ttl

    def _conflict_rrns(self) -> set[str | None]:
        cases = self.loop.run_until_complete(self.ledger.list_exceptions(include_resolved=True))
        assert all(case.kind == "reversal_conflict" for case in cases)
        return {case.original_rrn for case in cases}

    # ------------------------------------------------------------------ rules

    @initialize(target=originals, amounts=st.lists(st.integers(1, 10_000), min_size=2, max_size=2))
    def open_the_day(self, amounts: list[int]) -> MultipleResults[str]:
        """A sale on each terminal, so that the first steps have something to correct."""
        rrns = [self.sale(amount, CARDS[n], TERMINALS[n], preauth=False) for n, amount in enumerate(amounts)]
        return multiple(*rrns)

    @rule(target=corrections, rrn=originals, share=SHARES, advice=st.booleans(), partial=st.none() | SHARES)
    def refund_then_reverse_the_original(
        self, rrn: str, share: int, advice: bool, partial: int | None
    ) -> MultipleResults[str]:
        """A refund, then a reversal (by DE90) of its original: an advice must be applied, over the refund."""
        refunded = self.refund(rrn, share, same_card=True, terminal=self._by_rrn(rrn).terminal_id)
        original = self._by_rrn(rrn)
        replacement = None if partial is None else max(1, original.effective_amount * partial // 100)
        self.reverse(rrn, advice, replacement, "de90", other_terminal=False)
        return refunded

    @rule(
        target=originals,
        amount=st.integers(1, 10_000),
        card=st.sampled_from(CARDS),
        terminal=st.sampled_from(TERMINALS),
        preauth=MOSTLY.map(lambda mostly: not mostly),
    )
    def sale(self, amount: int, card: str, terminal: str, preauth: bool) -> str:
        kind, mti = (Kind.PREAUTH, "0100") if preauth else (Kind.PURCHASE, "0200")
        result = self._record(self._request(kind, mti, "000000", amount, card, terminal))
        assert result.response_code == "00" and result.rrn is not None
        self.cards[result.rrn] = card
        return result.rrn

    @rule(target=corrections, rrn=originals, share=SHARES, same_card=MOSTLY, terminal=st.sampled_from(TERMINALS))
    def refund(self, rrn: str, share: int, same_card: bool, terminal: str) -> MultipleResults[str]:
        before = self._by_rrn(rrn)
        amount = max(before.refundable, 1) * share // 100
        card = self.cards[rrn] if same_card else next(c for c in CARDS if c != self.cards[rrn])
        result = self._record(self._request(Kind.REFUND, "0200", "200000", amount, card, terminal, Reference(rrn=rrn)))
        if result.response_code == "00":
            # approved only within what was refundable at that moment
            assert 0 < amount <= before.refundable
        elif result.reason == "exceeds_refundable":
            assert amount > before.refundable
        return self._approved(result, card)

    @rule(target=corrections, rrn=originals, exact=MOSTLY)
    def void(self, rrn: str, exact: bool) -> MultipleResults[str]:
        before = self._by_rrn(rrn)
        amount = before.effective_amount if exact else before.effective_amount + 1
        card = self.cards[rrn]
        request = self._request(Kind.VOID, "0200", "020000", amount, card, before.terminal_id, Reference(rrn=rrn))
        cutoff = self.policy.last_cutoff(self.now + timedelta(seconds=1))
        result = self._record(request)
        if result.response_code == "00":
            assert before.status is TxnStatus.APPROVED and before.refunded_amount == 0 and not before.completed
            # the cut-off is effective from its instant, whatever a sweep did
            assert cutoff is None or before.created_at >= cutoff
        return self._approved(result, card)

    @rule(target=originals, rrn=originals, amount=st.integers(1, 13_000))
    def complete(self, rrn: str, amount: int) -> MultipleResults[str]:
        before = self._by_rrn(rrn)
        request = self._request(
            Kind.COMPLETION,
            "0220",
            "000000",
            amount,
            self.cards[rrn],
            before.terminal_id,
            Reference(mti=before.mti, stan=before.stan, transmission_time=before.transmission_time),
        )
        result = self._record(request)
        if result.response_code == "00":
            assert before.kind is Kind.PREAUTH and not before.completed
            assert amount * 100 <= before.effective_amount * 115
        return self._approved(result, self.cards[rrn])

    @rule(
        rrn=originals | corrections,
        advice=st.booleans(),
        partial=st.none() | st.integers(1, 10_000),
        how=st.sampled_from(["de90", "de90", "de90_new_de7", "stan", "stan_wrong_amount"]),
        other_terminal=MOSTLY.map(lambda mostly: not mostly),
    )
    def reverse(self, rrn: str, advice: bool, partial: int | None, how: str, other_terminal: bool) -> None:
        before = self._by_rrn(rrn)
        terminal = before.terminal_id
        if other_terminal:
            terminal = TERMINALS[1] if terminal == TERMINALS[0] else TERMINALS[0]
        amount, reference, stan = before.amount, None, None
        if how.startswith("de90"):
            de7 = before.transmission_time if how == "de90" else "0101000000"
            reference = Reference(mti=before.mti, stan=before.stan, transmission_time=de7)
        else:
            reference, stan = Reference(same_stan=True), before.stan
            amount += 1 if how == "stan_wrong_amount" else 0
        mti = "0420" if advice else "0400"
        state = _state(self._txns())
        if stan is not None:
            key = (terminal, stan, mti[:3])
            used = self.stan_keys.get(key)
            if used is not None and self._within_window(used):
                # a STAN-only reversal carries its original's STAN as its own: a second one from the same
                # terminal is a retransmission of the first (replayed, or 94 if its content differs)
                request = self._request(Kind.REVERSAL, mti, before.processing_code, amount, CARDS[0], terminal,
                                        reference, stan=stan, replacement_amount=partial)  # fmt: skip
                result = self._send(request)
                assert result.replayed or result.response_code == "94"
                assert _state(self._txns()) == state
                return
            # the window runs from the record this reversal makes (a replay above makes none: design §5)
            self.stan_keys[key] = self.now + timedelta(seconds=1)
        request = self._request(
            Kind.REVERSAL, mti, before.processing_code, amount, CARDS[0], terminal, reference,
            stan=stan, replacement_amount=partial,
        )  # fmt: skip
        recent = self._within_window(before.created_at)
        result = self._record(request)
        if advice:
            assert result.response_code == "00"  # advices are never refused
        matches = not other_terminal and (how == "de90" or (recent and how != "stan_wrong_amount"))
        if not matches:
            # a terminal reverses only its own, recent, same-amount requests: nothing changed
            assert _state(self._txns(), leave_out=1) == state
            assert advice or result.reason == "reversal_unmatched"
        after = self._by_rrn(rrn)
        if after.status is TxnStatus.REVERSED:
            self.reversed_ids.add(after.id)

    @rule(rrn=originals, late=LATE_KINDS, advice_by_stan=st.booleans())
    def reversal_overtakes_its_correction(self, rrn: str, late: str, advice_by_stan: bool) -> None:
        """The network delivers a reversal advice before the request it reverses."""
        before = self._by_rrn(rrn)
        if late == "purchase":
            request = self._request(Kind.PURCHASE, "0200", "000000", 500, CARDS[0], before.terminal_id)
        elif late == "refund":
            request = self._request(
                Kind.REFUND, "0200", "200000", 1, self.cards[rrn], before.terminal_id, Reference(rrn=rrn)
            )
        elif late == "void":
            request = self._request(
                Kind.VOID, "0200", "020000", before.effective_amount, self.cards[rrn], before.terminal_id,
                Reference(rrn=rrn),
            )  # fmt: skip
        else:
            request = self._request(
                Kind.COMPLETION, "0220", "000000", before.amount, self.cards[rrn], before.terminal_id,
                Reference(mti=before.mti, stan=before.stan, transmission_time=before.transmission_time),
            )  # fmt: skip
        if advice_by_stan:
            reference, stan = Reference(same_stan=True), request.stan
        else:
            reference, stan = Reference(mti=request.mti, stan=request.stan, transmission_time="0000000000"), None
        advice = self._request(
            Kind.REVERSAL, "0420", request.processing_code, request.amount, CARDS[0], request.terminal_id,
            reference, stan=stan,
        )  # fmt: skip
        state = _state(self._txns())
        assert self._send(advice).response_code == "00"
        request = replace(request, transmission_time=self.now.strftime("%m%d%H%M%S"))
        result = self._record(request)
        assert (result.response_code, result.reason) == ("12", "reversed_before_arrival")
        assert _state(self._txns(), leave_out=2) == state

    @rule(terminal=st.sampled_from(TERMINALS), right=st.booleans())
    def settle(self, terminal: str, right: bool) -> None:
        batches = self.loop.run_until_complete(self.ledger.list_batches(MID, terminal))
        unreconciled = [b for b in batches if b.result in (None, "cutoff")]
        totals = SettlementTotals(
            sum(b.credit_count for b in unreconciled),
            sum(b.credit_amount for b in unreconciled),
            sum(b.debit_count for b in unreconciled),
            sum(b.debit_amount for b in unreconciled) + (0 if right else 1),
        )
        request = self._request(Kind.SETTLEMENT, "0500", "920000", None, CARDS[0], terminal, totals=totals)
        result = self._send(request)
        assert result.response_code == ("00" if right else "95")

    @rule(minutes=st.integers(1, 2_000))
    def time_passes(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)

    @precondition(lambda self: bool(self.requests))
    @rule(index=st.integers(min_value=0), new_de7=st.booleans(), other_content=st.booleans())
    def retransmit(self, index: int, new_de7: bool, other_content: bool) -> None:
        request, first, sent_at = self.requests[index % len(self.requests)]
        if not self._within_window(sent_at):
            return  # past the duplicate window a repeat is a new request
        before = _state(self._txns())
        repeat = replace(request, mti=request.mti[:3] + ("1" if request.mti[3] == "0" else request.mti[3]))
        if new_de7:  # terminals restamp DE7 on every repeat
            repeat = replace(repeat, transmission_time=(self.now + timedelta(seconds=7)).strftime("%m%d%H%M%S"))
        if other_content:
            repeat = replace(repeat, amount=(request.amount or 0) + 1)
        result = self._send(repeat)
        assert _state(self._txns()) == before
        if other_content:
            assert (result.response_code, result.reason) == ("94", "duplicate_conflict")
        else:
            assert (result.response_code, result.rrn) == (first.response_code, first.rrn)
            assert result.replayed

    # ------------------------------------------------------------------ invariants

    @invariant()
    def money_out_never_exceeds_money_in_unless_an_operator_case_says_so(self) -> None:
        txns = self._txns()
        cases = self._conflict_rrns()
        for txn in txns:
            if txn.kind in (Kind.PURCHASE, Kind.COMPLETION):
                standing = txn.effective_amount if txn.status is TxnStatus.APPROVED else 0
                if txn.status is TxnStatus.VOIDED:
                    assert txn.refunded_amount == 0
                elif txn.refunded_amount > standing:
                    assert txn.rrn in cases, f"{txn.kind} {txn.rrn}: refunds beyond what stands, no case"
            if txn.kind is Kind.PREAUTH:
                completions = [
                    c for c in txns
                    if c.kind is Kind.COMPLETION and c.original_id == txn.id and c.status is TxnStatus.APPROVED
                ]  # fmt: skip
                assert txn.completed == bool(completions)
                if len(completions) > 1 or (completions and txn.status is not TxnStatus.APPROVED):
                    assert txn.rrn in cases, f"pre-auth {txn.rrn} captured twice or after its end, no case"

    @invariant()
    def balances_equal_a_fold_over_the_records(self) -> None:
        txns = self._txns()
        by_id = {t.id: t for t in txns}
        for txn in txns:
            if txn.kind not in (Kind.PURCHASE, Kind.COMPLETION):
                continue
            refunds = [r for r in txns if r.kind is Kind.REFUND and r.original_id == txn.id]
            folded = sum(r.effective_amount for r in refunds if r.status is TxnStatus.APPROVED)
            assert txn.refunded_amount == folded
        for txn_id in self.reversed_ids:
            assert by_id[txn_id].status is TxnStatus.REVERSED
        for txn in txns:
            if txn.status is TxnStatus.VOIDED:
                voids = [
                    v
                    for v in txns
                    if v.kind is Kind.VOID and v.original_id == txn.id and v.status is TxnStatus.APPROVED
                ]
                assert len(voids) == 1


LedgerMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerStateMachine = pytest.mark.timeout(600)(LedgerMachine.TestCase)
