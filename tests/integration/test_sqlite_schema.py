"""The SQLite ledger's schema: a ledger of the first version upgraded to the one a new ledger gets, and
the indexes its hot queries use."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.adapters.ledger import SqliteLedger
from gateway.adapters.ledger import core as ledger_core
from gateway.adapters.ledger.schema import VERSION
from gateway.adapters.ledger.sqlite import _sqlite_sql

DATA = Path(__file__).parent.parent / "data"


def plan(conn: sqlite3.Connection, sql: str) -> str:
    """How SQLite runs ``sql`` (written with ``$n`` placeholders, as the ledger's core writes it)."""
    statement = _sqlite_sql(sql)
    count = max((int(part.split()[0].rstrip(",)")) for part in statement.split("?")[1:]), default=0)
    rows = conn.execute("EXPLAIN QUERY PLAN " + statement, [None] * count).fetchall()
    return " | ".join(str(row[-1]) for row in rows)


def shape(conn: sqlite3.Connection) -> dict[str, object]:
    """Tables with their columns (name, type, not null, default) and the indexes: what the ledger's SQL relies on."""
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {
        "tables": {
            table: sorted((r[1], r[2].upper(), r[3], r[4]) for r in conn.execute(f"PRAGMA table_info({table})"))
            for table in tables
            if table != "sqlite_sequence"
        },
        "indexes": sorted(
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        ),
    }


@pytest.fixture
async def ledger_file(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    async with SqliteLedger(path):
        pass
    return path


@pytest.mark.parametrize(
    ("sql", "index"),
    [
        pytest.param(
            ledger_core._VELOCITY.format(who="terminal_id"),
            "txns_refunds_terminal (merchant_id=? AND terminal_id=? AND created_at>?)",
            id="refunds-of-a-terminal",
        ),
        pytest.param(
            ledger_core._VELOCITY.format(who="pan_hmac"),
            "txns_refunds_card (merchant_id=? AND pan_hmac=? AND created_at>?)",
            id="refunds-of-a-card",
        ),
        pytest.param(ledger_core._TOMBSTONE, "txns_tombstones (merchant_id=? AND terminal_id=?)", id="tombstones"),
        pytest.param(
            "SELECT * FROM txns WHERE merchant_id = $1 AND stan = $2 AND mti_class = $3 AND terminal_id = $4 "
            "AND created_at >= $5 ORDER BY id DESC LIMIT 1",
            "txns_key (merchant_id=? AND stan=? AND mti_class=? AND terminal_id=?)",
            id="retransmissions",
        ),
    ],
)
def test_the_hot_lookups_read_through_their_index(ledger_file: Path, sql: str, index: str) -> None:
    """Not every refund, reversal or request of the merchant: a large merchant has thousands a day."""
    with sqlite3.connect(ledger_file) as conn:
        assert index in plan(conn, sql)
    conn.close()


async def test_a_ledger_of_schema_version_1_is_upgraded_to_the_schema_of_a_new_ledger(
    tmp_path: Path, ledger_file: Path
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.executescript((DATA / "sqlite_ledger_v1.sql").read_text())
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO batches(merchant_id, terminal_id, batch_no, state, opened_at, closed_at, result) "
            "VALUES ('M1', 'T1', '000001', 'closed', 1, 2, 'cutoff')"
        )
        conn.execute(
            "INSERT INTO txns(kind, mti, mti_class, processing_code, merchant_id, terminal_id, stan, "
            "transmission_time, amount, currency, response_code, status, effective_amount, created_at, "
            "fingerprint) VALUES ('refund', '0200', '020', '200000', 'M1', 'T1', '000001', '1129101010', "
            "500, '840', '00', 'approved', 500, 1, 'f')"
        )
        conn.execute("UPDATE meta SET value = '777' WHERE key = 'rrn_next'")
    conn.close()

    async with SqliteLedger(path) as ledger:
        txns = await ledger.all_txns()
        batches = await ledger.list_batches()
        assert await ledger.unanswered(datetime.now(UTC)) == []  # records from before answered were answered
    assert [(txn.kind.value, txn.amount) for txn in txns] == [("refund", 500)]
    assert [(b.state.value, b.result) for b in batches] == [("closed", "cutoff")]

    with sqlite3.connect(path) as old, sqlite3.connect(ledger_file) as new:
        assert old.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert new.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert old.execute("SELECT closed_by, result FROM batches").fetchall() == [("cutoff", None)]
        assert int(old.execute("SELECT value FROM meta WHERE key = 'rrn_next'").fetchone()[0]) >= 777
        assert shape(old) == shape(new)
    old.close()
    new.close()


async def test_a_ledger_newer_than_this_gateway_is_refused(ledger_file: Path) -> None:
    with sqlite3.connect(ledger_file) as conn:
        conn.execute(f"PRAGMA user_version = {VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match=f"version {VERSION + 1}"):
        await SqliteLedger(ledger_file).open()
