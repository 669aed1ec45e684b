"""The PostgreSQL ledger: several gateway instances share one ledger (design sections 2, 5, 8).

Same public API and semantics as :class:`gateway.adapters.sqlite_ledger.SqliteLedger`. Every
:meth:`PostgresLedger.process` call drives the pure engine (:func:`gateway.core.engine.process`)
inside ONE transaction (READ COMMITTED) on a pooled connection, answering each query with SQL:

- first, transaction-scoped advisory locks, taken in sorted order: the request's retransmission key
  (merchant + terminal + STAN), for a reversal also the key of the request it names (so a reversal and
  its late original cannot both miss each other: the tombstone race), and for velocity-limited refunds
  the terminal's and the card's refund counters. Two instances receiving the same retransmission
  therefore run one after the other, and the second finds the first's record;
- ``FindOriginal`` and ``GetTxn`` read with ``SELECT ... FOR UPDATE``: corrections against one original
  serialise on its row, across instances; under READ COMMITTED the waiting transaction then reads
  the row as the first one committed it, so no interleaving can refund more than the original;
- batches are read ``FOR SHARE`` (``FOR UPDATE`` by a settlement), so a settlement or the cut-off
  waits for transactions still writing into the batch, and a void never approves against a batch
  that is being closed; a terminal's open batch is created race-free with ``INSERT ... ON CONFLICT
  DO NOTHING`` on a unique partial index, then re-selected;
- RRNs come from a SEQUENCE of blocks of 1000, handed out in memory (one round trip per block).

A deadlock (possible only in contrived interleavings of reversals and settlements) or a
serialization failure rolls the transaction back and runs the request again, a few times.

The outbox is shared by the instances. To keep one publisher (and the per-original order of
events), :meth:`pending` returns rows only to the instance holding the relay lease, a session-level
advisory lock on a dedicated connection; when that instance stops, another takes the lease at its
next poll. See docs/postgresql.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

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
from gateway.core.cards import pan_digest
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
    UnreconciledBatches,
    close_batches_at_cutoff,
    process,
)
from gateway.core.events import CorrectionEvent
from gateway.core.model import (
    Batch,
    BatchSummary,
    ExceptionCase,
    Kind,
    Request,
    Txn,
)
from gateway.core.policy import Policy, Velocity
from gateway.ports import LedgerDone, LedgerPrepare, LedgerResult, OutboxRow, OutboxStatus, Renderer

#: versioned migrations; version N is MIGRATIONS[N - 1]: (description, SQL script)
MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "ledger, batches, outbox, relay state, RRN sequence",
        """
        CREATE TABLE batches (
            id bigserial PRIMARY KEY,
            merchant_id text NOT NULL,
            terminal_id text NOT NULL,
            batch_no text NOT NULL,
            state text NOT NULL CHECK (state IN ('open', 'closed')),
            opened_at timestamptz NOT NULL,
            closed_at timestamptz,
            result text,
            terminal_totals text,
            ledger_totals text
        );
        CREATE UNIQUE INDEX batches_one_open ON batches (merchant_id, terminal_id) WHERE state = 'open';
        CREATE INDEX batches_terminal ON batches (merchant_id, terminal_id, id);
        CREATE INDEX batches_open_since ON batches (opened_at) WHERE state = 'open';
        CREATE TABLE txns (
            id bigserial PRIMARY KEY,
            kind text NOT NULL,
            mti text NOT NULL,
            mti_class text NOT NULL,
            processing_code text NOT NULL,
            merchant_id text NOT NULL,
            terminal_id text NOT NULL,
            stan text NOT NULL,
            transmission_time text NOT NULL,
            amount bigint NOT NULL,
            currency text NOT NULL,
            pan_masked text CHECK (pan_masked IS NULL OR strpos(pan_masked, '*') > 0),
            pan_hmac text,
            rrn text UNIQUE,
            approval_code text,
            response_code text NOT NULL,
            reason text,
            status text NOT NULL,
            effective_amount bigint NOT NULL,
            refunded_amount bigint NOT NULL DEFAULT 0,
            completed boolean NOT NULL DEFAULT false,
            original_id bigint REFERENCES txns (id),
            batch_id bigint REFERENCES batches (id),
            created_at timestamptz NOT NULL,
            fingerprint text NOT NULL,
            ref_rrn text,
            ref_mti text,
            ref_stan text,
            ref_time text,
            ref_approval text,
            ref_same_stan boolean NOT NULL DEFAULT false,
            reversed_after_settlement boolean NOT NULL DEFAULT false,
            CHECK (amount >= 0 AND effective_amount >= 0 AND refunded_amount >= 0)
        );
        CREATE INDEX txns_key ON txns (merchant_id, terminal_id, stan, transmission_time, mti_class);
        CREATE INDEX txns_original_data ON txns (merchant_id, stan, transmission_time, mti_class);
        CREATE INDEX txns_approval ON txns (merchant_id, approval_code) WHERE approval_code IS NOT NULL;
        CREATE INDEX txns_batch ON txns (batch_id);
        CREATE INDEX txns_refunds_terminal ON txns (merchant_id, terminal_id, created_at) WHERE kind = 'refund';
        CREATE INDEX txns_refunds_card ON txns (merchant_id, pan_hmac, created_at) WHERE kind = 'refund';
        CREATE INDEX txns_tombstones ON txns (merchant_id, terminal_id) WHERE status = 'unmatched';
        CREATE TABLE outbox (
            id bigserial PRIMARY KEY,
            event_id text NOT NULL UNIQUE,
            topic text NOT NULL,
            payload bytea NOT NULL,
            ordering_key text NOT NULL,
            created_at timestamptz NOT NULL,
            sent_at timestamptz
        );
        CREATE INDEX outbox_pending ON outbox (id) WHERE sent_at IS NULL;
        CREATE INDEX outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;
        CREATE TABLE relay_state (
            id integer PRIMARY KEY CHECK (id = 1),
            last_error text,
            last_error_at timestamptz,
            last_sent_at timestamptz
        );
        INSERT INTO relay_state (id) VALUES (1);
        CREATE SEQUENCE rrn_blocks AS bigint MINVALUE 1 MAXVALUE 999999999 CYCLE;
        """,
    ),
    (
        "refund controls II: duplicate key without DE7, batch reconciliation, exceptions, corrections index",
        """
        DROP INDEX txns_key;
        DROP INDEX txns_original_data;
        CREATE INDEX txns_key ON txns (merchant_id, stan, mti_class, terminal_id, transmission_time);
        CREATE INDEX txns_corrections ON txns (original_id) WHERE original_id IS NOT NULL;
        ALTER TABLE batches ADD COLUMN closed_by text CHECK (closed_by IN ('settlement', 'cutoff'));
        UPDATE batches SET closed_by = 'cutoff', result = NULL WHERE result = 'cutoff';
        UPDATE batches SET closed_by = 'settlement' WHERE result IN ('settled', 'mismatch');
        CREATE INDEX batches_unreconciled ON batches (merchant_id, terminal_id, id)
            WHERE closed_by = 'cutoff' AND result IS NULL;
        CREATE TABLE exceptions (
            id bigserial PRIMARY KEY,
            kind text NOT NULL,
            merchant_id text NOT NULL,
            terminal_id text NOT NULL,
            original_rrn text,
            summary text NOT NULL,
            details text NOT NULL,
            created_at timestamptz NOT NULL,
            resolved_at timestamptz,
            resolved_by text,
            resolution text
        );
        CREATE INDEX exceptions_open ON exceptions (id) WHERE resolved_at IS NULL;
        """,
    ),
    (
        "answered: whether a record's answer was written to its terminal",
        """
        ALTER TABLE txns ADD COLUMN answered boolean NOT NULL DEFAULT false;
        UPDATE txns SET answered = true;
        """,
    ),
)

#: RRNs handed out in memory per sequence value
RRN_BLOCK = 1000
#: attempts of one request when PostgreSQL reports a deadlock or a serialization failure
MAX_ATTEMPTS = 4
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_TXN_COLUMNS = ", ".join(TXN_COLUMNS)
_EVENTS_SELECT = (
    "SELECT e.event_id, e.topic, e.payload, e.ordering_key, {created} FROM unnest({first}::text[], {second}::text[],"
    " {third}::bytea[], {fourth}::text[]) WITH ORDINALITY AS e(event_id, topic, payload, ordering_key, n) ORDER BY e.n"
)
#: a replay's or a conflict's event: event ids, topics, payloads, ordering keys, created at
_INSERT_EVENTS = "INSERT INTO outbox (event_id, topic, payload, ordering_key, created_at) " + _EVENTS_SELECT.format(
    first="$1", second="$2", third="$3", fourth="$4", created="$5"
)
#: the record ($1-$30), the changes to earlier records ($31-$36: ids, status, refunded delta, effective
#: amount, completed, reversed after settlement) and the events ($37-$40), in one statement
_WRITE = (
    "WITH changes AS ("
    " UPDATE txns t SET status = COALESCE(c.status, t.status), refunded_amount = t.refunded_amount + c.delta,"
    " effective_amount = COALESCE(c.effective, t.effective_amount), completed = COALESCE(c.completed, t.completed),"
    " reversed_after_settlement = COALESCE(c.late, t.reversed_after_settlement)"
    " FROM unnest($31::bigint[], $32::text[], $33::bigint[], $34::bigint[], $35::boolean[], $36::boolean[])"
    " AS c(id, status, delta, effective, completed, late) WHERE t.id = c.id RETURNING t.id"
    "), events AS ("
    " INSERT INTO outbox (event_id, topic, payload, ordering_key, created_at) "
    + _EVENTS_SELECT.format(first="$37", second="$38", third="$39", fourth="$40", created="$23")
    + " RETURNING id"
    f") INSERT INTO txns ({_TXN_COLUMNS}) VALUES ({', '.join(f'${n}' for n in range(1, 31))}) RETURNING id"
)


#: parameters of both: merchant, terminal, STAN, MTI class, since; the tombstone also the amount ($6)
_DUPLICATE_WHERE = "merchant_id = $1 AND stan = $3 AND mti_class = $4 AND terminal_id = $2 AND created_at >= $5"
_TOMBSTONE_WHERE = (
    "merchant_id = $1 AND terminal_id = $2 AND status = 'unmatched' AND created_at >= $5 AND ("
    " (ref_stan = $3 AND substr(ref_mti, 1, 3) = $4) OR (ref_same_stan AND stan = $3 AND amount = $6))"
)
_FIND_DUPLICATE = f"SELECT * FROM txns WHERE {_DUPLICATE_WHERE} ORDER BY id DESC LIMIT 1"
_FIND_TOMBSTONE = f"SELECT * FROM txns WHERE {_TOMBSTONE_WHERE} ORDER BY id DESC LIMIT 1"
_FIND_DUPLICATE_AND_TOMBSTONE = (
    f"(SELECT 'duplicate' AS found, * FROM txns WHERE {_DUPLICATE_WHERE} ORDER BY id DESC LIMIT 1) UNION ALL "
    f"(SELECT 'tombstone' AS found, * FROM txns WHERE {_TOMBSTONE_WHERE} ORDER BY id DESC LIMIT 1)"
)
#: a batch reconciled by a 0500 (see ledger_rows.reconcile_values)
_RECONCILE_BATCH = (
    "UPDATE batches SET state = 'closed', closed_at = COALESCE(closed_at, $1), "
    "closed_by = COALESCE(closed_by, 'settlement'), result = $2, terminal_totals = $3, ledger_totals = $4 "
    "WHERE id = $5 AND result IS NULL"
)
_INSERT_EXCEPTION = (
    f"INSERT INTO exceptions ({', '.join(EXCEPTION_COLUMNS)}) "
    f"VALUES ({', '.join(f'${n}' for n in range(1, len(EXCEPTION_COLUMNS) + 1))})"
)


def _tombstone_fields(query: FindTombstone) -> tuple[str, str, str, str, datetime, int]:
    """The parameters of _TOMBSTONE_WHERE (and of _DUPLICATE_WHERE, which uses the first five)."""
    return (query.merchant_id, query.terminal_id, query.stan, query.mti_class, query.since, query.amount)


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts`` (stable across instances and restarts).

    Computed here rather than with ``hashtext()`` so the keys of one request can be sorted before
    they are taken: two requests needing the same two keys always take them in the same order.
    """
    digest = hashlib.blake2b("\x1f".join(("iso-gateway", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _txn(row: Any) -> Txn:
    return txn_from_row(row, _utc(row["created_at"]))


def _exception(row: Any) -> ExceptionCase:
    resolved = row["resolved_at"]
    return exception_from_row(row, _utc(row["created_at"]), None if resolved is None else _utc(resolved))


def _rendered(events: list[CorrectionEvent], render: Renderer) -> tuple[list[str], list[str], list[bytes], list[str]]:
    """Events as the outbox statements take them: ids, topics, payloads, ordering keys."""
    event_ids: list[str] = []
    topics: list[str] = []
    payloads: list[bytes] = []
    ordering_keys: list[str] = []
    for event in events:
        event_id, topic, payload = render(event)
        event_ids.append(event_id)
        topics.append(topic)
        payloads.append(payload)
        ordering_keys.append(f"{event.merchant_id}/{event.terminal_id}/{event.subject_rrn}")
    return event_ids, topics, payloads, ordering_keys


def _batch(row: Any) -> Batch:
    closed = row["closed_at"]
    return batch_from_row(row, _utc(row["opened_at"]), None if closed is None else _utc(closed))


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _merge_changes(changes: tuple[TxnChange, ...]) -> list[TxnChange]:
    """One change per record (an UPDATE ... FROM applies one row per target), same effect as in sequence."""
    merged: dict[int, TxnChange] = {}
    for change in changes:
        before = merged.get(change.txn_id)
        if before is None:
            merged[change.txn_id] = change
            continue
        merged[change.txn_id] = TxnChange(
            change.txn_id,
            status=change.status if change.status is not None else before.status,
            refunded_delta=before.refunded_delta + change.refunded_delta,
            effective_amount=change.effective_amount
            if change.effective_amount is not None
            else before.effective_amount,
            completed=change.completed if change.completed is not None else before.completed,
            reversed_after_settlement=(
                change.reversed_after_settlement
                if change.reversed_after_settlement is not None
                else before.reversed_after_settlement
            ),
        )
    return list(merged.values())


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 3`` or ``DELETE 0``."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresLedger:
    """Ledger and outbox in one PostgreSQL database (or schema), shared by several gateway instances.

    Use :meth:`open` / :meth:`close` (or ``async with``). ``url`` is a ``postgresql://`` URL (query
    parameters other than libpq's connection options are passed to the server as settings, e.g.
    ``?search_path=gateway``); ``server_settings`` adds or overrides such settings.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        server_settings: dict[str, str] | None = None,
        command_timeout_s: float = 30.0,
        relay_lease: bool = True,
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("a PostgreSQL ledger needs a postgresql:// URL")
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._server_settings = {
            "application_name": "iso-gateway",
            # a transaction of this ledger never idles: one that does (a frozen instance) must not hold
            # the rows and locks other instances wait for
            "idle_in_transaction_session_timeout": "10000",
            **(server_settings or {}),
        }
        self._command_timeout_s = command_timeout_s
        self._relay_lease = relay_lease
        self._pool: Any = None
        self._schema = ""
        self._rrn_next = 0
        self._rrn_limit = 0
        self._lease_conn: Any = None
        self._lease_held = False
        self._lease_lock = asyncio.Lock()
        #: called on the event loop after a commit that wrote outbox events
        self.on_events: Callable[[], None] | None = None
        #: called after every commit with the number of requests it made durable
        self.on_commit: Callable[[int], None] | None = None
        self.commits = 0
        #: transactions run again after a deadlock or serialization failure
        self.retries = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> PostgresLedger:
        if self._pool is not None:
            return self
        pool = await asyncpg.create_pool(
            self.url,
            min_size=self._min_size,
            max_size=self._max_size,
            server_settings=self._server_settings,
            command_timeout=self._command_timeout_s,
        )
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn)
                self._schema = str(await conn.fetchval("SELECT current_schema()"))
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        return self

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        async with self._lease_lock:
            lease, self._lease_conn = self._lease_conn, None
            self._lease_held = False
            if lease is not None:
                await lease.close()
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> PostgresLedger:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def schema(self) -> str:
        """The schema the tables live in (the first of ``search_path``)."""
        return self._schema

    @staticmethod
    async def _migrate(conn: Any) -> None:
        """Apply the missing migrations, one instance at a time (an advisory lock guards it)."""
        async with conn.transaction():
            schema = str(await conn.fetchval("SELECT current_schema()"))
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key("migrate", schema))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version integer PRIMARY KEY,"
                " description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            version = int(await conn.fetchval("SELECT COALESCE(max(version), 0) FROM schema_version"))
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"the ledger schema is at version {version}, newer than this release ({len(MIGRATIONS)})"
                )
            for number, (description, script) in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(script)
                await conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES ($1, $2)", number, description
                )

    def _acquire(self) -> Any:
        if self._pool is None:
            raise LedgerClosedError("ledger closed")
        return self._pool.acquire()

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        request: Request,
        ctx: Context,
        render: Renderer,
        done: LedgerDone,
        prepare: LedgerPrepare | None = None,
    ) -> None:
        """:meth:`process` for the service: ``done(result, None)`` after the commit, ``done(None, error)``
        if it failed (nothing of it was committed). ``prepare`` is not used: each request commits on
        a connection of its own while the event loop serves the others, so there is no shared commit
        wait to fill."""
        task = asyncio.ensure_future(self.process(request, ctx, render))

        def finished(task: asyncio.Future[LedgerResult]) -> None:
            if task.cancelled():
                done(None, LedgerClosedError("ledger request cancelled"))
                return
            error = task.exception()
            if error is None:
                done(task.result(), None)
            elif isinstance(error, Exception):
                done(None, error)
            else:  # KeyboardInterrupt, SystemExit: not the request's to handle
                done(None, LedgerClosedError(type(error).__name__))

        task.add_done_callback(finished)

    async def process(self, request: Request, ctx: Context, render: Renderer) -> LedgerResult:
        """Decide and record one request in one transaction; returns after the commit."""
        # one message opens the transaction and takes the locks (integers only: nothing to escape)
        begin = "BEGIN; " + "; ".join(f"SELECT pg_advisory_xact_lock({key})" for key in self._lock_keys(request, ctx))
        async with self._acquire() as conn:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    await conn.execute(begin)
                    result = await self._process(conn, request, ctx, render)
                    await conn.execute("COMMIT")
                except Exception as exc:
                    if not conn.is_closed() and conn.is_in_transaction():
                        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                            await conn.execute("ROLLBACK")
                    if not isinstance(exc, _RETRYABLE) or attempt == MAX_ATTEMPTS:
                        raise
                    self.retries += 1
                    continue
                break
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit(1)
        if result.events and self.on_events is not None:
            self.on_events()
        return result

    def _lock_keys(self, request: Request, ctx: Context) -> list[int]:
        """The advisory locks this request takes first, in sorted order."""
        merchant, terminal = request.merchant_id, request.terminal_id
        stans = {request.stan}
        ref = request.reference
        if request.kind is Kind.REVERSAL and ref is not None and ref.stan is not None:
            stans.add(ref.stan)  # its original, or a tombstone that original will look for
        keys = {lock_key("txn", self._schema, merchant, terminal, stan) for stan in stans}
        if request.kind is Kind.REFUND and ctx.policy.velocity_limited:
            keys.add(lock_key("velocity-terminal", self._schema, merchant, terminal))
            if request.pan:
                keys.add(lock_key("velocity-card", self._schema, merchant, pan_digest(ctx.pan_key, request.pan)))
        return sorted(keys)

    async def _process(self, conn: Any, request: Request, ctx: Context, render: Renderer) -> LedgerResult:
        steps = process(request, ctx)
        answer: Any = None
        #: answers read ahead with an earlier query (saves a round trip), by the query they answer
        ahead: dict[Query, Any] = {}
        while True:
            try:
                query = steps.send(answer)
            except StopIteration as stop:
                plan: Plan = stop.value
                break
            if query in ahead:
                answer = ahead.pop(query)
            elif isinstance(query, FindDuplicate) and request.kind not in (Kind.REVERSAL, Kind.SETTLEMENT):
                tombstone_query = FindTombstone(
                    query.merchant_id, query.terminal_id, query.stan, query.mti_class, request.amount or 0, query.since
                )
                answer, tombstone = await self._duplicate_and_tombstone(conn, tombstone_query)
                ahead[tombstone_query] = tombstone
            else:
                answer = await self._answer(conn, request, query)
        await self._apply(conn, plan, render)
        return LedgerResult(
            plan.response_code,
            plan.reason.value,
            plan.rrn,
            plan.approval_code,
            plan.replayed,
            len(plan.events),
            plan.answered_id,
        )

    async def _answer(self, conn: Any, request: Request | None, query: Query) -> Any:
        if isinstance(query, FindDuplicate):
            row = await conn.fetchrow(
                _FIND_DUPLICATE, query.merchant_id, query.terminal_id, query.stan, query.mti_class, query.since
            )
            return _txn(row) if row else None
        if isinstance(query, FindOriginal):
            return await self._find_original(conn, query)
        if isinstance(query, GetTxn):
            row = await conn.fetchrow("SELECT * FROM txns WHERE id = $1 FOR UPDATE", query.txn_id)
            return _txn(row) if row else None
        if isinstance(query, GetBatch):
            # FOR SHARE: a settlement or the cut-off cannot close it under this transaction
            row = await conn.fetchrow("SELECT * FROM batches WHERE id = $1 FOR SHARE", query.batch_id)
            return _batch(row) if row else None
        if isinstance(query, FindTombstone):
            row = await conn.fetchrow(_FIND_TOMBSTONE, *_tombstone_fields(query))
            return _txn(row) if row else None
        if isinstance(query, CurrentBatch):
            exclusive = request is not None and request.kind is Kind.SETTLEMENT
            return await self._current_batch(conn, query, exclusive=exclusive)
        if isinstance(query, CloseBatch):
            status = await conn.execute(
                "UPDATE batches SET state = 'closed', closed_at = $1, closed_by = 'cutoff' "
                "WHERE id = $2 AND state = 'open'",
                query.closed_at,
                query.batch_id,
            )
            return _rowcount(status) == 1
        if isinstance(query, StaleBatches):
            # FOR UPDATE: each is closed next (waiting for requests still writing into it)
            rows = await conn.fetch(
                "SELECT * FROM batches WHERE state = 'open' AND opened_at < $1 ORDER BY id FOR UPDATE",
                query.opened_before,
            )
            return [_batch(row) for row in rows]
        if isinstance(query, UnreconciledBatches):
            rows = await conn.fetch(
                "SELECT * FROM batches WHERE merchant_id = $1 AND terminal_id = $2 AND closed_by = 'cutoff' "
                "AND result IS NULL ORDER BY id FOR UPDATE",
                query.merchant_id,
                query.terminal_id,
            )
            return [_batch(row) for row in rows]
        if isinstance(query, StandingCorrections):
            rows = await conn.fetch(
                "SELECT * FROM txns WHERE original_id = $1 AND kind IN ('refund', 'completion') "
                "AND status = 'approved' ORDER BY id",
                query.original_id,
            )
            return [_txn(row) for row in rows]
        if isinstance(query, RefundVelocity):
            return await self._velocity(conn, query)
        if isinstance(query, NextRrn):
            return await self._next_rrn(conn)
        if isinstance(query, BatchTxns):
            rows = await conn.fetch("SELECT * FROM txns WHERE batch_id = $1 ORDER BY id", query.batch_id)
            return [_txn(row) for row in rows]
        raise TypeError(f"unknown query {type(query).__name__}")

    @staticmethod
    async def _duplicate_and_tombstone(conn: Any, query: FindTombstone) -> tuple[Txn | None, Txn | None]:
        """A request's two look-ups in one round trip: an earlier copy of it, and a reversal that named it.

        Reading the tombstone this early is the same as reading it later: the advisory lock on this
        merchant + terminal + STAN, held since the start, keeps reversals that name it out until commit.
        """
        found: dict[str, Txn] = {}
        for row in await conn.fetch(_FIND_DUPLICATE_AND_TOMBSTONE, *_tombstone_fields(query)):
            found[row["found"]] = _txn(row)
        return found.get("duplicate"), found.get("tombstone")

    @staticmethod
    async def _find_original(conn: Any, query: FindOriginal) -> Txn | None:
        """The original, locked FOR UPDATE: corrections against it queue here, across instances.

        Every column these queries filter on is immutable, so the row a waiting transaction gets
        once the lock is free is the one it asked for, as the previous holder committed it.
        """
        kinds = sorted(kind.value for kind in query.kinds)
        if query.rrn is not None:
            row = await conn.fetchrow(
                "SELECT * FROM txns WHERE merchant_id = $1 AND rrn = $2 AND kind = ANY($3::text[]) FOR UPDATE",
                query.merchant_id,
                query.rrn,
                kinds,
            )
        elif query.stan is not None and query.transmission_time is not None:
            row = await conn.fetchrow(
                "SELECT * FROM txns WHERE merchant_id = $1 AND stan = $2 AND transmission_time = $3 "
                "AND ($4::text IS NULL OR mti_class = $4) AND kind = ANY($5::text[]) "
                "ORDER BY (terminal_id = $6) DESC, id DESC LIMIT 1 FOR UPDATE",
                query.merchant_id,
                query.stan,
                query.transmission_time,
                query.mti_class,
                kinds,
                query.terminal_id,
            )
        elif query.stan is not None and query.since is not None:
            row = await conn.fetchrow(
                "SELECT * FROM txns WHERE merchant_id = $1 AND terminal_id = $2 AND stan = $3 AND created_at >= $4 "
                "AND ($5::text IS NULL OR mti_class = $5) AND kind = ANY($6::text[]) "
                "ORDER BY id DESC LIMIT 1 FOR UPDATE",
                query.merchant_id,
                query.terminal_id,
                query.stan,
                query.since,
                query.mti_class,
                kinds,
            )
        elif query.approval_code is not None:
            row = await conn.fetchrow(
                "SELECT * FROM txns WHERE merchant_id = $1 AND approval_code = $2 AND pan_hmac = $3 "
                "AND kind = ANY($4::text[]) ORDER BY id DESC LIMIT 1 FOR UPDATE",
                query.merchant_id,
                query.approval_code,
                query.pan_hmac,
                kinds,
            )
        else:
            return None
        return _txn(row) if row else None

    @staticmethod
    async def _current_batch(conn: Any, query: CurrentBatch, *, exclusive: bool) -> Batch | None:
        """The terminal's open batch, locked FOR SHARE (FOR UPDATE by the settlement that closes it).

        A settlement waits for every transaction still writing into the batch; one that comes after
        the settlement committed no longer sees the batch open and opens the next one. Opening is
        race-free: the unique partial index admits one open batch per terminal, the loser of the
        race waits for the winner's commit and then reads its batch.
        """
        mode = "UPDATE" if exclusive else "SHARE"
        select = f"SELECT * FROM batches WHERE merchant_id = $1 AND terminal_id = $2 AND state = 'open' FOR {mode}"
        for _ in range(MAX_ATTEMPTS):
            row = await conn.fetchrow(select, query.merchant_id, query.terminal_id)
            if row is not None or not query.create:
                return _batch(row) if row else None
            row = await conn.fetchrow(
                "INSERT INTO batches (merchant_id, terminal_id, batch_no, state, opened_at) "
                "SELECT $1, $2, lpad((COALESCE((SELECT batch_no::integer FROM batches "
                "  WHERE merchant_id = $1 AND terminal_id = $2 ORDER BY id DESC LIMIT 1), 0) % 999999 + 1)::text,"
                "  6, '0'), 'open', $3 "
                "ON CONFLICT (merchant_id, terminal_id) WHERE state = 'open' DO NOTHING RETURNING *",
                query.merchant_id,
                query.terminal_id,
                query.now,
            )
            if row is not None:
                return _batch(row)
            # another instance opened it meanwhile (and committed): read it on the next turn
        raise RuntimeError("cannot open a batch: it is closed as fast as it is opened")

    @staticmethod
    async def _velocity(conn: Any, query: RefundVelocity) -> Velocity:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE terminal_id = $3),"
            " COALESCE(sum(effective_amount) FILTER (WHERE terminal_id = $3), 0),"
            " count(*) FILTER (WHERE pan_hmac = $4),"
            " COALESCE(sum(effective_amount) FILTER (WHERE pan_hmac = $4), 0) "
            "FROM txns WHERE kind = 'refund' AND status = 'approved' AND merchant_id = $1 AND created_at >= $2 "
            "AND (terminal_id = $3 OR pan_hmac = $4)",
            query.merchant_id,
            query.since,
            query.terminal_id,
            query.pan_hmac,
        )
        return Velocity(int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    async def _next_rrn(self, conn: Any) -> str:
        if self._rrn_next >= self._rrn_limit:
            block = int(await conn.fetchval("SELECT nextval('rrn_blocks')"))
            if self._rrn_next >= self._rrn_limit:  # unless a concurrent request refilled it meanwhile
                self._rrn_next, self._rrn_limit = block * RRN_BLOCK, (block + 1) * RRN_BLOCK
        value = self._rrn_next
        self._rrn_next += 1
        return f"{value % 10**12:012d}"

    @staticmethod
    async def _apply(conn: Any, plan: Plan, render: Renderer) -> None:
        """Write the plan: the record, its changes to earlier records and its events in one statement."""
        record = plan.record
        created = record.created_at if record is not None else datetime.now(UTC)
        events = _rendered(plan.events, render)
        if plan.batch_closes:
            await conn.executemany(
                _RECONCILE_BATCH, [reconcile_values(close, close.closed_at) for close in plan.batch_closes]
            )
        if plan.exception is not None:
            await conn.execute(_INSERT_EXCEPTION, *exception_values(plan.exception, plan.exception.created_at))
        if record is None:  # a replay or a conflict: its event only
            if plan.events:
                await conn.execute(_INSERT_EVENTS, *events, created)
            return
        changes = _merge_changes(plan.changes)
        record.id = await conn.fetchval(
            _WRITE,
            *record_values(record, record.created_at),
            [change.txn_id for change in changes],
            [change.status.value if change.status is not None else None for change in changes],
            [change.refunded_delta for change in changes],
            [change.effective_amount for change in changes],
            [change.completed for change in changes],
            [change.reversed_after_settlement for change in changes],
            *events,
        )

    # ------------------------------------------------------------------ batches

    async def close_batches(self, policy: Policy, now: datetime, render: Renderer) -> int:
        """The cut-off sweep (:func:`gateway.core.engine.close_batches_at_cutoff`): close every batch
        still open past the latest cut-off, with its ``pos.batch.closed`` event. Returns how many.

        The batches are locked FOR UPDATE first: the sweep waits for requests still writing into them
        (they hold them FOR SHARE)."""
        async with self._acquire() as conn, conn.transaction():
            steps = close_batches_at_cutoff(policy, now)
            answer: Any = None
            while True:
                try:
                    query = steps.send(answer)
                except StopIteration as stop:
                    events: list[CorrectionEvent] = stop.value
                    break
                answer = await self._answer(conn, None, query)
            if events:
                await conn.execute(_INSERT_EVENTS, *_rendered(events, render), now)
        if events and self.on_events is not None:
            self.on_events()
        return len(events)

    # ------------------------------------------------------------------ answers

    async def mark_answered(self, txn_ids: Sequence[int]) -> None:
        """Record that these records' answers were written to their terminals."""
        async with self._acquire() as conn:
            await conn.execute("UPDATE txns SET answered = true WHERE id = ANY($1::bigint[])", list(txn_ids))

    async def unanswered(self, recorded_before: datetime) -> list[Txn]:
        """Records not known to have been answered, recorded before ``recorded_before`` (oldest first)."""
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM txns WHERE NOT answered AND created_at < $1 ORDER BY id", recorded_before
            )
        return [_txn(row) for row in rows]

    # ------------------------------------------------------------------ exceptions

    async def list_exceptions(self, *, include_resolved: bool = False) -> list[ExceptionCase]:
        """Cases for an operator (reversal conflicts), oldest first; open ones only unless asked."""
        where = "" if include_resolved else " WHERE resolved_at IS NULL"
        async with self._acquire() as conn:
            rows = await conn.fetch(f"SELECT * FROM exceptions{where} ORDER BY id")
        return [_exception(row) for row in rows]

    async def resolve_exception(self, case_id: int, *, by: str, note: str, at: datetime) -> ExceptionCase | None:
        """Mark an open case resolved, with who and why; None when there is no such open case."""
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE exceptions SET resolved_at = $1, resolved_by = $2, resolution = $3 "
                "WHERE id = $4 AND resolved_at IS NULL RETURNING *",
                at,
                by,
                note,
                case_id,
            )
        return _exception(row) if row else None

    async def list_batches(
        self, merchant: str | None = None, terminal: str | None = None, open_only: bool = False
    ) -> list[BatchSummary]:
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT b.*,"
                " count(*) FILTER (WHERE t.status = 'approved' AND t.kind IN ('purchase', 'completion')) AS dc,"
                " COALESCE(sum(t.effective_amount) FILTER (WHERE t.status = 'approved'"
                "   AND t.kind IN ('purchase', 'completion')), 0) AS da,"
                " count(*) FILTER (WHERE t.status = 'approved' AND t.kind = 'refund') AS cc,"
                " COALESCE(sum(t.effective_amount) FILTER (WHERE t.status = 'approved' AND t.kind = 'refund'), 0)"
                "   AS ca,"
                " max(t.currency) AS currency"
                " FROM batches b LEFT JOIN txns t ON t.batch_id = b.id"
                " WHERE ($1::text IS NULL OR b.merchant_id = $1) AND ($2::text IS NULL OR b.terminal_id = $2)"
                " AND (NOT $3 OR b.state = 'open') GROUP BY b.id ORDER BY b.id",
                merchant,
                terminal,
                open_only,
            )
        return [summary_from_row(row, _batch(row)) for row in rows]

    async def find_txn(self, merchant_id: str, rrn: str) -> Txn | None:
        """A record by its RRN (for tools and tests)."""
        async with self._acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM txns WHERE merchant_id = $1 AND rrn = $2", merchant_id, rrn)
        return _txn(row) if row else None

    async def all_txns(self) -> list[Txn]:
        """Every record in id order (for tools and tests)."""
        async with self._acquire() as conn:
            rows = await conn.fetch("SELECT * FROM txns ORDER BY id")
        return [_txn(row) for row in rows]

    # ------------------------------------------------------------------ outbox port

    async def pending(self, limit: int) -> Sequence[OutboxRow]:
        """Unsent rows in id order, for the instance holding the relay lease; none for the others."""
        if not self._relay_lease:
            async with self._acquire() as conn:
                return _outbox_rows(await conn.fetch(_PENDING, limit))
        if self._pool is None:
            raise LedgerClosedError("ledger closed")
        async with self._lease_lock:
            conn = self._lease_conn
            if conn is None or conn.is_closed():
                self._lease_held = False
                self._lease_conn = conn = await asyncpg.connect(
                    self.url, server_settings=self._server_settings, command_timeout=self._command_timeout_s
                )
            try:
                if not self._lease_held:
                    key = lock_key("outbox-relay", self._schema)
                    self._lease_held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
                    if not self._lease_held:
                        return []
                # read on the lease connection: if it died, the lease may be another instance's now
                return _outbox_rows(await conn.fetch(_PENDING, limit))
            except (OSError, asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.InterfaceError):
                self._lease_held = False
                self._lease_conn = None
                conn.terminate()
                raise

    @property
    def relay_lease_held(self) -> bool:
        """This instance publishes the shared outbox (as of its last :meth:`pending` call)."""
        return self._lease_held or not self._relay_lease

    async def mark_sent(self, ids: Sequence[int], sent_at: datetime) -> None:
        if not ids:
            return
        async with self._acquire() as conn, conn.transaction():
            await conn.execute("UPDATE outbox SET sent_at = $1 WHERE id = ANY($2::bigint[])", sent_at, list(ids))
            await conn.execute("UPDATE relay_state SET last_sent_at = GREATEST(last_sent_at, $1) WHERE id = 1", sent_at)

    async def record_error(self, message: str, at: datetime) -> None:
        async with self._acquire() as conn:
            await conn.execute(
                "UPDATE relay_state SET last_error = $1, last_error_at = $2 WHERE id = 1", message[:500], at
            )

    async def prune(self, sent_before: datetime) -> int:
        async with self._acquire() as conn:
            status = await conn.execute("DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < $1", sent_before)
        return _rowcount(status)

    async def status(self) -> OutboxStatus:
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM outbox WHERE sent_at IS NULL) AS pending,"
                " (SELECT min(created_at) FROM outbox WHERE sent_at IS NULL) AS oldest,"
                " last_error, last_error_at, last_sent_at FROM relay_state WHERE id = 1"
            )
        return OutboxStatus(
            pending=int(row["pending"]),
            oldest_pending_at=_maybe_utc(row["oldest"]),
            last_error=row["last_error"],
            last_error_at=_maybe_utc(row["last_error_at"]),
            last_sent_at=_maybe_utc(row["last_sent_at"]),
        )

    outbox_status = status


_PENDING = (
    "SELECT id, event_id, topic, payload, ordering_key, created_at FROM outbox "
    "WHERE sent_at IS NULL ORDER BY id LIMIT $1"
)


def _outbox_rows(rows: Sequence[Any]) -> list[OutboxRow]:
    return [
        OutboxRow(
            int(r["id"]), r["event_id"], r["topic"], bytes(r["payload"]), r["ordering_key"], _utc(r["created_at"])
        )
        for r in rows
    ]


def _maybe_utc(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


__all__ = ["MIGRATIONS", "LedgerClosedError", "PostgresLedger", "Renderer", "lock_key"]
