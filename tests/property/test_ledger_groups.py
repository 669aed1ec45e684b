"""A group decided in one transaction answers and records exactly what its requests decided one by one.

The SQLite ledger decides the requests queued together in one transaction and reads their
duplicates, tombstones and open batches once for the group (gateway/adapters/ledger/lookahead.py).
Random scripts of one merchant's terminals (a small pool of STANs, so that retransmissions, STAN
clashes and reversals that overtake their original come often; corrections by DE90; settlements;
cut-offs passing; other work between requests) are run twice on fresh ledgers: one request per
transaction, then the first ones so and the rest queued together. The answers, the records, the
batches and the events must agree.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import replace
from datetime import time, timedelta
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ledger_scripts import POLICY, Till, de90, render, stored

from gateway.adapters.ledger import SqliteLedger
from gateway.core.engine import Context
from gateway.core.model import Kind, Reference, Request, SettlementTotals

TERMINALS = ("TERM0001", "TERM0002", "TERM0003")
ACTIONS = ("sale", "sale", "preauth", "refund", "void", "complete", "reverse", "advice", "advice_by_stan",
           "repeat", "repeat_other", "settle", "later", "work")  # fmt: skip
#: what, at which terminal, with which STAN and amount, and which request sent before it names
STEP = st.tuples(st.sampled_from(ACTIONS), st.sampled_from(TERMINALS), st.integers(1, 5), st.sampled_from([100, 250]),
                 st.integers(0, 40))  # fmt: skip
STEPS = st.lists(STEP, min_size=1, max_size=40)
#: a step is a request with the moment it is decided at, or other work (None)
Step = tuple[Request, Context] | None


def script(steps: list[tuple[str, str, int, int, int]]) -> list[Step]:
    till = Till(replace(POLICY, cutoff=time(12, 0)))
    sent: list[Request] = []
    out: list[Step] = []
    for action, terminal, stan_no, amount, target_no in steps:
        stan = f"{stan_no:06d}"
        target = sent[target_no % len(sent)] if sent else None
        request: Request | None = None
        if action == "sale" or (target is None and action not in ("later", "work", "settle", "advice_by_stan")):
            request = till.sale(amount, terminal=terminal, stan=stan)
        elif action == "preauth":
            request = till.request(Kind.PREAUTH, "0100", "000000", amount, terminal=terminal, stan=stan)
        elif action in ("refund", "void", "complete") and target is not None:
            kind, mti, pc = {"refund": (Kind.REFUND, "0200", "200000"), "void": (Kind.VOID, "0200", "020000"),
                             "complete": (Kind.COMPLETION, "0220", "000000")}[action]  # fmt: skip
            request = till.request(kind, mti, pc, target.amount if action == "void" else amount, terminal=terminal,
                                   stan=stan, reference=de90(target))  # fmt: skip
        elif action in ("reverse", "advice") and target is not None:
            request = till.request(Kind.REVERSAL, "0400" if action == "reverse" else "0420", target.processing_code,
                                   target.amount, terminal=target.terminal_id, stan=stan, reference=de90(target))
        elif action == "advice_by_stan":  # names whatever this terminal sent (or will send) with this STAN
            request = till.request(Kind.REVERSAL, "0420", "000000", amount, terminal=terminal, stan=stan,
                                   reference=Reference(same_stan=True))  # fmt: skip
        elif action in ("repeat", "repeat_other") and target is not None:
            till.now += timedelta(seconds=1)
            other = action == "repeat_other"  # other content under the same key: 94
            request = replace(target, mti=target.mti[:3] + "1", amount=(target.amount or 0) + other)
        elif action == "settle":
            request = till.request(Kind.SETTLEMENT, "0500", "920000", None, terminal=terminal, stan=stan,
                                   totals=SettlementTotals(0, 0, 0, 0))  # fmt: skip
        elif action == "later":
            till.now += timedelta(hours=13)  # past cut-offs; four of them past the duplicate window
        if request is not None:
            sent.append(request)
            out.append((request, till.ctx()))
        elif action == "work":
            out.append(None)
    return out


async def run(path: Path, steps: list[Step], *, together_from: int | None) -> tuple[list[Any], ...]:
    """``steps`` one per transaction, or from ``together_from`` on queued together (after the others)."""
    async with SqliteLedger(path, synchronous="OFF") as ledger:

        async def one(step: Step) -> Any:
            if step is None:  # other work between requests: a listing
                return len(await ledger.run(ledger.core.all_txns))
            request, ctx = step
            result = await ledger.process(request, ctx, render)
            return (result.response_code, result.reason, result.rrn, result.approval_code, result.replayed,
                    result.events)  # fmt: skip

        first = len(steps) if together_from is None else together_from
        answers = [await one(step) for step in steps[:first]]
        commits = ledger.commits
        answers += await asyncio.gather(*(one(step) for step in steps[first:]))
        assert together_from is None or ledger.commits == commits + (first < len(steps))  # one group
        events = [(row.topic, {k: v for k, v in orjson.loads(row.payload).items() if k != "id"})
                  for row in await ledger.pending(1000)]  # fmt: skip
        return answers, stored(await ledger.all_txns()), await ledger.list_batches(), events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STEPS, st.integers(0, 40))
@example([("sale", "TERM0001", 1, 100, 0), ("settle", "TERM0001", 2, 100, 0), ("sale", "TERM0001", 3, 100, 0),
          ("advice_by_stan", "TERM0002", 4, 100, 0), ("sale", "TERM0002", 4, 100, 0)], 0)  # fmt: skip
@example([("sale", "TERM0001", 1, 100, 0), ("later", "TERM0001", 1, 100, 0), ("later", "TERM0001", 1, 100, 0),
          ("sale", "TERM0002", 2, 100, 0), ("later", "TERM0001", 1, 100, 0), ("later", "TERM0001", 1, 100, 0),
          ("sale", "TERM0001", 1, 100, 0)], 1)  # the group's windows start apart: the first sale is in one only
def test_a_group_decides_as_its_requests_one_by_one(steps: list[tuple[str, str, int, int, int]], split: int) -> None:
    requests = script(steps)
    with tempfile.TemporaryDirectory() as tmp:
        alone = asyncio.run(run(Path(tmp) / "alone.db", requests, together_from=None))
        together = asyncio.run(run(Path(tmp) / "together.db", requests, together_from=min(split, len(requests))))
    assert together == alone
