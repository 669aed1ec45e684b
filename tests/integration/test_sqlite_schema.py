"""The SQLite ledger's schema: migrations from an older file, and the indexes its hot queries use."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.adapters.sqlite_ledger import MIGRATIONS, VELOCITY_CARD_SQL, VELOCITY_TERMINAL_SQL, SqliteLedger


def plan(conn: sqlite3.Connection, sql: str) -> str:
    rows = conn.execute("EXPLAIN QUERY PLAN " + sql, [None] * sql.count("?")).fetchall()
    return " | ".join(str(row[-1]) for row in rows)


async def test_daily_refund_limits_read_one_terminals_or_one_cards_refunds(tmp_path: Path) -> None:
    """Not every refund of the merchant that day: a large merchant has thousands."""
    path = tmp_path / "ledger.db"
    async with SqliteLedger(path):
        pass
    with sqlite3.connect(path) as conn:
        assert "txns_refunds_terminal (merchant_id=? AND terminal_id=? AND created_at>?)" in plan(
            conn, VELOCITY_TERMINAL_SQL
        )
        assert "txns_refunds_card (merchant_id=? AND pan_hmac=? AND created_at>?)" in plan(conn, VELOCITY_CARD_SQL)


async def test_a_ledger_of_schema_version_1_is_migrated_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO txns(kind, mti, mti_class, processing_code, merchant_id, terminal_id, stan, "
            "transmission_time, amount, currency, response_code, status, effective_amount, created_at, "
            "fingerprint) VALUES ('refund', '0200', '020', '200000', 'M1', 'T1', '000001', '1129101010', "
            "500, '840', '00', 'approved', 500, 1, 'f')"
        )
    conn.close()
    async with SqliteLedger(path) as ledger:
        assert [(txn.kind.value, txn.amount) for txn in await ledger.all_txns()] == [("refund", 500)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"txns_refunds_terminal", "txns_refunds_card"} <= indexes
        assert "txns_refunds_day" not in indexes
    conn.close()
