"""RRNs (DE37) of the SQLite ledger: unique, and no block of them lost when a gateway starts and stops.

The ledger reserves RRNs in blocks of 1,000 (one ``meta`` update per block, not per request). A clean
close gives back the unused rest of its block, unless another process sharing the file reserved a
block after it: so a restart, or a start that failed and closed the ledger, continues where the last
request stopped (issue 22, the README tour that refunded a literal RRN). Only a crash (``kill -9``)
skips the rest of a block: RRNs are unique, not gap-free.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from harness import purchase, service_on

from gateway.adapters.ledger import SqliteLedger


async def _sale_rrn(ledger: SqliteLedger, stan: str) -> str:
    service = service_on(ledger)
    answer = service.codec.decode(await service.handle(service.codec.encode(purchase(stan))) or b"")
    assert answer.fields[39] == "00"
    return answer.fields[37]


def _reserved_up_to(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'rrn_next'").fetchone()[0])


async def test_opening_and_closing_the_ledger_without_a_request_uses_no_rrn(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    for _ in range(3):  # three starts that served nothing (or failed after opening the ledger)
        async with SqliteLedger(path):
            pass
    async with SqliteLedger(path) as ledger:
        assert await _sale_rrn(ledger, "000001") == "000000000001"


async def test_a_restart_continues_after_the_last_rrn_used(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with SqliteLedger(path) as ledger:
        assert [await _sale_rrn(ledger, f"00000{n}") for n in (1, 2, 3)] == [
            "000000000001",
            "000000000002",
            "000000000003",
        ]
    assert _reserved_up_to(path) == 4  # the rest of the block was given back
    async with SqliteLedger(path) as ledger:
        assert await _sale_rrn(ledger, "000004") == "000000000004"


async def test_two_ledgers_sharing_a_file_never_hand_out_the_same_rrn(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    first, second = SqliteLedger(path), SqliteLedger(path)
    await first.open()
    await second.open()
    try:
        rrns = [await _sale_rrn(first, "000001"), await _sale_rrn(second, "000002"), await _sale_rrn(first, "000003")]
        await first.close()  # its block is not the last one reserved: nothing is given back
        rrns.append(await _sale_rrn(second, "000004"))
    finally:
        await first.close()
        await second.close()
    assert len(set(rrns)) == 4
    async with SqliteLedger(path) as ledger:  # the second gave back the rest of its block only
        later = await _sale_rrn(ledger, "000005")
    assert int(later) > max(int(rrn) for rrn in rrns)
    assert later == f"{max(int(rrn) for rrn in rrns) + 1:012d}"
