"""A group's duplicate lookups are made by one statement per 32: each gets the answer it would get
alone (the latest record with its key inside its window, or None)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from harness import service_on

from gateway.adapters.sqlite_ledger import SqliteLedger
from gateway.core.engine import FindDuplicate, GetTxn, Query
from gateway.core.model import Txn
from terminal_emulator import messages
from terminal_emulator.codec import encode_message
from terminal_emulator.profile import load_profile as load_wire_profile

MERCHANT = "MERCHANT0000001"
TERMINAL = "TERM0001"


def _copy_with_new_rrn(conn: sqlite3.Connection, txn_id: int, created_at_us: int) -> None:
    """A second record with the same retransmission key as ``txn_id`` (as another instance could write)."""
    columns = [row[1] for row in conn.execute("PRAGMA table_info(txns)") if row[1] not in ("id", "rrn", "created_at")]
    names = ", ".join(columns)
    conn.execute(
        f"INSERT INTO txns({names}, rrn, created_at) SELECT {names}, NULL, ? FROM txns WHERE id = ?",
        (created_at_us, txn_id),
    )


async def test_each_lookup_of_a_group_is_answered_as_alone(tmp_path: Path) -> None:
    wire = load_wire_profile("iso87-binary")
    now = datetime.now(UTC)
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        service = service_on(ledger)
        for number in range(1, 41):
            stamp = messages.stamp(number, now)
            frame = encode_message(wire, messages.purchase(stamp, tid=TERMINAL, mid=MERCHANT, pan="4761739001010010",
                                                           amount=1000, currency="840"))
            await service.handle(frame)
        txns: list[Txn] = await ledger.all_txns()
        assert len(txns) == 40
        recent_us = int(now.timestamp() * 1_000_000)
        old_us = int((now - timedelta(days=30)).timestamp() * 1_000_000)

        def extra_rows(conn: sqlite3.Connection) -> None:
            _copy_with_new_rrn(conn, txns[0].id, recent_us + 5)  # newer than the first: it answers
            _copy_with_new_rrn(conn, txns[1].id, old_us)  # outside any window: the record itself answers
            conn.execute("UPDATE txns SET created_at = ? WHERE id = ?", (old_us, txns[2].id))  # none answers

        await ledger._call(extra_rows)
        since = now - timedelta(days=1)

        def key(txn: Txn, *, mti_class: str | None = None) -> FindDuplicate:
            return FindDuplicate(txn.merchant_id, txn.terminal_id, txn.stan, mti_class or txn.mti[:3], since)

        queries: list[Query] = [key(txn) for txn in txns]  # 40: one statement of 32, one of 8
        queries.insert(5, GetTxn(txns[0].id))  # not a duplicate lookup: None
        queries.append(key(txns[3], mti_class="042"))  # another class: no record
        queries.append(key(txns[4]))  # the same lookup twice in one group
        queries += [key(txn) for txn in txns[30:33]]  # a last statement of 4 (3 padded to 4)
        # a window that starts after the record, in a statement whose other windows include it: the
        # statement reads rows from the earliest window start, each lookup keeps those inside its own
        queries.insert(40, FindDuplicate(txns[6].merchant_id, txns[6].terminal_id, txns[6].stan, txns[6].mti[:3],
                                         now + timedelta(hours=1)))

        def both(conn: sqlite3.Connection) -> tuple[list[Txn | None], list[Txn | None]]:
            alone = [
                SqliteLedger._find_duplicate(conn, query) if isinstance(query, FindDuplicate) else None
                for query in queries
            ]
            return alone, SqliteLedger._find_duplicates(conn, queries)

        alone, together = await ledger._call(both)
    assert together == alone
    found = [txn.id if txn is not None else None for txn in together]
    assert found[0] == 41  # the newer copy
    assert found[1] == txns[1].id
    assert found[2] is None
    assert found[5] is None
    assert found[-5] is None
    assert found[7] == txns[6].id and found[40] is None  # (found[5] is the GetTxn)
    assert found[-4] == txns[4].id
    assert sum(txn is None for txn in together) == 4
