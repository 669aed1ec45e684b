"""A correction's original found by the RRN it quotes: the row with that RRN, only within the
correction's merchant and among the kinds it may point at (the answer the full SQL filter gives); and
a record's changes as the ledger writes them."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from harness import service_on

from gateway.adapters.ledger import SqliteLedger
from gateway.adapters.ledger.core import _update_txn
from gateway.adapters.ledger.db import Db
from gateway.adapters.ledger.sqlite import SqliteDb
from gateway.core.decide import TxnChange
from gateway.core.model import ORIGINAL_KINDS, Kind, TxnStatus
from gateway.core.queries import FindOriginal
from terminal_emulator import messages
from terminal_emulator.codec import encode_message
from terminal_emulator.profile import load_profile as load_wire_profile

PAN = "4761739001010010"


async def _filtered(db: Db, query: FindOriginal) -> int | None:
    """The reference answer: merchant, RRN and kind tested in SQL."""
    kinds = sorted(kind.value for kind in query.kinds)
    marks = ", ".join(f"${n}" for n in range(3, 3 + len(kinds)))
    row = await db.fetchrow(
        f"SELECT id FROM txns WHERE merchant_id = $1 AND rrn = $2 AND kind IN ({marks})",
        query.merchant_id, query.rrn, *kinds,
    )  # fmt: skip
    return None if row is None else int(row[0])


async def test_an_original_by_rrn_is_found_only_in_its_merchant_and_among_its_kinds(tmp_path: Path) -> None:
    wire = load_wire_profile("iso87-binary")
    now = datetime.now(UTC)
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        service = service_on(ledger)
        for number, merchant in ((1, "MERCHANT0000001"), (2, "MERCHANT0000002")):
            sale = messages.purchase(
                messages.stamp(number, now), tid="TERM0001", mid=merchant, pan=PAN, amount=1000, currency="840"
            )
            await service.handle(encode_message(wire, sale))
        first_sale = (await ledger.all_txns())[0]
        assert first_sale.rrn is not None
        refund = messages.refund(
            messages.stamp(3, now),
            tid="TERM0001",
            mid="MERCHANT0000001",
            pan=PAN,
            amount=100,
            currency="840",
            original_rrn=first_sale.rrn,
        )
        await service.handle(encode_message(wire, refund))
        txns = await ledger.all_txns()
        assert [txn.kind for txn in txns] == [Kind.PURCHASE, Kind.PURCHASE, Kind.REFUND]
        sale_1, sale_2, refund_1 = txns
        assert sale_2.rrn is not None and refund_1.rrn is not None
        refund_kinds = frozenset(ORIGINAL_KINDS | {Kind.REFUND, Kind.VOID})
        cases = [
            (FindOriginal("MERCHANT0000001", "TERM0001", refund_kinds, rrn=sale_1.rrn), sale_1.id),
            (FindOriginal("MERCHANT0000002", "TERM0001", refund_kinds, rrn=sale_1.rrn), None),  # another merchant's
            (FindOriginal("MERCHANT0000002", "TERM0009", refund_kinds, rrn=sale_2.rrn), sale_2.id),  # any terminal
            (FindOriginal("MERCHANT0000001", "TERM0001", refund_kinds, rrn=refund_1.rrn), refund_1.id),
            (FindOriginal("MERCHANT0000001", "TERM0001", ORIGINAL_KINDS, rrn=refund_1.rrn), None),  # not a kind
            (FindOriginal("MERCHANT0000001", "TERM0001", refund_kinds, rrn="999999999999"), None),
        ]

        async def both(db: Db) -> list[tuple[int | None, int | None]]:
            answers = []
            for query, _ in cases:
                found = await ledger.core.answer(db, query)
                answers.append((found.id if found is not None else None, await _filtered(db, query)))
            return answers

        answers = await ledger.run(both)
    assert answers == [(expected, expected) for _, expected in cases]


async def test_a_change_writes_only_what_it_sets(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute(
        "CREATE TABLE txns (id INTEGER PRIMARY KEY, status TEXT, refunded_amount INTEGER, effective_amount INTEGER, "
        "completed INTEGER, reversed_after_settlement INTEGER)"
    )
    conn.execute("INSERT INTO txns VALUES (1, 'approved', 100, 1000, 0, 0), (2, 'approved', 0, 500, 0, 0)")
    db = SqliteDb(conn)

    def row(txn_id: int) -> tuple[object, ...]:
        return tuple(conn.execute("SELECT * FROM txns WHERE id = ?", (txn_id,)).fetchone())

    await _update_txn(db, TxnChange(1, refunded_delta=250))
    assert row(1) == (1, "approved", 350, 1000, 0, 0)
    await _update_txn(db, TxnChange(1, refunded_delta=-100))  # a reversed refund gives its amount back
    assert row(1) == (1, "approved", 250, 1000, 0, 0)
    await _update_txn(db, TxnChange(1, status=TxnStatus.REVERSED, effective_amount=0, reversed_after_settlement=True))
    assert row(1) == (1, "reversed", 250, 0, 0, 1)
    await _update_txn(db, TxnChange(1, completed=True))
    assert row(1) == (1, "reversed", 250, 0, 1, 1)
    await _update_txn(db, TxnChange(1, completed=False, reversed_after_settlement=False))
    assert row(1) == (1, "reversed", 250, 0, 0, 0)
    await _update_txn(db, TxnChange(1))  # sets nothing: changes nothing
    assert row(1) == (1, "reversed", 250, 0, 0, 0)
    assert row(2) == (2, "approved", 0, 500, 0, 0)  # only its own record
    # every value in its own column when a change sets all of them
    await _update_txn(
        db,
        TxnChange(
            2,
            status=TxnStatus.VOIDED,
            refunded_delta=50,
            effective_amount=400,
            completed=True,
            reversed_after_settlement=True,
        ),
    )
    assert row(2) == (2, "voided", 50, 400, 1, 1)
    conn.close()
