"""The SQLite ledger: WAL, durable commits, group commit on one writer thread.

Every request runs :func:`gateway.core.engine.process` inside a transaction opened with
``BEGIN IMMEDIATE``, so corrections against one original are serialised, also across processes
sharing the file. Requests that arrive while a commit is under way are gathered and run in the next
transaction and committed with one fsync (group commit). If one of them raises, the group is rolled
back and run again with each request in its own SAVEPOINT, so a bad request costs only itself. A
caller is told (its completion callback, or its awaited future) only after the commit returned: nothing
is answered before it is durable.

Why not aiosqlite: it hops to its thread once per statement (5-10 statements per request) and holds
the GIL-bound work on a second thread. Here the statements run on the event loop (microseconds each,
no thread hop, no contention) and only COMMIT (the fsync) and a BEGIN IMMEDIATE that must wait for
another process go to a helper thread; the loop builds the group's answers during the fsync and sends
them once it returned. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import os
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.adapters.ledger_rows import (
    EXCEPTION_COLUMNS,
    TXN_COLUMNS,
    LedgerClosedError,
    batch_from_row,
    exception_from_row,
    exception_values,
    reconcile_values,
    record_values,
    summary_from_row,
    txn_from_row,
)
from gateway.adapters.ledger_thread import LedgerThread, resolve
from gateway.core.decide import TxnChange
from gateway.core.engine import (
    BatchTxns,
    CloseBatch,
    Context,
    CurrentBatch,
    FindDuplicate,
    FindOriginal,
    FindTombstone,
    GetBatch,
    GetTxn,
    NextRrn,
    Plan,
    Query,
    RefundVelocity,
    StaleBatches,
    StandingCorrections,
    Step,
    UnreconciledBatches,
    close_batches_at_cutoff,
    process,
)
from gateway.core.events import CorrectionEvent
from gateway.core.model import Batch, BatchSummary, ExceptionCase, Kind, Request, Txn, TxnStatus
from gateway.core.policy import Policy, Velocity
from gateway.ports import LedgerDone, LedgerPrepare, LedgerResult, OutboxRow, OutboxStatus, Renderer

T = TypeVar("T")


MIGRATIONS: tuple[str, ...] = (
    # 1: the ledger, batches, the outbox and counters
    """
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        merchant_id TEXT NOT NULL,
        terminal_id TEXT NOT NULL,
        batch_no TEXT NOT NULL,
        state TEXT NOT NULL,
        opened_at INTEGER NOT NULL,
        closed_at INTEGER,
        result TEXT,
        terminal_totals TEXT,
        ledger_totals TEXT
    );
    CREATE UNIQUE INDEX batches_one_open ON batches(merchant_id, terminal_id) WHERE state = 'open';
    CREATE INDEX batches_terminal ON batches(merchant_id, terminal_id, id);
    CREATE TABLE txns (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        mti TEXT NOT NULL,
        mti_class TEXT NOT NULL,
        processing_code TEXT NOT NULL,
        merchant_id TEXT NOT NULL,
        terminal_id TEXT NOT NULL,
        stan TEXT NOT NULL,
        transmission_time TEXT NOT NULL,
        amount INTEGER NOT NULL,
        currency TEXT NOT NULL,
        pan_masked TEXT,
        pan_hmac TEXT,
        rrn TEXT UNIQUE,
        approval_code TEXT,
        response_code TEXT NOT NULL,
        reason TEXT,
        status TEXT NOT NULL,
        effective_amount INTEGER NOT NULL,
        refunded_amount INTEGER NOT NULL DEFAULT 0,
        completed INTEGER NOT NULL DEFAULT 0,
        original_id INTEGER REFERENCES txns(id),
        batch_id INTEGER REFERENCES batches(id),
        created_at INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        ref_rrn TEXT,
        ref_mti TEXT,
        ref_stan TEXT,
        ref_time TEXT,
        ref_approval TEXT,
        ref_same_stan INTEGER NOT NULL DEFAULT 0,
        reversed_after_settlement INTEGER NOT NULL DEFAULT 0,
        CHECK (amount >= 0 AND effective_amount >= 0 AND refunded_amount >= 0)
    );
    CREATE INDEX txns_key ON txns(merchant_id, stan, transmission_time, mti_class, terminal_id);
    CREATE INDEX txns_batch ON txns(batch_id);
    CREATE INDEX txns_approval ON txns(merchant_id, approval_code) WHERE kind = 'preauth';
    CREATE INDEX txns_refunds_day ON txns(merchant_id, created_at) WHERE kind = 'refund';
    CREATE INDEX txns_tombstones ON txns(merchant_id, terminal_id, status) WHERE status = 'unmatched';
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        ordering_key TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        sent_at INTEGER
    );
    CREATE INDEX outbox_pending ON outbox(id) WHERE sent_at IS NULL;
    CREATE INDEX outbox_sent ON outbox(sent_at) WHERE sent_at IS NOT NULL;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
    INSERT INTO meta(key, value) VALUES ('rrn_next', '1');
    """,
    # 2: daily refund limits look up one terminal's or one card's refunds of the day, not every refund
    # of the merchant (as the PostgreSQL ledger's indexes already do)
    """
    CREATE INDEX txns_refunds_terminal ON txns(merchant_id, terminal_id, created_at) WHERE kind = 'refund';
    CREATE INDEX txns_refunds_card ON txns(merchant_id, pan_hmac, created_at) WHERE kind = 'refund';
    DROP INDEX txns_refunds_day;
    """,
    # 3: refund controls II (issue 20): the retransmission key without DE7; batches remember what closed
    # them and whether a 0500 reconciled them; the exceptions an operator resolves; corrections by original
    """
    DROP INDEX txns_key;
    CREATE INDEX txns_key ON txns(merchant_id, stan, mti_class, terminal_id, transmission_time);
    CREATE INDEX txns_corrections ON txns(original_id) WHERE original_id IS NOT NULL;
    ALTER TABLE batches ADD COLUMN closed_by TEXT;
    UPDATE batches SET closed_by = 'cutoff', result = NULL WHERE result = 'cutoff';
    UPDATE batches SET closed_by = 'settlement' WHERE result IN ('settled', 'mismatch');
    CREATE INDEX batches_open_since ON batches(opened_at) WHERE state = 'open';
    CREATE INDEX batches_unreconciled ON batches(merchant_id, terminal_id, id)
        WHERE closed_by = 'cutoff' AND result IS NULL;
    CREATE TABLE exceptions (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        merchant_id TEXT NOT NULL,
        terminal_id TEXT NOT NULL,
        original_rrn TEXT,
        summary TEXT NOT NULL,
        details TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        resolved_at INTEGER,
        resolved_by TEXT,
        resolution TEXT
    );
    CREATE INDEX exceptions_open ON exceptions(id) WHERE resolved_at IS NULL;
    """,
    # 4: whether a record's answer was written to its terminal (issue 21): a record is born unanswered
    # and marked once its answer is written; those from before this version count as answered
    """
    ALTER TABLE txns ADD COLUMN answered INTEGER NOT NULL DEFAULT 0;
    UPDATE txns SET answered = 1;
    """,
)

_INSERT_TXN = f"INSERT INTO txns({', '.join(TXN_COLUMNS)}) VALUES ({', '.join('?' * len(TXN_COLUMNS))})"
#: the same with the id given: a group's records get theirs when decided, and are inserted together
_INSERT_TXN_WITH_ID = (
    f"INSERT INTO txns(id, {', '.join(TXN_COLUMNS)}) VALUES ({', '.join('?' * (len(TXN_COLUMNS) + 1))})"
)
#: the columns of TXN_COLUMNS that a plain new record leaves at the table's defaults (NULL, or 0 for
#: the counters and flags): no reason, nothing refunded or completed, no original and no reference.
#: Every approved purchase is such a record, and inserting it without binding these ten values costs
#: SQLite about 2.5 µs a row less (7.1 -> 4.6 µs, docs/performance.md, series 9). The row is the same.
_DEFAULTED = frozenset({"reason", "refunded_amount", "completed", "original_id", "ref_rrn", "ref_mti", "ref_stan",
                        "ref_time", "ref_approval", "ref_same_stan"})
_PLAIN_AT = tuple(index for index, name in enumerate(TXN_COLUMNS) if name not in _DEFAULTED)
_plain_values = operator.itemgetter(*_PLAIN_AT)
_INSERT_PLAIN_TXN_WITH_ID = (
    f"INSERT INTO txns(id, {', '.join(TXN_COLUMNS[index] for index in _PLAIN_AT)}) "
    f"VALUES ({', '.join('?' * (len(_PLAIN_AT) + 1))})"
)
#: a correction's original by the RRN it quotes (``rrn`` is UNIQUE: at most one row)
_ORIGINAL_BY_RRN = "SELECT * FROM txns WHERE rrn = ?"
#: a batch reconciled by a 0500 (see ledger_rows.reconcile_values)
_RECONCILE_BATCH = (
    "UPDATE batches SET state = 'closed', closed_at = COALESCE(closed_at, ?), "
    "closed_by = COALESCE(closed_by, 'settlement'), result = ?, terminal_totals = ?, ledger_totals = ? "
    "WHERE id = ? AND result IS NULL"
)
_INSERT_EXCEPTION = (
    f"INSERT INTO exceptions({', '.join(EXCEPTION_COLUMNS)}) VALUES ({', '.join('?' * len(EXCEPTION_COLUMNS))})"
)
_INSERT_OUTBOX = "INSERT INTO outbox(event_id, topic, payload, ordering_key, created_at) VALUES (?, ?, ?, ?, ?)"
_VELOCITY = (
    "SELECT COUNT(*), COALESCE(SUM(effective_amount), 0) FROM txns WHERE kind = 'refund' "
    "AND merchant_id = ? AND created_at >= ? AND status = 'approved'"
)
#: a terminal's / a card's approved refunds since a moment (daily refund limits)
VELOCITY_TERMINAL_SQL = _VELOCITY + " AND terminal_id = ?"
VELOCITY_CARD_SQL = _VELOCITY + " AND pan_hmac = ?"
_RRN_BLOCK = 1000
#: open batches cached at most (about 300 bytes each)
_OPEN_BATCH_CACHE = 10_000
#: how long a relay lease outlives its holder's last poll
RELAY_LEASE_S = 10.0
#: the holder renews its lease when less than this is left (half of it)
_RELAY_RENEW_US = int(RELAY_LEASE_S * 1_000_000) // 2
_MAX_GROUP = 256
#: the interpreter's switch interval the gateway runs with (``sys.setswitchinterval``; Python's
#: default is 5 ms). The loop builds a group's answers right after handing its COMMIT to the commit
#: thread, and that thread needs the GIL for a moment to start the COMMIT (which releases it for the
#: fsync). Pure Python such as encoding answers never gives the GIL up by itself, so a waiting thread
#: gets it only once its request times out after this interval: with 5 ms, every fsync would start
#: after the answers were built, not during. 100 µs lets it start at once at the cost of one switch
#: per commit (docs/performance.md, series 9: +2-3% msg/s against a lock hand-over, 9 of 10 pairs).
SWITCH_INTERVAL_S = 0.0001
#: at most this many commits in a row open the next transaction themselves; then one leaves the write
#: lock free for a moment, so another process sharing the file is not starved by a busy gateway
_MAX_CHAINED = 8
#: after another process committed, commits stop opening the next transaction for this long
_SHARED_QUIET_S = 5.0
#: terminals with unmatched reversals remembered at most; past it, purchases look them up in SQL
_TOMBSTONE_CACHE = 10_000
_NO_TOMBSTONE_CACHE: set[tuple[str, str]] = set()
#: enum members read for every request, as module globals (Python 3.11 looks ``Kind.REFUND`` up
#: through ``EnumType.__getattr__``: about 150 ns, a module global 15)
_REFUND, _UNMATCHED = Kind.REFUND, TxnStatus.UNMATCHED


#: queries that read no record, so that no record not yet written can change their answer (the
#: tombstone lookup writes them itself if it asks SQLite; most purchases are answered from the
#: ledger's set of terminals with unmatched reversals). A purchase asks three of them.
_READ_NO_RECORD = frozenset(
    {NextRrn, CurrentBatch, GetBatch, FindTombstone, CloseBatch, StaleBatches, UnreconciledBatches}
)


#: duplicate lookups made by one statement at most (see :meth:`SqliteLedger._find_duplicates`)
_DUPLICATES_PER_STATEMENT = 32


@functools.lru_cache(maxsize=8)
def _duplicates_sql(count: int) -> str:
    """One statement answering ``count`` duplicate lookups (``count`` a power of two, so that few
    statements are prepared): each row names the lookup it answers in its last column, ``_lookup``.
    Every lookup is a search in ``txns_key``, as when made alone. The last value is the earliest
    window start of the lookups: each lookup's own start is applied to the rows found, in Python
    (rows are rarely found, and one bound value less per lookup saves more than that costs)."""
    keys = ",".join(["(?, ?, ?, ?, ?)"] * count)
    return (
        f"WITH k(i, m, s, c, tid) AS (VALUES {keys}) "
        "SELECT txns.*, k.i AS _lookup FROM k CROSS JOIN txns ON txns.merchant_id = k.m AND txns.stan = k.s "
        "AND txns.mti_class = k.c AND txns.terminal_id = k.tid "
        "WHERE txns.created_at >= ?"
    )


@functools.lru_cache(maxsize=16)
def _kind_values(kinds: frozenset[Kind]) -> tuple[str, ...]:
    return tuple(sorted(kind.value for kind in kinds))


@functools.lru_cache(maxsize=32)
def _original_sql(lookup: str, kinds: int) -> str:
    """The statement finding a correction's original, per lookup (see FindOriginal) and kind count."""
    marks = ",".join("?" * kinds)
    if lookup == "original_data":
        return (
            "SELECT * FROM txns WHERE merchant_id = ? AND stan = ? AND transmission_time = ? "
            f"AND (? IS NULL OR mti_class = ?) AND kind IN ({marks}) "
            "ORDER BY (terminal_id = ?) DESC, id DESC LIMIT 1"
        )
    if lookup == "recent_stan":
        return (
            "SELECT * FROM txns WHERE merchant_id = ? AND terminal_id = ? AND stan = ? AND created_at >= ? "
            f"AND (? IS NULL OR mti_class = ?) AND kind IN ({marks}) ORDER BY id DESC LIMIT 1"
        )
    if lookup == "approval":
        return (
            "SELECT * FROM txns WHERE merchant_id = ? AND approval_code = ? AND pan_hmac = ? "
            f"AND kind = 'preauth' AND kind IN ({marks}) ORDER BY id DESC LIMIT 1"
        )
    raise ValueError(f"unknown original lookup {lookup!r}")


def _update_txn(conn: sqlite3.Connection, change: TxnChange) -> None:
    """Apply one change to its record, setting and binding only what it sets: a refund's change is its
    refunded amount alone (2 bound values instead of 6, and no column rewritten to itself). A change
    that sets nothing changes nothing, so it runs no statement. (The statement's text varies with what
    is set; the ``sqlite3`` module keeps each prepared, keyed by its text.)"""
    sets: list[str] = []
    values: list[Any] = []
    if change.status is not None:
        sets.append("status = ?")
        values.append(change.status.value)
    if change.refunded_delta:
        sets.append("refunded_amount = refunded_amount + ?")
        values.append(change.refunded_delta)
    if change.effective_amount is not None:
        sets.append("effective_amount = ?")
        values.append(change.effective_amount)
    if change.completed is not None:
        sets.append("completed = ?")
        values.append(int(change.completed))
    if change.reversed_after_settlement is not None:
        sets.append("reversed_after_settlement = ?")
        values.append(int(change.reversed_after_settlement))
    if not sets:
        return
    values.append(change.txn_id)
    conn.execute(f"UPDATE txns SET {', '.join(sets)} WHERE id = ?", values)


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1_000_000, UTC)


def _txn(row: sqlite3.Row) -> Txn:
    # sqlite3.Row finds a column by name by comparing it with each column name in turn: a dict first
    # makes the record's 32 lookups cheaper (4.6 -> 2.8 µs a record)
    values = dict(zip(row.keys(), row, strict=True))
    created = _dt(values["created_at"])
    assert created is not None
    return txn_from_row(values, created)


def _exception(row: sqlite3.Row) -> ExceptionCase:
    created = _dt(row["created_at"])
    assert created is not None
    return exception_from_row(row, created, _dt(row["resolved_at"]))


def _batch(row: sqlite3.Row) -> Batch:
    opened = _dt(row["opened_at"])
    assert opened is not None
    return batch_from_row(row, opened, _dt(row["closed_at"]))


#: what a job's caller is told once its group committed (or failed): (value, None) or (None, error)
Done = Callable[[Any, Exception | None], None]


@dataclass(slots=True)
class _Job:
    #: what the job runs; None for a request's decision (see ``decision``)
    fn: Callable[[sqlite3.Connection], Any] | None
    done: Done
    #: builds the answer while the commit runs (see :meth:`SqliteLedger.submit`)
    prepare: LedgerPrepare | None = None
    #: a request's decision; None for any other job
    decision: _Decision | None = None
    #: False for bookkeeping a power cut may undo (the relay's marks and lease): a group of only
    #: such jobs does not wait for an fsync of its own (see :meth:`SqliteLedger._run_group`)
    durable: bool = True


@dataclass(slots=True)
class _Decision:
    request: Request
    ctx: Context
    render: Renderer


class _Deferred:
    """A group's new records and outbox rows, written together when a statement could see them.

    Inserting each record as it is decided interleaves SQLite with the rules, request by request;
    collecting them and inserting them with one ``executemany`` keeps each in the CPU's caches
    (purchases: about 9% less event-loop CPU per message, ``benchmarks/inproc.py``). A record gets
    its id when decided (the transaction holds the write lock: nobody else inserts meanwhile).
    """

    __slots__ = ("by_key", "changed", "first_id", "has_refund", "next_id", "outbox", "plain", "rrns", "txns")

    def __init__(self, next_id: int) -> None:
        self.next_id = next_id
        #: ids from here on are not in the table yet
        self.first_id = next_id
        #: new records whose columns in _DEFAULTED hold the defaults (_INSERT_PLAIN_TXN_WITH_ID), and the others
        self.plain: list[tuple[Any, ...]] = []
        self.txns: list[tuple[Any, ...]] = []
        self.outbox: list[tuple[Any, ...]] = []
        self.rrns: set[str] = set()
        self.has_refund = False
        #: every record of this group by retransmission key, the latest one (written or not)
        self.by_key: dict[tuple[str, str, str, str], Txn] = {}
        #: ids of the records this group changed (a copy read before is out of date)
        self.changed: set[int] = set()

    def add(self, record: Txn, values: tuple[Any, ...]) -> None:
        record.id = self.next_id
        self.next_id += 1
        if (
            record.reason is None
            and record.original_id is None
            and record.reference is None
            and not record.refunded_amount
            and not record.completed
        ):
            self.plain.append((record.id, *_plain_values(values)))
        else:
            self.txns.append((record.id, *values))
        if record.rrn is not None:
            self.rrns.add(record.rrn)
        if record.kind is _REFUND:
            self.has_refund = True
        self.by_key[(record.merchant_id, record.terminal_id, record.stan, record.mti[:3])] = record

    def duplicate(self, query: FindDuplicate) -> Txn | None:
        """This group's latest record with the query's key (newer than any in the table), or None."""
        record = self.by_key.get((query.merchant_id, query.terminal_id, query.stan, query.mti_class))
        return record if record is not None and record.created_at >= query.since else None

    def hides(self, query: Query) -> bool:
        """Whether a record not yet written could change the answer to ``query``, a query that reads
        records (:meth:`SqliteLedger._answer` does not ask for those in ``_READ_NO_RECORD``)."""
        if not self.plain and not self.txns:
            return False
        if isinstance(query, FindOriginal) and query.rrn is not None:
            return query.rrn in self.rrns
        if isinstance(query, RefundVelocity):
            return self.has_refund  # it counts refunds only
        if isinstance(query, GetTxn):
            return query.txn_id >= self.first_id
        return True

    def write(self, conn: sqlite3.Connection) -> None:
        if self.plain or self.txns:
            # plain records first: another record may point at one (original_id), never the reverse
            if self.plain:
                conn.executemany(_INSERT_PLAIN_TXN_WITH_ID, self.plain)
                self.plain = []
            if self.txns:
                conn.executemany(_INSERT_TXN_WITH_ID, self.txns)
                self.txns = []
            self.first_id = self.next_id
            self.rrns = set()
            self.has_refund = False
        if self.outbox:
            conn.executemany(_INSERT_OUTBOX, self.outbox)
            self.outbox = []


class SqliteLedger:
    """Ledger and outbox on one SQLite file. Use :meth:`open` / :meth:`close` (or ``async with``).

    One writer task takes every request queued since its last commit, opens ``BEGIN IMMEDIATE`` (on
    the event loop when the write lock is free, else on a helper thread, as it may wait for another
    process's lock), runs each request's decision and writes on the event loop (statements are
    microseconds; no per-request thread hop, no lock contention between threads), then commits on
    the helper thread, where the fsync waits without holding the event loop. Callers are told only
    after the commit returned.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._synchronous = synchronous
        #: whether a group of bookkeeping only may commit with a lower safety level than configured
        self._relaxable = synchronous.upper() in ("FULL", "EXTRA")
        #: a relaxed group could not restore the configured level yet
        self._restore_sync = False
        self._queue: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._thread: LedgerThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._rrn_next = 0
        self._rrn_limit = 0
        #: open batches by (merchant, terminal); valid while no other connection committed
        self._open_batches: dict[tuple[str, str], Batch] = {}
        #: the same open batches by id (GetBatch for a correction's original)
        self._open_batch_ids: dict[int, Batch] = {}
        #: (merchant, terminal) of every unmatched reversal in the ledger, or more; None: not loaded.
        #: A purchase from a terminal outside it cannot have a tombstone, so its lookup needs no SQL.
        self._tombstone_terminals: set[tuple[str, str]] | None = None
        self._data_version = -1
        #: the running group's records not written yet (see :meth:`_run_decisions`)
        self._deferred: _Deferred | None = None
        #: the last commit already opened the next group's transaction (see :meth:`_commit`)
        self._txn_open = False
        #: why that BEGIN IMMEDIATE failed, for the group it was opened for
        self._begin_error: Exception | None = None
        #: commits in a row that opened the next transaction
        self._chained = 0
        #: loop time until which commits do not open the next transaction (another process writes)
        self._shared_until = 0.0
        #: names this ledger object in the relay lease
        self._token = uuid.uuid4().hex
        self._handlers: dict[type[Query], Callable[[sqlite3.Connection, Any], Any]] = {
            FindDuplicate: self._find_duplicate,
            FindOriginal: self._find_original,
            GetTxn: self._get_txn,
            GetBatch: self._get_batch,
            FindTombstone: self._find_tombstone,
            CurrentBatch: self._current_batch,
            CloseBatch: self._close_batch,
            StaleBatches: self._stale_batches,
            UnreconciledBatches: self._unreconciled_batches,
            RefundVelocity: self._velocity,
            NextRrn: self._next_rrn,
            BatchTxns: self._batch_txns,
            StandingCorrections: self._standing_corrections,
        }
        self._closed = True
        #: called on the event loop after a commit that wrote outbox events
        self.on_events: Callable[[], None] | None = None
        #: called after every commit with the number of requests it made durable
        self.on_commit: Callable[[int], None] | None = None
        self.commits = 0
        self.committed_jobs = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> SqliteLedger:
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = self._loop = asyncio.get_running_loop()
        thread = self._thread = LedgerThread(loop, "ledger-commit")
        try:
            self._conn = await thread.run(self._connect)
        except BaseException:
            thread.stop()
            self._thread = None
            raise
        self._closed = False
        self._wake = asyncio.Event()
        self._writer_task = loop.create_task(self._writer(), name="ledger-writer")
        return self

    async def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await self._call(self._release_on_close)
        self._closed = True
        assert self._wake is not None
        self._wake.set()
        if self._writer_task is not None:
            await self._writer_task
        conn, thread = self._conn, self._thread
        self._conn = self._thread = None
        if thread is not None:
            try:
                if conn is not None:
                    await thread.run(conn.close)
            finally:
                thread.stop()

    async def __aenter__(self) -> SqliteLedger:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connect(self) -> sqlite3.Connection:
        with contextlib.suppress(FileExistsError):
            # readable by the gateway's user alone (SQLite gives its WAL and shared-memory files the same mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        self._migrate(conn)
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(f"ledger schema version {version} is newer than this gateway ({len(MIGRATIONS)})")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ writer

    async def _writer(self) -> None:
        assert self._wake is not None
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            group, self._queue = self._queue[:_MAX_GROUP], self._queue[_MAX_GROUP:]
            try:
                await self._run_group(group)
            except BaseException as exc:  # the connection is unusable: fail the group, keep serving
                for job in group:
                    _settle(job, None, exc if isinstance(exc, Exception) else LedgerClosedError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
            if self._queue:
                # let the loop run what the group's answers scheduled (the TCP server writes them in a
                # callback) before deciding the next group: else they wait for its decisions and answers
                # too, about 1.5 ms at full load (docs/performance.md, series 10). Outside the ``try``:
                # this group is settled, and a cancellation here must not settle it again.
                await asyncio.sleep(0)

    async def _run_group(self, group: list[_Job]) -> None:
        """One group in one transaction. A group of bookkeeping only (no job ``durable``) commits with
        ``synchronous = NORMAL``: it waits for no fsync of its own, and the next durable commit's
        fsync of the WAL covers its frames too; a power cut before that may undo it, which its jobs
        allow (a relay mark undone means that event is published again). The safety level can only
        change outside a transaction, so a group whose transaction the last commit opened keeps it."""
        conn = self._conn
        assert conn is not None
        if self._restore_sync:  # the last restore failed: nothing durable commits until it worked
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._restore_sync = False
        relaxed = (
            self._relaxable and not self._txn_open and self._begin_error is None and not any(j.durable for j in group)
        )
        if relaxed:
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            await self._run_transaction(conn, group, relaxed=relaxed)
        finally:
            if relaxed:
                # outside any transaction by now (committed, rolled back, or never begun); if it
                # still fails, the next group tries again first, and fails rather than commit relaxed
                self._restore_sync = True
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                self._restore_sync = False

    async def _run_transaction(self, conn: sqlite3.Connection, group: list[_Job], *, relaxed: bool) -> None:
        thread = self._thread
        assert thread is not None
        loop = asyncio.get_running_loop()
        begin_error, self._begin_error = self._begin_error, None
        if self._txn_open:
            self._txn_open = False  # opened in the same hop as the last commit
        elif begin_error is None:
            try:
                if not self._begin_if_free(conn):  # another process holds the lock: wait off the loop
                    await thread.run(conn.execute, "BEGIN IMMEDIATE")
            except Exception as exc:
                begin_error = exc
        if begin_error is not None:
            for job in group:
                _settle(job, None, begin_error)
            return
        written = conn.total_changes
        try:
            self._check_foreign_writes(conn)
            results = self._run_jobs(conn, group, isolated=False)
            if results is None:
                # a job failed: undo the whole group and run it again, each job in its own savepoint
                conn.execute("ROLLBACK")
                self._forget_uncommitted()
                await thread.run(conn.execute, "BEGIN IMMEDIATE")
                results = self._run_jobs(conn, group, isolated=True)
                assert results is not None
            may_follow = not relaxed and self._may_follow(loop.time())
            if conn.total_changes == written:
                # nothing written (a relay poll, a lookup): the COMMIT has no fsync to wait for, so
                # it runs here rather than costing a trip to the commit thread
                conn.execute("COMMIT")
                finishers = _prepare(group, results)
                followed, self._begin_error = False, None
            elif any(job.prepare is not None for job in group):
                # the answers are built while the commit thread waits for the fsync (see _prepare); that
                # thread needs the GIL only to start the COMMIT, and takes it within SWITCH_INTERVAL_S
                committing = thread.run(self._commit, conn, may_follow)
                finishers = _prepare(group, results)
                followed, self._begin_error = await committing
            else:
                finishers = [None] * len(group)
                followed, self._begin_error = await thread.run(self._commit, conn, may_follow)
            self._chained = self._chained + 1 if followed else 0
            self._txn_open = followed and self._begin_error is None
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._forget_uncommitted()
            for job in group:
                _settle(job, None, exc)
            return
        self.commits += 1
        self.committed_jobs += len(group)
        if self.on_commit is not None:
            self.on_commit(len(group))
        if self.on_events is not None and any(
            isinstance(value, LedgerResult) and value.events for value, _ in results
        ):
            self.on_events()
        for job, (value, error), finish in zip(group, results, finishers, strict=True):
            if finish is None:
                _settle(job, value, error)
            else:
                _finish(finish)

    def _begin_if_free(self, conn: sqlite3.Connection) -> bool:
        """BEGIN IMMEDIATE on the event loop if the write lock is free (microseconds); False, with no
        transaction open, if another process holds it: then the caller waits for it on the commit
        thread, with the busy timeout. A trip to that thread just to begin cost the next group about
        a millisecond (the thread waits for the GIL while the loop works)."""
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            return False
        finally:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        return True

    def _may_follow(self, now: float) -> bool:
        """Whether this commit may open the next group's transaction in the same trip: not when
        another process committed lately, nor more than :data:`_MAX_CHAINED` times in a row (another
        process waiting for the lock gets its turn). It does only if requests wait by the time the
        COMMIT returned (see :meth:`_commit`)."""
        return now >= self._shared_until and self._chained < _MAX_CHAINED

    def _commit(self, conn: sqlite3.Connection, may_follow: bool) -> tuple[bool, Exception | None]:
        """COMMIT (the fsync), on the commit thread. Then, with ``may_follow`` and if requests were
        queued meanwhile (the event loop decodes them during the fsync), BEGIN IMMEDIATE for them on
        the same trip (each trip costs the event loop 45-80 µs of CPU, and the next group waits for
        it). Returns whether it did, and the BEGIN's error: a failed BEGIN is returned, not raised
        (this group is committed, the next one fails with it). With nothing queued it does not, so
        an idle ledger never holds the write lock."""
        conn.execute("COMMIT")
        if not may_follow or not self._queue:  # the queue's length is read atomically under the GIL
            return False, None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            return True, exc
        return True, None

    def _remember_batch(self, key: tuple[str, str], batch: Batch) -> Batch:
        """Cache a terminal's open batch; the cache is bounded (a peer may invent terminal ids)."""
        if len(self._open_batches) >= _OPEN_BATCH_CACHE:
            self._forget_batches()
        self._open_batches[key] = batch
        self._open_batch_ids[batch.id] = batch
        return batch

    def _forget_batches(self) -> None:
        self._open_batches.clear()
        self._open_batch_ids.clear()

    def _check_foreign_writes(self, conn: sqlite3.Connection) -> None:
        """Drop cached state when another connection (another gateway process) committed meanwhile."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            if self._data_version != -1 and self._loop is not None:
                self._shared_until = self._loop.time() + _SHARED_QUIET_S
            self._forget_batches()
            self._tombstone_terminals = None
            self._data_version = version

    def _forget_uncommitted(self) -> None:
        """After a rollback: what was reserved or cached in the rolled-back transaction is void."""
        self._rrn_next = self._rrn_limit = 0
        self._forget_batches()

    def _run_jobs(
        self, conn: sqlite3.Connection, group: list[_Job], *, isolated: bool
    ) -> list[tuple[Any, Exception | None]] | None:
        """Run the jobs inside the open transaction. Without ``isolated``, the first failure returns None."""
        if self._rrn_limit - self._rrn_next < len(group):
            # reserved outside any per-job savepoint, so a failed job cannot roll it back
            self._reserve_rrns(conn, len(group))
        if not isolated:
            try:
                return self._run_decisions(conn, group)
            except Exception:
                return None
        results: list[tuple[Any, Exception | None]] = []
        for job in group:
            conn.execute("SAVEPOINT job")
            try:
                value = self._run_one(conn, job)
            except Exception as exc:  # one bad request costs only itself
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                results.append((None, exc))
            else:
                conn.execute("RELEASE job")
                results.append((value, None))
        return results

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        if self._closed:
            raise LedgerClosedError("ledger closed")
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.append(_Job(fn, functools.partial(resolve, future), durable=durable))
        assert self._wake is not None
        self._wake.set()
        return await future

    # ------------------------------------------------------------------ requests

    async def process(self, request: Request, ctx: Context, render: Renderer) -> LedgerResult:
        """Decide and record one request; returns after the commit is durable."""
        return await self._call(lambda conn: self._process(conn, request, ctx, render))

    def submit(
        self,
        request: Request,
        ctx: Context,
        render: Renderer,
        done: LedgerDone,
        prepare: LedgerPrepare | None = None,
    ) -> None:
        """Queue one request for the next group commit; ``done(result, None)`` is called once it is
        durable, ``done(None, error)`` if it failed (nothing of it was committed).

        ``done`` runs on the event loop right after the commit, without a future or a loop callback
        of its own per request; it must not raise (what it raises goes to the loop's exception
        handler). With ``prepare``, the event loop calls ``prepare(result)`` while the commit thread
        waits for the fsync, and once the commit returned it runs what ``prepare`` returned instead
        of ``done``; if ``prepare`` raises, or the commit fails, ``done`` is called as without it.
        """
        if self._closed:
            raise LedgerClosedError("ledger closed")
        queue = self._queue
        queue.append(_Job(None, done, prepare, _Decision(request, ctx, render)))
        if len(queue) == 1:  # the writer waits for its event only once it found the queue empty
            assert self._wake is not None
            self._wake.set()

    def _process(self, conn: sqlite3.Connection, request: Request, ctx: Context, render: Renderer) -> LedgerResult:
        return self._decide(conn, process(request, ctx), None, render)

    def _decide(self, conn: sqlite3.Connection, steps: Step, answer: Any, render: Renderer) -> LedgerResult:
        """Run a decision from where it stands (``answer`` answers its last query; None to start it)
        to its plan, and apply the plan."""
        try:
            while True:
                answer = self._answer(conn, steps.send(answer))
        except StopIteration as stop:
            plan: Plan = stop.value
        self._apply(conn, plan, render)
        return LedgerResult(
            plan.response_code,
            str(plan.reason),  # a StrEnum's value, without the ``.value`` property's two calls
            plan.rrn,
            plan.approval_code,
            plan.replayed,
            len(plan.events),
            plan.answered_id,
        )

    def _run_decisions(self, conn: sqlite3.Connection, group: list[_Job]) -> list[tuple[Any, Exception | None]]:
        """A group's jobs in order, statement by statement as each would run alone, but by phase:
        for each run of decisions between other jobs, every decision up to its duplicate lookup,
        their duplicate lookups together, then the decisions to their plans, with the group's new
        records and outbox rows inserted together (:class:`_Deferred`).

        The answers are the same as one job after the other: a duplicate lookup made before the
        group's own records were written is answered from those records first (they are the
        latest), or read again if the group changed the record it found since; any statement such a
        record could change writes them first. A job that is not a decision writes them first too,
        and the decisions after it start once it ran.
        """
        next_id = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM txns").fetchone()[0]
        deferred = self._deferred = _Deferred(next_id)
        results: list[tuple[Any, Exception | None]] = []
        try:
            index = 0
            while index < len(group):
                job = group[index]
                if job.decision is None:
                    deferred.write(conn)
                    results.append((self._run_one(conn, job), None))
                    index += 1
                    continue
                started: list[tuple[Step, Query, _Decision]] = []
                while index < len(group) and (decision := group[index].decision) is not None:
                    steps = process(decision.request, decision.ctx)
                    started.append((steps, next(steps), decision))
                    index += 1
                early = self._find_duplicates(conn, [query for _, query, _ in started])
                for (steps, query, decision), found in zip(started, early, strict=True):
                    if isinstance(query, FindDuplicate):
                        answer = deferred.duplicate(query) or found
                        if answer is not None and answer.id in deferred.changed:
                            answer = self._answer(conn, query)  # read it again, as it stands now
                    else:
                        answer = self._answer(conn, query)
                    results.append((self._decide(conn, steps, answer, decision.render), None))
            deferred.write(conn)
        finally:
            self._deferred = None
        return results

    def _run_one(self, conn: sqlite3.Connection, job: _Job) -> Any:
        decision = job.decision
        if decision is not None:
            return self._process(conn, decision.request, decision.ctx, decision.render)
        assert job.fn is not None
        return job.fn(conn)

    def _answer(self, conn: sqlite3.Connection, query: Query) -> Any:
        deferred = self._deferred
        kind = type(query)
        if deferred is not None and kind not in _READ_NO_RECORD and deferred.hides(query):
            deferred.write(conn)
        handler = self._handlers.get(kind)
        if handler is None:
            raise TypeError(f"unknown query {type(query).__name__}")
        return handler(conn, query)

    @staticmethod
    def _find_duplicate(conn: sqlite3.Connection, query: FindDuplicate) -> Txn | None:
        row = conn.execute(
            "SELECT * FROM txns WHERE merchant_id = ? AND stan = ? AND mti_class = ? AND terminal_id = ? "
            "AND created_at >= ? ORDER BY id DESC LIMIT 1",
            (query.merchant_id, query.stan, query.mti_class, query.terminal_id, _us(query.since)),
        ).fetchone()
        return _txn(row) if row else None

    @staticmethod
    def _find_duplicates(conn: sqlite3.Connection, queries: list[Query]) -> list[Txn | None]:
        """The answer to each of ``queries`` that is a :class:`FindDuplicate` (None for the others), as
        :meth:`_find_duplicate` gives it, with one statement for up to 32 of them rather than one each."""
        found: list[Txn | None] = [None] * len(queries)
        lookups = [(index, query) for index, query in enumerate(queries) if isinstance(query, FindDuplicate)]
        for start in range(0, len(lookups), _DUPLICATES_PER_STATEMENT):
            chunk = lookups[start:start + _DUPLICATES_PER_STATEMENT]
            size = 1 << (len(chunk) - 1).bit_length()
            params: list[Any] = []
            for index, query in chunk:
                params += (index, query.merchant_id, query.stan, query.mti_class, query.terminal_id)
            params += params[-5:] * (size - len(chunk))  # padding: the last lookup again
            params.append(_us(min(query.since for _, query in chunk)))
            latest: dict[int, sqlite3.Row] = {}
            for row in conn.execute(_duplicates_sql(size), params):
                index = row["_lookup"]
                if row["created_at"] < _us(queries[index].since):  # outside this lookup's own window
                    continue
                if index not in latest or row["id"] > latest[index]["id"]:
                    latest[index] = row
            for index, row in latest.items():
                found[index] = _txn(row)
        return found

    @staticmethod
    def _get_txn(conn: sqlite3.Connection, query: GetTxn) -> Txn | None:
        row = conn.execute("SELECT * FROM txns WHERE id = ?", (query.txn_id,)).fetchone()
        return _txn(row) if row else None

    def _get_batch(self, conn: sqlite3.Connection, query: GetBatch) -> Batch | None:
        cached = self._open_batch_ids.get(query.batch_id)
        if cached is not None:
            return cached
        row = conn.execute("SELECT * FROM batches WHERE id = ?", (query.batch_id,)).fetchone()
        return _batch(row) if row else None

    def _note_tombstone(self, merchant_id: str, terminal_id: str) -> None:
        """Kept after a rollback too: the set may name more terminals than it must, never fewer."""
        terminals = self._tombstone_terminals
        if terminals is None or terminals is _NO_TOMBSTONE_CACHE:
            return  # loaded (with this one) at the next lookup / not kept
        terminals.add((merchant_id, terminal_id))
        if len(terminals) > _TOMBSTONE_CACHE:
            self._tombstone_terminals = _NO_TOMBSTONE_CACHE

    def _find_tombstone(self, conn: sqlite3.Connection, query: FindTombstone) -> Txn | None:
        terminals = self._tombstone_terminals
        deferred = self._deferred
        if terminals is None:
            if deferred is not None:
                deferred.write(conn)  # the group's own unmatched reversals count
            # loaded inside the write transaction: nobody else adds one until it commits
            rows = conn.execute(
                "SELECT DISTINCT merchant_id, terminal_id FROM txns WHERE status = 'unmatched' LIMIT ?",
                (_TOMBSTONE_CACHE + 1,),
            ).fetchall()
            terminals = {(merchant, terminal) for merchant, terminal in rows}
            # past the bound the set is not kept: every lookup asks SQLite, as without the cache
            self._tombstone_terminals = terminals if len(terminals) <= _TOMBSTONE_CACHE else _NO_TOMBSTONE_CACHE
        if terminals is not _NO_TOMBSTONE_CACHE and (query.merchant_id, query.terminal_id) not in terminals:
            return None
        if deferred is not None:
            deferred.write(conn)
        row = conn.execute(
            "SELECT * FROM txns WHERE merchant_id = ? AND terminal_id = ? AND status = 'unmatched' "
            "AND created_at >= ? AND ("
            " (ref_stan = ? AND substr(ref_mti, 1, 3) = ?)"
            " OR (ref_same_stan = 1 AND stan = ? AND amount = ?)) ORDER BY id DESC LIMIT 1",
            (
                query.merchant_id,
                query.terminal_id,
                _us(query.since),
                query.stan,
                query.mti_class,
                query.stan,
                query.amount,
            ),
        ).fetchone()
        return _txn(row) if row else None

    @staticmethod
    def _batch_txns(conn: sqlite3.Connection, query: BatchTxns) -> list[Txn]:
        rows = conn.execute("SELECT * FROM txns WHERE batch_id = ? ORDER BY id", (query.batch_id,)).fetchall()
        return [_txn(row) for row in rows]

    @staticmethod
    def _find_original(conn: sqlite3.Connection, query: FindOriginal) -> Txn | None:
        kinds = _kind_values(query.kinds)
        if query.rrn is not None:
            # RRNs are unique in the table: find the one row by its RRN alone and check its merchant and
            # kind here (the same answer as testing them in SQL, where `kind IN (...)` and five more bound
            # values cost about 2.7 µs of the lookup's 15)
            found = conn.execute(_ORIGINAL_BY_RRN, (query.rrn,)).fetchone()
            if found is None or found["merchant_id"] != query.merchant_id or found["kind"] not in kinds:
                return None
            return _txn(found)
        if query.stan is not None and query.transmission_time is not None:
            params: tuple[Any, ...] = (
                query.merchant_id, query.stan, query.transmission_time, query.mti_class, query.mti_class,
                *kinds, query.terminal_id,
            )  # fmt: skip
            sql = _original_sql("original_data", len(kinds))
        elif query.stan is not None and query.since is not None:
            params = (
                query.merchant_id, query.terminal_id, query.stan, _us(query.since), query.mti_class, query.mti_class,
                *kinds,
            )  # fmt: skip
            sql = _original_sql("recent_stan", len(kinds))
        elif query.approval_code is not None:
            params = (query.merchant_id, query.approval_code, query.pan_hmac, *kinds)
            sql = _original_sql("approval", len(kinds))
        else:
            return None
        row = conn.execute(sql, params).fetchone()
        return _txn(row) if row else None

    def _current_batch(self, conn: sqlite3.Connection, query: CurrentBatch) -> Batch | None:
        key = (query.merchant_id, query.terminal_id)
        cached = self._open_batches.get(key)
        if cached is not None:
            return cached
        row = conn.execute(
            "SELECT * FROM batches WHERE merchant_id = ? AND terminal_id = ? AND state = 'open'",
            (query.merchant_id, query.terminal_id),
        ).fetchone()
        if row is not None or not query.create:
            if row is None:
                return None
            return self._remember_batch(key, _batch(row))
        last = conn.execute(
            "SELECT batch_no FROM batches WHERE merchant_id = ? AND terminal_id = ? ORDER BY id DESC LIMIT 1",
            (query.merchant_id, query.terminal_id),
        ).fetchone()
        number = int(last[0]) % 999_999 + 1 if last else 1
        row = conn.execute(
            "INSERT INTO batches(merchant_id, terminal_id, batch_no, state, opened_at) "
            "VALUES (?, ?, ?, 'open', ?) RETURNING *",
            (query.merchant_id, query.terminal_id, f"{number:06d}", _us(query.now)),
        ).fetchone()
        batch = self._remember_batch(key, _batch(row))
        return batch

    def _close_batch(self, conn: sqlite3.Connection, query: CloseBatch) -> bool:
        self._forget_batches()
        cursor = conn.execute(
            "UPDATE batches SET state = 'closed', closed_at = ?, closed_by = 'cutoff' WHERE id = ? AND state = 'open'",
            (_us(query.closed_at), query.batch_id),
        )
        return cursor.rowcount == 1

    @staticmethod
    def _stale_batches(conn: sqlite3.Connection, query: StaleBatches) -> list[Batch]:
        rows = conn.execute(
            "SELECT * FROM batches WHERE state = 'open' AND opened_at < ? ORDER BY id", (_us(query.opened_before),)
        )
        return [_batch(row) for row in rows]

    @staticmethod
    def _unreconciled_batches(conn: sqlite3.Connection, query: UnreconciledBatches) -> list[Batch]:
        rows = conn.execute(
            "SELECT * FROM batches WHERE merchant_id = ? AND terminal_id = ? AND closed_by = 'cutoff' "
            "AND result IS NULL ORDER BY id",
            (query.merchant_id, query.terminal_id),
        )
        return [_batch(row) for row in rows]

    @staticmethod
    def _standing_corrections(conn: sqlite3.Connection, query: StandingCorrections) -> list[Txn]:
        rows = conn.execute(
            "SELECT * FROM txns WHERE original_id = ? AND kind IN ('refund', 'completion') AND status = 'approved' "
            "ORDER BY id",
            (query.original_id,),
        )
        return [_txn(row) for row in rows]

    @staticmethod
    def _velocity(conn: sqlite3.Connection, query: RefundVelocity) -> Velocity:
        since = _us(query.since)
        terminal = conn.execute(VELOCITY_TERMINAL_SQL, (query.merchant_id, since, query.terminal_id))
        t_count, t_amount = terminal.fetchone()
        c_count = c_amount = 0
        if query.pan_hmac is not None:
            card = conn.execute(VELOCITY_CARD_SQL, (query.merchant_id, since, query.pan_hmac))
            c_count, c_amount = card.fetchone()
        return Velocity(t_count, t_amount, c_count, c_amount)

    def _reserve_rrns(self, conn: sqlite3.Connection, count: int) -> None:
        row = conn.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'rrn_next' RETURNING value",
            (max(count, _RRN_BLOCK),),
        ).fetchone()
        self._rrn_limit = int(row[0])
        self._rrn_next = self._rrn_limit - max(count, _RRN_BLOCK)

    def _next_rrn(self, conn: sqlite3.Connection, query: NextRrn | None = None) -> str:
        if self._rrn_next >= self._rrn_limit:
            raise RuntimeError("no reserved RRN left in this transaction")
        value = self._rrn_next
        self._rrn_next += 1
        return f"{value % 10**12:012d}"

    def _apply(self, conn: sqlite3.Connection, plan: Plan, render: Renderer) -> None:
        record = plan.record
        deferred = self._deferred
        if record is not None:
            values = record_values(record, _us(record.created_at))
            if deferred is not None:
                deferred.add(record, values)
            else:
                record.id = conn.execute(_INSERT_TXN, values).lastrowid or 0
            if record.status is _UNMATCHED:
                self._note_tombstone(record.merchant_id, record.terminal_id)
        if deferred is not None and plan.changes:
            deferred.changed.update(change.txn_id for change in plan.changes)
            if any(change.txn_id >= deferred.first_id for change in plan.changes):
                deferred.write(conn)  # a change to a record of this group not written yet
        for change in plan.changes:
            _update_txn(conn, change)
        if plan.batch_closes:
            self._forget_batches()
            conn.executemany(_RECONCILE_BATCH, [reconcile_values(close, _us(close.closed_at))
                                                for close in plan.batch_closes])
        if plan.exception is not None:
            case = plan.exception
            conn.execute(_INSERT_EXCEPTION, exception_values(case, _us(case.created_at)))
        self._insert_events(conn, plan.events, record.created_at if record is not None else None, render)

    def _insert_events(
        self, conn: sqlite3.Connection, events: list[CorrectionEvent], created: datetime | None, render: Renderer
    ) -> None:
        deferred = self._deferred
        for event in events:
            event_id, topic, payload = render(event)
            row = (
                event_id,
                topic,
                payload,
                f"{event.merchant_id}/{event.terminal_id}/{event.subject_rrn}",
                _us(created if created is not None else datetime.now(UTC)),
            )
            if deferred is not None:
                deferred.outbox.append(row)
            else:
                conn.execute(_INSERT_OUTBOX, row)

    # ------------------------------------------------------------------ batches

    async def close_batches(self, policy: Policy, now: datetime, render: Renderer) -> int:
        """The cut-off sweep (:func:`gateway.core.engine.close_batches_at_cutoff`): close every batch
        still open past the latest cut-off, with its ``pos.batch.closed`` event. Returns how many."""

        def run(conn: sqlite3.Connection) -> int:
            steps = close_batches_at_cutoff(policy, now)
            answer: Any = None
            try:
                while True:
                    answer = self._answer(conn, steps.send(answer))
            except StopIteration as stop:
                events: list[CorrectionEvent] = stop.value
            self._insert_events(conn, events, now, render)
            return len(events)

        return await self._call(run)

    async def list_batches(
        self, merchant: str | None = None, terminal: str | None = None, open_only: bool = False
    ) -> list[BatchSummary]:
        def run(conn: sqlite3.Connection) -> list[BatchSummary]:
            sql = (
                "SELECT b.*, "
                " SUM(CASE WHEN t.status = 'approved' AND t.kind IN ('purchase', 'completion') THEN 1 ELSE 0 END)"
                " AS dc, SUM(CASE WHEN t.status = 'approved' AND t.kind IN ('purchase', 'completion')"
                "     THEN t.effective_amount ELSE 0 END) AS da,"
                " SUM(CASE WHEN t.status = 'approved' AND t.kind = 'refund' THEN 1 ELSE 0 END) AS cc,"
                " SUM(CASE WHEN t.status = 'approved' AND t.kind = 'refund' THEN t.effective_amount ELSE 0 END)"
                " AS ca, MAX(t.currency) AS currency"
                " FROM batches b LEFT JOIN txns t ON t.batch_id = b.id"
                " WHERE (? IS NULL OR b.merchant_id = ?) AND (? IS NULL OR b.terminal_id = ?)"
                " AND (? = 0 OR b.state = 'open') GROUP BY b.id ORDER BY b.id"
            )
            rows = conn.execute(sql, (merchant, merchant, terminal, terminal, int(open_only))).fetchall()
            return [summary_from_row(row, _batch(row)) for row in rows]

        return await self._call(run)

    async def find_txn(self, merchant_id: str, rrn: str) -> Txn | None:
        """A record by its RRN (for tools and tests)."""

        def run(conn: sqlite3.Connection) -> Txn | None:
            row = conn.execute("SELECT * FROM txns WHERE merchant_id = ? AND rrn = ?", (merchant_id, rrn)).fetchone()
            return _txn(row) if row else None

        return await self._call(run)

    async def all_txns(self) -> list[Txn]:
        """Every record in id order (for tools and tests)."""
        return await self._call(lambda conn: [_txn(r) for r in conn.execute("SELECT * FROM txns ORDER BY id")])

    # ------------------------------------------------------------------ answers

    async def mark_answered(self, txn_ids: Sequence[int]) -> None:
        """Record that these records' answers were written to their terminals."""

        def run(conn: sqlite3.Connection) -> None:
            for start in range(0, len(txn_ids), 500):
                chunk = txn_ids[start:start + 500]
                conn.execute(f"UPDATE txns SET answered = 1 WHERE id IN ({','.join('?' * len(chunk))})", chunk)

        # bookkeeping: a power cut may undo a mark, and the record is then listed as unanswered (safe)
        await self._call(run, durable=False)

    async def unanswered(self, recorded_before: datetime) -> list[Txn]:
        """Records not known to have been answered, recorded before ``recorded_before`` (oldest first)."""

        def run(conn: sqlite3.Connection) -> list[Txn]:
            rows = conn.execute(
                "SELECT * FROM txns WHERE answered = 0 AND created_at < ? ORDER BY id", (_us(recorded_before),)
            )
            return [_txn(row) for row in rows]

        return await self._call(run)

    # ------------------------------------------------------------------ exceptions

    async def list_exceptions(self, *, include_resolved: bool = False) -> list[ExceptionCase]:
        """Cases for an operator (reversal conflicts), oldest first; open ones only unless asked."""

        def run(conn: sqlite3.Connection) -> list[ExceptionCase]:
            where = "" if include_resolved else " WHERE resolved_at IS NULL"
            return [_exception(row) for row in conn.execute(f"SELECT * FROM exceptions{where} ORDER BY id")]

        return await self._call(run)

    async def resolve_exception(self, case_id: int, *, by: str, note: str, at: datetime) -> ExceptionCase | None:
        """Mark an open case resolved, with who and why; None when there is no such open case."""

        def run(conn: sqlite3.Connection) -> ExceptionCase | None:
            row = conn.execute(
                "UPDATE exceptions SET resolved_at = ?, resolved_by = ?, resolution = ? "
                "WHERE id = ? AND resolved_at IS NULL RETURNING *",
                (_us(at), by, note, case_id),
            ).fetchone()
            return _exception(row) if row else None

        return await self._call(run)

    # ------------------------------------------------------------------ outbox port

    async def pending(self, limit: int) -> Sequence[OutboxRow]:
        """Unsent rows in id order, to the instance holding the relay lease only.

        Several gateway processes may share one SQLite file; if each relay published the outbox,
        events would go out once per process and out of order. The lease is a ``meta`` row naming
        its holder until an expiry that every call renews; a stopped holder's lease lapses after
        :data:`RELAY_LEASE_S` and the next caller takes it.
        """

        def run(conn: sqlite3.Connection) -> list[OutboxRow]:
            if not self._hold_relay_lease(conn):
                return []
            rows = conn.execute(
                "SELECT id, event_id, topic, payload, ordering_key, created_at FROM outbox "
                "WHERE sent_at IS NULL ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], _dt(r[5]) or datetime.now(UTC)) for r in rows]

        return await self._call(run, durable=False)  # the lease: see _Job.durable

    def _hold_relay_lease(self, conn: sqlite3.Connection) -> bool:
        """Whether this ledger holds the relay lease, taking or renewing it as needed. The holder
        renews it only once half of it has passed: a poll that finds it fresh writes nothing, so an
        idle gateway polling five times a second does not commit (and fsync) five times a second,
        and a busy one does not add a write, often a commit of its own, per relay batch."""
        now = _us(datetime.now(UTC))
        row = conn.execute("SELECT value FROM meta WHERE key = 'relay_lease'").fetchone()
        if row is not None:
            holder, _, expires = str(row[0]).partition(" ")
            if holder != self._token and int(expires or 0) > now:
                return False
            if holder == self._token and int(expires or 0) - now > _RELAY_RENEW_US:
                return True
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('relay_lease', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (f"{self._token} {now + int(RELAY_LEASE_S * 1_000_000)}",),
        )
        return True

    def _release_relay_lease(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM meta WHERE key = 'relay_lease' AND value LIKE ?", (f"{self._token} %",))

    def _release_on_close(self, conn: sqlite3.Connection) -> None:
        """The relay lease, and the RRNs of this ledger's block it did not use, so that the next
        start continues where this one stopped: unless another process sharing the file reserved a
        block after this one (then the rest of this block stays unused; RRNs are unique, not gap-free)."""
        self._release_relay_lease(conn)
        if self._rrn_next < self._rrn_limit:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'rrn_next' AND CAST(value AS INTEGER) = ?",
                (str(self._rrn_next), self._rrn_limit),
            )
            self._rrn_limit = self._rrn_next

    async def mark_sent(self, ids: Sequence[int], sent_at: datetime) -> None:
        if not ids:
            return
        stamp = _us(sent_at)

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE outbox SET sent_at = ? WHERE id = ?", [(stamp, i) for i in ids])
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('last_sent_at', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(stamp),),
            )

        await self._call(run, durable=False)  # unmarked rows are published again (at least once)

    async def record_error(self, message: str, at: datetime) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [("last_error", message[:500]), ("last_error_at", str(_us(at)))],
            )

        await self._call(run, durable=False)

    async def prune(self, sent_before: datetime) -> int:
        def run(conn: sqlite3.Connection) -> int:
            cursor = conn.execute("DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < ?", (_us(sent_before),))
            return cursor.rowcount

        return await self._call(run, durable=False)

    async def status(self) -> OutboxStatus:
        def run(conn: sqlite3.Connection) -> OutboxStatus:
            count, oldest = conn.execute(
                "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE sent_at IS NULL"
            ).fetchone()
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            return OutboxStatus(
                pending=count,
                oldest_pending_at=_dt(oldest),
                last_error=meta.get("last_error"),
                last_error_at=_dt(int(meta["last_error_at"])) if "last_error_at" in meta else None,
                last_sent_at=_dt(int(meta["last_sent_at"])) if "last_sent_at" in meta else None,
            )

        return await self._call(run)

    outbox_status = status


def _settle(job: _Job, value: Any, error: Exception | None) -> None:
    try:
        job.done(value, error)
    except Exception as exc:  # the caller's bug must not stop the writer: report it as asyncio does
        asyncio.get_running_loop().call_exception_handler(
            {"message": "ledger completion callback failed", "exception": exc}
        )


def _prepare(group: list[_Job], results: list[tuple[Any, Exception | None]]) -> list[Callable[[], None] | None]:
    """Each job's prepared finisher, None where it has none (no ``prepare``, a failed job, or a
    ``prepare`` that raised: that job gets ``done`` after the commit, as without one)."""
    finishers: list[Callable[[], None] | None] = []
    for job, (value, error) in zip(group, results, strict=True):
        finish = None
        if job.prepare is not None and error is None:
            try:
                finish = job.prepare(value)
            except Exception:
                finish = None
        finishers.append(finish)
    return finishers


def _finish(finish: Callable[[], None]) -> None:
    try:
        finish()
    except Exception as exc:  # as _settle: the caller's bug must not stop the writer
        asyncio.get_running_loop().call_exception_handler(
            {"message": "ledger completion callback failed", "exception": exc}
        )
