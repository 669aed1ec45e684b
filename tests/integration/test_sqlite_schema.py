"""The SQLite ledger's schema: migrations from an older file, the indexes its hot queries use, and
the rows its grouped inserts write."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from gateway.adapters.ledger_rows import record_values
from gateway.adapters.sqlite_ledger import (
    _INSERT_TXN_WITH_ID,
    MIGRATIONS,
    VELOCITY_CARD_SQL,
    VELOCITY_TERMINAL_SQL,
    SqliteLedger,
    _Deferred,
)
from gateway.core.model import Kind, Reference, Txn, TxnStatus


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


def _record(**changes: object) -> Txn:
    txn = Txn(
        id=0, kind=Kind.PURCHASE, mti="0200", processing_code="000000", merchant_id="M1", terminal_id="T1",
        stan="000001", transmission_time="1122120000", amount=10_000, currency="840",
        pan_masked="476173******0119", pan_hmac="card-a", rrn="000000000001", approval_code="000001",
        response_code="00", reason=None, status=TxnStatus.APPROVED, effective_amount=10_000,
        refunded_amount=0, completed=False, original_id=None, batch_id=1,
        created_at=datetime(2026, 11, 22, 12, 0, tzinfo=UTC), fingerprint="f",
    )
    return replace(txn, **changes)  # type: ignore[arg-type]


def _schema(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    for migration in MIGRATIONS:
        conn.executescript(migration)
    conn.execute("INSERT INTO batches(id, merchant_id, terminal_id, batch_no, state, opened_at) "
                 "VALUES (1, 'M1', 'T1', '000001', 'open', 0)")
    return conn


def test_records_inserted_without_their_default_columns_are_the_rows_the_full_insert_makes(tmp_path: Path) -> None:
    """A group writes plain records (no reason, original, reference, refund or completion) with a
    statement that leaves those columns to the table's defaults: the rows must be the same."""
    records = [
        _record(),  # an approved purchase: plain
        _record(stan="000002", rrn="000000000002", kind=Kind.PREAUTH),  # plain too
        _record(stan="000003", rrn="000000000003", reason="amount_limit", response_code="61",
                status=TxnStatus.DECLINED, approval_code=None),
        # a refund of the first purchase, written in the same statement run: plain rows go first
        _record(stan="000004", rrn="000000000004", kind=Kind.REFUND, processing_code="200000", amount=500,
                effective_amount=500, original_id=1, reference=Reference(rrn="000000000001")),
        _record(stan="000005", rrn="000000000005", refunded_amount=500),
        _record(stan="000006", rrn="000000000006", kind=Kind.PREAUTH, completed=True),
        _record(stan="000007", rrn="000000000007",
                reference=Reference(stan="000001", transmission_time="1122120000", same_stan=True)),
    ]
    grouped, one_by_one = _schema(tmp_path / "grouped.db"), _schema(tmp_path / "full.db")
    deferred = _Deferred(1)
    grouped.execute("BEGIN")
    for record in records:
        values = record_values(record, 1_700_000_000_000_000)
        deferred.add(record, values)
        one_by_one.execute(_INSERT_TXN_WITH_ID, (record.id, *values))
    assert len(deferred.plain) == 2 and len(deferred.txns) == 5
    deferred.write(grouped)
    grouped.execute("COMMIT")
    assert not deferred.plain and not deferred.txns and deferred.first_id == len(records) + 1
    rows = [conn.execute("SELECT * FROM txns ORDER BY id").fetchall() for conn in (grouped, one_by_one)]
    assert len(rows[0]) == len(records)
    assert rows[0] == rows[1]
    grouped.close()
    one_by_one.close()
