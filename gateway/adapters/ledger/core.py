"""The ledger, written once for SQLite and PostgreSQL.

:class:`LedgerCore` drives the pure engine (:func:`gateway.core.engine.process`) inside a transaction
the adapter opened, answering each of its queries with SQL and writing its plan. The SQL is written
once, with ``$1``-style placeholders, for a :class:`~gateway.adapters.ledger.db.Db`; what differs
between the databases is in a small :class:`~gateway.adapters.ledger.db.Dialect` (row locks, how a
moment is stored, where RRNs come from) and in the adapters themselves (``sqlite.py``: group commit
on one writer; ``postgres.py``: one pooled transaction per request with advisory locks).
The queries on batches and batch uploads are in ``batches.py``
(:class:`~gateway.adapters.ledger.batches.BatchQueries`, which the core inherits); the public API both
adapters offer, :class:`~gateway.adapters.ledger.base.LedgerBase`, is in ``base.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.adapters.ledger.batches import BatchQueries
from gateway.adapters.ledger.db import Db, Dialect, _marks
from gateway.adapters.ledger.lookahead import UNKNOWN, Lookahead, read_ahead
from gateway.adapters.ledger.rows import (
    EXCEPTION_COLUMNS,
    TXN_COLUMNS,
    exception_from_row,
    exception_values,
    reconcile_values,
    record_values,
    txn_from_row,
)
from gateway.core.batches import close_batches_at_cutoff
from gateway.core.decide import TxnChange
from gateway.core.engine import process
from gateway.core.events import CorrectionEvent
from gateway.core.model import ExceptionCase, Request, SafItem, Txn
from gateway.core.policy import Policy, Velocity
from gateway.core.queries import (
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
    PendingCorrections,
    Plan,
    Query,
    RefundVelocity,
    StaleBatches,
    StandingCorrections,
    Step,
    TerminalBatchTxns,
    UnreconciledBatches,
    UploadedLines,
)
from gateway.core.records import saf_event
from gateway.core.upstream import HostAnswer, NoAnswer, conclude
from gateway.ports import LedgerResult, OutboxRow, OutboxStatus, Renderer

_INSERT_TXN = f"INSERT INTO txns ({', '.join(TXN_COLUMNS)}) VALUES ({_marks(1, len(TXN_COLUMNS))})"
_INSERT_EXCEPTION = f"INSERT INTO exceptions ({', '.join(EXCEPTION_COLUMNS)}) VALUES ({_marks(1, 7)})"
_INSERT_OUTBOX = "INSERT INTO outbox (event_id, topic, payload, ordering_key, created_at) VALUES ($1, $2, $3, $4, $5)"
#: a batch reconciled by a 0500 (see rows.reconcile_values): closed now if still open
_RECONCILE_BATCH = (
    "UPDATE batches SET state = 'closed', closed_at = COALESCE(closed_at, $1), "
    "closed_by = COALESCE(closed_by, 'settlement'), result = $2, terminal_totals = $3, ledger_totals = $4 "
    "WHERE id = $5 AND result IS NULL"
)
_TOMBSTONE = (
    "SELECT * FROM txns WHERE merchant_id = $1 AND terminal_id = $2 AND status = 'unmatched' AND created_at >= $3 "
    "AND ((ref_stan = $4 AND substr(ref_mti, 1, 3) = $5) OR (ref_same_stan AND stan = $4 AND amount = $6)) "
    "ORDER BY id DESC LIMIT 1"
)
#: refunds approved, or awaiting the host's answer (they count until it declines them)
_VELOCITY = (
    "SELECT COUNT(*), COALESCE(SUM(effective_amount), 0) FROM txns WHERE kind = 'refund' "
    "AND status IN ('approved', 'pending') AND merchant_id = $1 AND created_at >= $2 AND {who} = $3"
)
#: a batch upload's line; uploaded again (the terminal retries the upload), it replaces the earlier one
_UPSERT_UPLOAD = (
    "INSERT INTO batch_uploads (merchant_id, terminal_id, terminal_batch, stan, amount, pan_masked, pan_hmac, "
    "created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (merchant_id, terminal_id, terminal_batch, stan) "
    "DO UPDATE SET amount = excluded.amount, pan_masked = excluded.pan_masked, pan_hmac = excluded.pan_hmac, "
    "created_at = excluded.created_at"
)
_PENDING = (
    "SELECT id, event_id, topic, payload, ordering_key, created_at FROM outbox WHERE sent_at IS NULL "
    "ORDER BY id LIMIT $1"
)


class LedgerCore(BatchQueries):
    """Every query of the engine and every listing of the ledger, in SQL written once."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._handlers: dict[type[Query], Callable[[Db, Any], Awaitable[Any]]] = {
            FindDuplicate: self._find_duplicate,
            FindOriginal: self._find_original,
            FindTombstone: self._find_tombstone,
            GetTxn: self._get_txn,
            GetBatch: self._get_batch,
            CurrentBatch: self._current_batch,
            CloseBatch: self._close_batch,
            StaleBatches: self._stale_batches,
            UnreconciledBatches: self._unreconciled_batches,
            RefundVelocity: self._velocity,
            NextRrn: lambda db, query: self.dialect.next_rrn(db),
            BatchTxns: self._batch_txns,
            StandingCorrections: self._standing_corrections,
            PendingCorrections: self._pending_corrections,
            TerminalBatchTxns: self._terminal_batch_txns,
            UploadedLines: self._uploaded_lines,
        }

    # ------------------------------------------------------------------ one request

    async def decide(self, db: Db, request: Request, ctx: Context, render: Renderer,
                     ahead: Lookahead | None = None) -> LedgerResult:  # fmt: skip
        """Decide and record one request inside the caller's transaction (with ``ahead``: one of a group
        whose reads were done together, see :mod:`gateway.adapters.ledger.lookahead`)."""
        return await self.drive(db, process(request, ctx), render, ahead)

    async def read_ahead(self, db: Db, requests: Sequence[tuple[Request, Context]]) -> Lookahead:
        """The reads of a group's requests done together, in the transaction that decides them."""
        return await read_ahead(db, requests, self.dialect.store, self._txn, self._batch)

    async def conclude(
        self, db: Db, txn_id: int, request: Request | None, result: HostAnswer | NoAnswer, ctx: Context,
        render: Renderer,
    ) -> LedgerResult:  # fmt: skip
        """What the acquirer host's answer (or its absence) makes of the pending record ``txn_id``."""
        return await self.drive(db, conclude(txn_id, request, result, ctx), render)

    async def drive(self, db: Db, steps: Step, render: Renderer, ahead: Lookahead | None = None) -> LedgerResult:
        """Answer the engine's queries, then write its plan; what to answer the terminal."""
        answer: Any = None
        while True:
            try:
                query = steps.send(answer)
            except StopIteration as stop:
                plan: Plan = stop.value
                break
            answer = ahead.answer(query) if ahead is not None else UNKNOWN
            if answer is UNKNOWN:
                answer = await self.answer(db, query)
                if ahead is not None and isinstance(query, CurrentBatch):
                    ahead.batch_found(query, answer)  # it may have opened it
                elif ahead is not None and isinstance(query, CloseBatch):
                    ahead.batches_closed()
        await self.apply(db, plan, render)
        if ahead is not None:
            _wrote_plan(ahead, plan)
        return LedgerResult(
            plan.response_code, str(plan.reason), plan.rrn, plan.approval_code, plan.replayed, len(plan.events),
            plan.answered_id, plan.host, len(plan.saf),
        )  # fmt: skip

    async def answer(self, db: Db, query: Query) -> Any:
        handler = self._handlers.get(type(query))
        if handler is None:
            raise TypeError(f"unknown query {type(query).__name__}")
        return await handler(db, query)

    async def apply(self, db: Db, plan: Plan, render: Renderer) -> None:
        """Write the plan: the record, its changes to earlier ones, batches reconciled, a case, events."""
        store = self.dialect.store
        record = plan.record
        if record is not None:
            record.id = await db.insert(_INSERT_TXN, *record_values(record, store(record.created_at)))
        for change in plan.changes:
            await _update_txn(db, change)
        outcome = plan.outcome
        if outcome is not None:
            await db.execute(
                "UPDATE txns SET status = $1, response_code = $2, reason = $3, approval_code = $4 WHERE id = $5",
                str(outcome.status), outcome.response_code, outcome.reason, outcome.approval_code, outcome.txn_id,
            )  # fmt: skip
        if plan.saf:
            created = store(record.created_at if record is not None else datetime.now(UTC))
            await db.executemany(
                "INSERT INTO saf (txn_id, action, amount, created_at) VALUES ($1, $2, $3, $4)",
                [(entry.txn_id, entry.action, entry.amount, created) for entry in plan.saf],
            )
        if plan.uploads:
            assert record is not None
            who = (record.merchant_id, record.terminal_id, record.terminal_batch or "")
            await db.executemany(
                _UPSERT_UPLOAD,
                [(*who, line.stan, line.amount, line.pan_masked, line.pan_hmac, store(record.created_at))
                 for line in plan.uploads],
            )  # fmt: skip
        if plan.batch_closes:
            await db.executemany(_RECONCILE_BATCH, [reconcile_values(c, store(c.closed_at)) for c in plan.batch_closes])
        if plan.exception is not None:
            await db.execute(_INSERT_EXCEPTION, *exception_values(plan.exception, store(plan.exception.created_at)))
        created = record.created_at if record is not None else datetime.now(UTC)
        await self.insert_events(db, plan.events, created, render)

    async def insert_events(
        self, db: Db, events: list[CorrectionEvent], created: datetime, render: Renderer
    ) -> None:
        rows = []
        for event in events:
            event_id, topic, payload = render(event)
            ordering_key = f"{event.merchant_id}/{event.terminal_id}/{event.subject_rrn}"
            rows.append((event_id, topic, payload, ordering_key, self.dialect.store(created)))
        if rows:
            await db.executemany(_INSERT_OUTBOX, rows)

    async def close_batches(self, db: Db, policy: Policy, now: datetime, render: Renderer) -> int:
        """The cut-off sweep (:func:`gateway.core.batches.close_batches_at_cutoff`); how many it closed."""
        steps = close_batches_at_cutoff(policy, now)
        answer: Any = None
        while True:
            try:
                query = steps.send(answer)
            except StopIteration as stop:
                events: list[CorrectionEvent] = stop.value
                break
            answer = await self.answer(db, query)
        await self.insert_events(db, events, now, render)
        return len(events)

    # ------------------------------------------------------------------ the engine's queries

    def _txn(self, row: Any) -> Txn:
        return txn_from_row(row, self.dialect.moment(row["created_at"]))

    async def _one(self, db: Db, sql: str, *args: Any) -> Txn | None:
        row = await db.fetchrow(sql, *args)
        return self._txn(row) if row is not None else None

    async def _find_duplicate(self, db: Db, query: FindDuplicate) -> Txn | None:
        return await self._one(
            db,
            "SELECT * FROM txns WHERE merchant_id = $1 AND stan = $2 AND mti_class = $3 AND terminal_id = $4 "
            "AND created_at >= $5 ORDER BY id DESC LIMIT 1",
            query.merchant_id, query.stan, query.mti_class, query.terminal_id, self.dialect.store(query.since),
        )  # fmt: skip

    async def _find_original(self, db: Db, query: FindOriginal) -> Txn | None:
        """The original, locked for update: corrections against one original queue here (see FindOriginal)."""
        kinds = sorted(str(kind) for kind in query.kinds)
        lock = self.dialect.lock("UPDATE")
        if query.rrn is not None:
            sql = f"SELECT * FROM txns WHERE rrn = $1 AND merchant_id = $2 AND kind IN ({_marks(3, len(kinds))})"
            return await self._one(db, sql + lock, query.rrn, query.merchant_id, *kinds)
        if query.stan is not None and query.transmission_time is not None:  # DE90 as sent
            sql = (
                "SELECT * FROM txns WHERE merchant_id = $1 AND stan = $2 AND transmission_time = $3 AND mti_class = $4 "
                f"AND kind IN ({_marks(6, len(kinds))}) ORDER BY (terminal_id = $5) DESC, id DESC LIMIT 1"
            )
            exact = (query.merchant_id, query.stan, query.transmission_time, query.mti_class, query.terminal_id)
            return await self._one(db, sql + lock, *exact, *kinds)
        if query.stan is not None and query.since is not None:  # this terminal's STAN, lately
            class_test = "" if query.mti_class is None else " AND mti_class = $5"
            first = 5 if query.mti_class is None else 6
            sql = (
                "SELECT * FROM txns WHERE merchant_id = $1 AND terminal_id = $2 AND stan = $3 AND created_at >= $4"
                f"{class_test} AND kind IN ({_marks(first, len(kinds))}) ORDER BY id DESC LIMIT 1"
            )
            args = [query.merchant_id, query.terminal_id, query.stan, self.dialect.store(query.since)]
            if query.mti_class is not None:
                args.append(query.mti_class)
            return await self._one(db, sql + lock, *args, *kinds)
        if query.approval_code is not None:
            sql = (
                "SELECT * FROM txns WHERE merchant_id = $1 AND approval_code = $2 AND pan_hmac = $3 "
                f"AND kind IN ({_marks(4, len(kinds))}) ORDER BY id DESC LIMIT 1"
            )
            return await self._one(db, sql + lock, query.merchant_id, query.approval_code, query.pan_hmac, *kinds)
        return None

    async def _find_tombstone(self, db: Db, query: FindTombstone) -> Txn | None:
        since = self.dialect.store(query.since)
        args = (query.merchant_id, query.terminal_id, since, query.stan, query.mti_class, query.amount)
        return await self._one(db, _TOMBSTONE, *args)

    async def _get_txn(self, db: Db, query: GetTxn) -> Txn | None:
        return await self._one(db, "SELECT * FROM txns WHERE id = $1" + self.dialect.lock("UPDATE"), query.txn_id)

    async def _velocity(self, db: Db, query: RefundVelocity) -> Velocity:
        since = self.dialect.store(query.since)
        terminal = await db.fetchrow(_VELOCITY.format(who="terminal_id"), query.merchant_id, since, query.terminal_id)
        card = None
        if query.pan_hmac is not None:
            card = await db.fetchrow(_VELOCITY.format(who="pan_hmac"), query.merchant_id, since, query.pan_hmac)
        assert terminal is not None
        return Velocity(int(terminal[0]), int(terminal[1]), int(card[0]) if card else 0, int(card[1]) if card else 0)

    async def _batch_txns(self, db: Db, query: BatchTxns) -> list[Txn]:
        return [self._txn(row) for row in await db.fetch("SELECT * FROM txns WHERE batch_id = $1 ORDER BY id",
                                                          query.batch_id)]  # fmt: skip

    async def _terminal_batch_txns(self, db: Db, query: TerminalBatchTxns) -> list[Txn]:
        sql = "SELECT * FROM txns WHERE merchant_id = $1 AND terminal_id = $2 AND terminal_batch = $3 ORDER BY id"
        return [self._txn(row) for row in await db.fetch(sql, query.merchant_id, query.terminal_id,
                                                         query.terminal_batch)]  # fmt: skip

    async def _pending_corrections(self, db: Db, query: PendingCorrections) -> list[Txn]:
        sql = "SELECT * FROM txns WHERE original_id = $1 AND status = 'pending' ORDER BY id"
        return [self._txn(row) for row in await db.fetch(sql, query.original_id)]

    async def _standing_corrections(self, db: Db, query: StandingCorrections) -> list[Txn]:
        sql = (
            "SELECT * FROM txns WHERE original_id = $1 AND kind IN ('refund', 'completion') "
            "AND status = 'approved' ORDER BY id"
        )
        return [self._txn(row) for row in await db.fetch(sql, query.original_id)]

    # ------------------------------------------------------------------ listings and the outbox

    async def find_txn(self, db: Db, merchant_id: str, rrn: str) -> Txn | None:
        return await self._one(db, "SELECT * FROM txns WHERE merchant_id = $1 AND rrn = $2", merchant_id, rrn)

    async def all_txns(self, db: Db) -> list[Txn]:
        return [self._txn(row) for row in await db.fetch("SELECT * FROM txns ORDER BY id")]

    async def unanswered(self, db: Db, recorded_before: datetime) -> list[Txn]:
        rows = await db.fetch(
            "SELECT * FROM txns WHERE NOT answered AND created_at < $1 ORDER BY id", self.dialect.store(recorded_before)
        )
        return [self._txn(row) for row in rows]

    async def mark_answered(self, db: Db, txn_ids: Sequence[int]) -> None:
        for start in range(0, len(txn_ids), 500):
            chunk = list(txn_ids[start:start + 500])
            await db.execute(f"UPDATE txns SET answered = $1 WHERE id IN ({_marks(2, len(chunk))})", True, *chunk)

    def _exception(self, row: Any) -> ExceptionCase:
        resolved = row["resolved_at"]
        return exception_from_row(
            row, self.dialect.moment(row["created_at"]), self.dialect.moment(resolved) if resolved else None
        )

    async def list_exceptions(self, db: Db, include_resolved: bool) -> list[ExceptionCase]:
        where = "" if include_resolved else " WHERE resolved_at IS NULL"
        return [self._exception(row) for row in await db.fetch(f"SELECT * FROM exceptions{where} ORDER BY id")]

    async def resolve_exception(self, db: Db, case_id: int, by: str, note: str, at: datetime) -> ExceptionCase | None:
        row = await db.fetchrow(
            "UPDATE exceptions SET resolved_at = $1, resolved_by = $2, resolution = $3 "
            "WHERE id = $4 AND resolved_at IS NULL RETURNING *",
            self.dialect.store(at), by, note, case_id,
        )  # fmt: skip
        return self._exception(row) if row is not None else None

    # ------------------------------------------------------------------ the host's store-and-forward queue

    async def pending_records(self, db: Db) -> list[Txn]:
        """Records still awaiting the host's answer (at start: a stop cut their exchange short)."""
        return [self._txn(row) for row in await db.fetch("SELECT * FROM txns WHERE status = 'pending' ORDER BY id")]

    def _saf(self, row: Any, txn: Txn) -> SafItem:
        moment = self.dialect.moment
        return SafItem(
            id=int(row["id"]), txn=txn, action=row["action"], amount=row["amount"], state=row["state"],
            created_at=moment(row["created_at"]), attempts=int(row["attempts"]),
            last_attempt_at=moment(row["last_attempt_at"]) if row["last_attempt_at"] is not None else None,
            finished_at=moment(row["finished_at"]) if row["finished_at"] is not None else None,
            response_code=row["response_code"], last_error=row["last_error"],
        )  # fmt: skip

    async def saf_items(self, db: Db, *, queued_only: bool, limit: int) -> list[SafItem]:
        """Queue entries in the order they are sent (oldest first), with their records."""
        where = "WHERE state = 'queued' " if queued_only else ""
        rows = await db.fetch(f"SELECT * FROM saf {where}ORDER BY id LIMIT $1", limit)
        ids = sorted({int(row["txn_id"]) for row in rows})
        txns: dict[int, Txn] = {}
        if ids:
            found = await db.fetch(f"SELECT * FROM txns WHERE id IN ({_marks(1, len(ids))})", *ids)
            txns = {txn.id: txn for txn in map(self._txn, found)}
        return [self._saf(row, txns[int(row["txn_id"])]) for row in rows]

    async def saf_attempted(self, db: Db, item_id: int, at: datetime) -> None:
        sql = "UPDATE saf SET attempts = attempts + 1, last_attempt_at = $1 WHERE id = $2"
        await db.execute(sql, self.dialect.store(at), item_id)

    async def saf_finished(self, db: Db, item: SafItem, state: str, at: datetime, response_code: str | None,
                           error: str | None, render: Renderer) -> None:  # fmt: skip
        """The host answered the entry (``acknowledged``), or it grew too old (``failed``): its event."""
        changed = await db.execute(
            "UPDATE saf SET state = $1, finished_at = $2, response_code = $3, last_error = $4 "
            "WHERE id = $5 AND state = 'queued'",
            state, self.dialect.store(at), response_code, error, item.id,
        )  # fmt: skip
        if not changed:
            return  # another instance finished it first
        outcome = "reversal_acknowledged" if state == "acknowledged" else "reversal_failed"
        if item.action == "reverse":
            details: dict[str, object] = {"attempts": item.attempts, "queued_at": item.created_at.isoformat()}
            if response_code is not None:
                details["host_response_code"] = response_code
            await self.insert_events(db, [saf_event(outcome, item.txn, reason=error, details=details)], at, render)

    async def pending(self, db: Db, limit: int) -> list[OutboxRow]:
        moment = self.dialect.moment
        rows = await db.fetch(_PENDING, limit)
        return [
            OutboxRow(int(r["id"]), r["event_id"], r["topic"], bytes(r["payload"]), r["ordering_key"], moment(r[5]))
            for r in rows
        ]

    async def mark_sent(self, db: Db, ids: Sequence[int], sent_at: datetime) -> None:
        stamp = self.dialect.store(sent_at)
        await db.executemany("UPDATE outbox SET sent_at = $1 WHERE id = $2", [(stamp, i) for i in ids])
        await self.set_meta(db, last_sent_at=sent_at.isoformat())

    async def record_error(self, db: Db, message: str, at: datetime) -> None:
        await self.set_meta(db, last_error=message[:500], last_error_at=at.isoformat())

    async def hold_lease(self, db: Db, name: str, token: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``token`` (a ``meta`` row naming its holder until an expiry),
        renewing only once half of it has passed, so that an idle holder's polls write nothing. Several
        processes may share one ledger; one of them relays events, one sends the host's queue."""
        now = int(datetime.now(UTC).timestamp() * 1_000_000)
        ttl = int(ttl_s * 1_000_000)
        row = await db.fetchrow("SELECT value FROM meta WHERE key = $1" + self.dialect.lock("UPDATE"), name)
        if row is not None:
            holder, _, expires = str(row[0]).partition(" ")
            if holder != token and int(expires or 0) > now:
                return False
            if holder == token and int(expires or 0) - now > ttl // 2:
                return True
        await self.set_meta(db, **{name: f"{token} {now + ttl}"})
        return True

    async def release_lease(self, db: Db, name: str, token: str) -> None:
        await db.execute("DELETE FROM meta WHERE key = $1 AND value LIKE $2", name, f"{token} %")

    async def set_meta(self, db: Db, **values: str) -> None:
        await db.executemany(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            list(values.items()),
        )

    async def prune(self, db: Db, sent_before: datetime) -> int:
        return await db.execute(
            "DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < $1", self.dialect.store(sent_before)
        )

    async def status(self, db: Db) -> OutboxStatus:
        row = await db.fetchrow("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE sent_at IS NULL")
        assert row is not None
        meta = {r[0]: r[1] for r in await db.fetch("SELECT key, value FROM meta")}

        def moment(key: str) -> datetime | None:
            return datetime.fromisoformat(meta[key]) if meta.get(key) else None

        return OutboxStatus(
            pending=int(row[0]),
            oldest_pending_at=self.dialect.moment(row[1]) if row[1] is not None else None,
            last_error=meta.get("last_error"),
            last_error_at=moment("last_error_at"),
            last_sent_at=moment("last_sent_at"),
        )


def _wrote_plan(ahead: Lookahead, plan: Plan) -> None:
    """What a plan written tells ``ahead``: its record, changes to others, batches closed."""
    if plan.record is not None:
        ahead.recorded(plan.record)
    for change in plan.changes:
        ahead.changed(change.txn_id, change.status)
    if plan.outcome is not None:
        ahead.changed(plan.outcome.txn_id, plan.outcome.status)
    if plan.batch_closes:
        ahead.batches_closed()


async def _update_txn(db: Db, change: TxnChange) -> None:
    """One change to a record, setting only what it sets."""
    sets: list[str] = []
    values: list[Any] = []
    for column, value in (
        ("status", str(change.status) if change.status is not None else None),
        ("effective_amount", change.effective_amount),
        ("completed", change.completed),
        ("reversed_after_settlement", change.reversed_after_settlement),
    ):
        if value is not None:
            values.append(value)
            sets.append(f"{column} = ${len(values)}")
    if change.refunded_delta:
        values.append(change.refunded_delta)
        sets.append(f"refunded_amount = refunded_amount + ${len(values)}")
    if sets:
        await db.execute(f"UPDATE txns SET {', '.join(sets)} WHERE id = ${len(values) + 1}", *values, change.txn_id)
