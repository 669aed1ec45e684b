"""A group of requests committed together is decided exactly as the same requests one after the other.

The SQLite ledger runs a group by phase (every duplicate lookup first, the group's new records and
outbox rows inserted together, written early whenever a statement could see them). Random scripts
of sales, pre-auths, refunds, voids, completions, reversals, retransmissions and settlements, many
of them pointing at requests of the same script, go through one ledger one request per commit and
through a fresh ledger in groups of a random size; the answers, the records (ids included) and the
outbox must be the same.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.adapters import sqlite_ledger
from gateway.adapters.sqlite_ledger import SqliteLedger
from gateway.core.engine import Context
from gateway.core.model import Kind, Reference, Request, SettlementTotals
from gateway.core.policy import Policy
from gateway.core.reasons import ISO87_CODES
from gateway.events import render_event
from gateway.ports import LedgerResult

CARDS = ("4761739001010119", "4111111111111111")
MID = "MERCHANT0000001"
TERMINALS = ("TERM0001", "TERM0002")
START = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
SALE = ("sale", 1_000, CARDS[0], TERMINALS[0], False)
#: low daily refund limits, so that refunds of one group count against each other
POLICY = Policy(
    unreferenced_refund_terminals=frozenset({"TERM0002"}), card_daily_refund_count=2, terminal_daily_refund_amount=6_000
)

sales = st.tuples(st.just("sale"), st.integers(1, 10_000), st.sampled_from(CARDS), st.sampled_from(TERMINALS),
                  st.booleans())  # fmt: skip
refunds = st.tuples(st.just("refund"), st.integers(0, 10**6), st.integers(0, 9_000), st.booleans(), st.booleans())
voids = st.tuples(st.just("void"), st.integers(0, 10**6), st.booleans())
completions = st.tuples(st.just("complete"), st.integers(0, 10**6), st.integers(1, 13_000))
reversals = st.tuples(st.just("reverse"), st.integers(0, 10**6), st.booleans(), st.none() | st.integers(1, 10_000))
repeats = st.tuples(st.just("retransmit"), st.integers(0, 10**6), st.booleans())
settlements = st.tuples(st.just("settle"), st.sampled_from(TERMINALS))
#: a reversal of a sale not seen yet (it leaves a tombstone), and that sale arriving late
orphans = st.tuples(st.just("orphan"), st.booleans())
late_sales = st.tuples(st.just("late"), st.integers(0, 10**6))
scripts = st.lists(
    st.one_of(sales, sales, refunds, refunds, voids, completions, reversals, repeats, settlements, orphans, late_sales),
    min_size=1,
    max_size=40,
)


def _code(reason: str) -> str:
    return ISO87_CODES.get(reason, "96")


class Renderer:
    """Event ids from a counter: the same decisions in the same order give the same outbox."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)

    def __call__(self, event: object) -> tuple[str, str, bytes]:
        event_id = f"event-{next(self.ids)}"
        topic, payload = render_event(
            event,  # type: ignore[arg-type]
            event_id=event_id,
            instance_id="eq",
            time=START,
            topic_prefix="eq",
        )
        return event_id, topic, payload


def _request(op: tuple[Any, ...], index: int, done: list[tuple[Request, LedgerResult]]) -> Request:
    """The request for ``op``, pointing at the requests before it (as sent one after the other)."""
    stan = f"{index + 1:06d}"
    moment = (START + timedelta(seconds=index)).strftime("%m%d%H%M%S")

    def base(kind: Kind, mti: str, pc: str, amount: int | None, card: str, terminal: str, **extra: Any) -> Request:
        return Request(kind=kind, mti=mti, processing_code=pc, stan=stan, transmission_time=moment,
                       merchant_id=MID, terminal_id=terminal, amount=amount, currency="840", pan=card,
                       **extra)  # fmt: skip

    name = op[0]
    if name == "orphan":
        missing = Reference(mti="0200", stan=f"9{index:05d}", transmission_time=moment)
        return base(Kind.REVERSAL, "0420" if op[1] else "0400", "000000", 1_000, CARDS[0], TERMINALS[0],
                    reference=missing)  # fmt: skip
    orphaned = [r.reference for r, _ in done if r.kind is Kind.REVERSAL and r.reference and r.reference.stan
                and r.reference.stan.startswith("9")]  # fmt: skip
    if name == "late" and orphaned:
        missing = orphaned[op[1] % len(orphaned)]
        assert missing is not None
        late = base(Kind.PURCHASE, "0200", "000000", 1_000, CARDS[0], TERMINALS[0])
        return replace(late, stan=missing.stan or stan, transmission_time=missing.transmission_time or moment)
    if name in ("sale", "late") or not done:
        _, amount, card, terminal, preauth = op if name == "sale" else SALE
        kind, mti = (Kind.PREAUTH, "0100") if preauth else (Kind.PURCHASE, "0200")
        return base(kind, mti, "000000", amount, card, terminal)
    if name == "settle":
        return base(Kind.SETTLEMENT, "0500", "920000", None, CARDS[0], op[1], totals=SettlementTotals(0, 0, 0, 0))
    target, result = done[op[1] % len(done)]
    by_data = Reference(mti=target.mti, stan=target.stan, transmission_time=target.transmission_time)
    if name == "refund":
        _, _, amount, same_card, by_rrn = op
        reference = Reference(rrn=result.rrn) if by_rrn and result.rrn is not None else by_data
        card = target.pan or CARDS[0] if same_card else CARDS[1]
        return base(Kind.REFUND, "0200", "200000", amount, card, target.terminal_id, reference=reference)
    if name == "void":
        amount = (target.amount or 0) + (0 if op[2] else 1)
        reference = Reference(rrn=result.rrn) if result.rrn is not None else by_data
        card = target.pan or CARDS[0]
        return base(Kind.VOID, "0200", "020000", amount, card, target.terminal_id, reference=reference)
    if name == "complete":
        return base(Kind.COMPLETION, "0220", "000000", op[2], target.pan or CARDS[0], target.terminal_id,
                    reference=by_data)  # fmt: skip
    if name == "reverse":
        _, _, advice, partial = op
        return base(Kind.REVERSAL, "0420" if advice else "0400", target.processing_code, target.amount,
                    target.pan or CARDS[0], target.terminal_id, reference=by_data,
                    replacement_amount=partial)  # fmt: skip
    assert name == "retransmit"
    repeat = replace(target, mti=target.mti[:3] + ("1" if target.mti[3] == "0" else target.mti[3]))
    return repeat if op[2] else replace(repeat, amount=(target.amount or 0) + 1)


async def _state(ledger: SqliteLedger) -> tuple[Any, ...]:
    def outbox(conn: Any) -> list[tuple[Any, ...]]:
        return conn.execute("SELECT id, event_id, topic, payload, ordering_key FROM outbox ORDER BY id").fetchall()

    return tuple(await ledger.all_txns()), tuple(await ledger._call(outbox))


async def _one_by_one(path: Path, script: list[tuple[Any, ...]]) -> tuple[list[tuple[Request, Context]], Any]:
    sent: list[tuple[Request, Context]] = []
    done: list[tuple[Request, LedgerResult]] = []
    render = Renderer()
    async with SqliteLedger(path, synchronous="OFF") as ledger:
        for index, op in enumerate(script):
            request = _request(op, index, done)
            ctx = Context(START + timedelta(seconds=index), POLICY, b"key", _code)
            result = await ledger.process(request, ctx, render)
            sent.append((request, ctx))
            done.append((request, result))
        return sent, ([result for _, result in done], await _state(ledger))


async def _grouped(path: Path, sent: list[tuple[Request, Context]], group: int) -> Any:
    render = Renderer()
    results: list[Any] = [None] * len(sent)
    finished = asyncio.get_running_loop().create_future()

    def settle(index: int, value: Any, error: Exception | None) -> None:
        results[index] = error if error is not None else value
        if all(result is not None for result in results) and not finished.done():
            finished.set_result(None)

    saved = sqlite_ledger._MAX_GROUP
    sqlite_ledger._MAX_GROUP = group
    try:
        async with SqliteLedger(path, synchronous="OFF") as ledger:
            for index, (request, ctx) in enumerate(sent):  # queued before the writer runs: one group each
                ledger.submit(request, ctx, render, lambda value, error, i=index: settle(i, value, error))
            await asyncio.wait_for(finished, 30)
            commits = ledger.commits
            return results, await _state(ledger), commits
    finally:
        sqlite_ledger._MAX_GROUP = saved


@pytest.mark.timeout(600)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts, group=st.integers(1, 40))
# a sale and its retransmissions (the same, then with another amount) in one group
@example(script=[SALE, ("retransmit", 0, True), ("retransmit", 0, False)], group=40)
# three refunds by RRN of one card in one group, past the card's daily count: the third sees the others
@example(script=[SALE] * 3 + [("refund", k, 100, True, True) for k in range(3)], group=40)
# a sale reversed before it arrived, both in the group that first looks the ledger's tombstones up
@example(script=[("orphan", True), ("late", 0)], group=40)
@example(script=[SALE, ("orphan", False), ("late", 0)], group=40)
def test_a_group_is_decided_as_its_requests_one_after_the_other(script: list[tuple[Any, ...]], group: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sent, expected = asyncio.run(_one_by_one(Path(tmp) / "one.db", script))
        results, state, commits = asyncio.run(_grouped(Path(tmp) / "grouped.db", sent, group))
    assert commits == -(-len(script) // group)  # the requests did share commits
    assert results == expected[0]
    assert state == expected[1]
