"""The PostgreSQL ledger: several gateway instances share one ledger (design sections 2, 5, 8).

Each request is decided in one transaction (READ COMMITTED) on a pooled connection, by the same core
as on SQLite. What keeps instances from stepping on each other:

- first, transaction-scoped advisory locks, taken in sorted order: the request's retransmission key
  (merchant + terminal + STAN), for a reversal also the key of the request it names (so a reversal and
  its late original cannot both miss each other), and for velocity-limited refunds the terminal's and
  the card's refund counters;
- originals are read ``FOR UPDATE``: corrections against one original queue on its row, and under READ
  COMMITTED the waiting one reads it as the first committed it, so no interleaving refunds more than
  the original;
- batches are read ``FOR SHARE`` (``FOR UPDATE`` by a settlement or the cut-off): a batch is not
  closed under a request still writing into it;
- RRNs come from a SEQUENCE of blocks of 1000, handed out in memory.

A deadlock or a serialization failure runs the request again, a few times. The relay lease is a
session-level advisory lock on a connection of its own. See docs/postgresql.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from gateway.adapters.ledger import schema
from gateway.adapters.ledger.base import LedgerBase, LedgerClosedError
from gateway.adapters.ledger.core import LedgerCore
from gateway.adapters.ledger.db import Db
from gateway.core.cards import pan_digest
from gateway.core.engine import Context
from gateway.core.model import Kind, Request
from gateway.ports import Completion, LedgerResult, OutboxRow, Renderer

T = TypeVar("T")

#: RRNs handed out in memory per sequence value
RRN_BLOCK = 1000
#: attempts of one transaction when PostgreSQL reports a deadlock or a serialization failure
MAX_ATTEMPTS = 4
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts`` (stable across instances and restarts), computed
    here so that the keys of one request can be sorted before they are taken."""
    digest = hashlib.blake2b("\x1f".join(("iso-gateway", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PgDb:
    """The core's :class:`~gateway.adapters.ledger.db.Db` on an asyncpg connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self.conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return await self.conn.fetchrow(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self.conn.execute(sql, *args)
        last = str(status).rsplit(" ", 1)[-1]  # "UPDATE 3", "INSERT 0 1"
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        await self.conn.executemany(sql, rows)

    async def insert(self, sql: str, *args: Any) -> int:
        return int(await self.conn.fetchval(sql + " RETURNING id", *args))


class PgDialect:
    """Row locks, ``timestamptz`` moments, RRN blocks from a sequence (outside any transaction)."""

    def __init__(self) -> None:
        self.rrn_next = self.rrn_limit = 0

    def lock(self, mode: str) -> str:
        return f" FOR {mode}"

    def store(self, moment: datetime) -> datetime:
        return moment

    def moment(self, stored: Any) -> datetime:
        assert isinstance(stored, datetime)
        return stored.astimezone(UTC)

    async def next_rrn(self, db: Db) -> str:
        if self.rrn_next >= self.rrn_limit:
            row = await db.fetchrow("SELECT nextval('rrn_blocks')")
            assert row is not None
            if self.rrn_next >= self.rrn_limit:  # unless a concurrent request refilled it meanwhile
                self.rrn_next, self.rrn_limit = int(row[0]) * RRN_BLOCK, (int(row[0]) + 1) * RRN_BLOCK
        value, self.rrn_next = self.rrn_next, self.rrn_next + 1
        return f"{value % 10**12:012d}"


class PostgresLedger(LedgerBase):
    """Ledger and outbox in one PostgreSQL database (or schema), shared by several gateway instances.

    ``url`` is a ``postgresql://`` URL; ``server_settings`` adds server settings to every connection
    (``search_path`` for a schema of its own)."""

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
        self._sizes = (min_size, max_size)
        # a transaction of this ledger never idles: one that does (a frozen instance) must not hold locks
        self._server_settings = {
            "application_name": "iso-gateway",
            "idle_in_transaction_session_timeout": "10000",
            **(server_settings or {}),
        }
        self._command_timeout_s = command_timeout_s
        self._relay_lease = relay_lease
        self.dialect = PgDialect()
        self.core = LedgerCore(self.dialect)
        self._pool: Any = None
        self.schema = ""  #: the schema the tables live in (the first of ``search_path``)
        self._lease_conn: Any = None
        self._lease_held = False
        self._lease_lock = asyncio.Lock()
        #: called after a commit that wrote outbox events, and after every commit with its request count
        self.on_events: Callable[[], None] | None = None
        self.on_commit: Callable[[int], None] | None = None
        self.commits = 0
        self.retries = 0  #: transactions run again after a deadlock or serialization failure

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> PostgresLedger:
        if self._pool is not None:
            return self
        pool = await asyncpg.create_pool(
            self.url, min_size=self._sizes[0], max_size=self._sizes[1], server_settings=self._server_settings,
            command_timeout=self._command_timeout_s,
        )  # fmt: skip
        try:
            async with pool.acquire() as conn:
                self.schema = str(await conn.fetchval("SELECT current_schema()"))
                await self._migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        return self

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        async with self._lease_lock:
            lease, self._lease_conn, self._lease_held = self._lease_conn, None, False
            if lease is not None:
                await lease.close()
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> PostgresLedger:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _migrate(self, conn: Any) -> None:
        """Create or upgrade the tables, one instance at a time (an advisory lock guards it)."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key("migrate", self.schema))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            version = int(await conn.fetchval("SELECT COALESCE(max(version), 0) FROM schema_version"))
            if version > schema.VERSION:
                raise RuntimeError(f"ledger schema version {version} is newer than this gateway ({schema.VERSION})")
            if version == 0:
                for statement in schema.schema(schema.POSTGRES):
                    await conn.execute(statement)
                await conn.execute("CREATE SEQUENCE rrn_blocks AS bigint MINVALUE 1 MAXVALUE 999999999 CYCLE")
            for step in range(max(version, 1), schema.VERSION if version else 0):
                await conn.execute(schema.POSTGRES_UPGRADES[step])
            if version < schema.VERSION:
                await conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES ($1, 'the schema written once')",
                    schema.VERSION,
                )

    def _acquire(self) -> Any:
        if self._pool is None:
            raise LedgerClosedError("ledger closed")
        return self._pool.acquire()

    # ------------------------------------------------------------------ work

    def submit(self, request: Request, ctx: Context, completion: Completion) -> None:
        """Decide ``request`` on a connection of its own; the completion hears of it once committed
        (``prepare`` right before ``committed``: there is no shared commit wait to fill)."""

        def finished(task: asyncio.Future[LedgerResult]) -> None:
            error = LedgerClosedError("ledger request cancelled") if task.cancelled() else task.exception()
            if error is None:
                completion.prepare(task.result())
                completion.committed(task.result())
            else:  # KeyboardInterrupt and the like are not the request's to handle: it failed all the same
                completion.failed(error if isinstance(error, Exception) else LedgerClosedError(type(error).__name__))

        asyncio.ensure_future(self.process(request, ctx, completion.render)).add_done_callback(finished)

    async def process(self, request: Request, ctx: Context, render: Renderer) -> LedgerResult:
        """Decide and record one request in one transaction; returns after the commit."""
        # one message opens the transaction and takes the locks (integers only: nothing to escape)
        locks = "".join(f"; SELECT pg_advisory_xact_lock({key})" for key in self._lock_keys(request, ctx))
        result = await self._transaction(
            lambda db: self.core.decide(db, request, ctx, render), begin="BEGIN" + locks
        )
        if result.events and self.on_events is not None:
            self.on_events()
        return result

    async def run(self, work: Callable[[Db], Awaitable[T]], *, durable: bool = True) -> T:
        return await self._transaction(work)

    async def _transaction(self, work: Callable[[Db], Awaitable[T]], *, begin: str = "BEGIN") -> T:
        async with self._acquire() as conn:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    await conn.execute(begin)
                    value = await work(PgDb(conn))
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
        return value

    def _lock_keys(self, request: Request, ctx: Context) -> list[int]:
        """The advisory locks this request takes first, in sorted order."""
        merchant, terminal = request.merchant_id, request.terminal_id
        stans = {request.stan}
        ref = request.reference
        if request.kind is Kind.REVERSAL and ref is not None and ref.stan is not None:
            stans.add(ref.stan)  # its original, or a tombstone that original will look for
        keys = {lock_key("txn", self.schema, merchant, terminal, stan) for stan in stans}
        if request.kind is Kind.REFUND and ctx.policy.velocity_limited:
            keys.add(lock_key("velocity-terminal", self.schema, merchant, terminal))
            if request.pan:
                keys.add(lock_key("velocity-card", self.schema, merchant, pan_digest(ctx.pan_key, request.pan)))
        return sorted(keys)

    # ------------------------------------------------------------------ the relay's outbox

    async def pending(self, limit: int) -> Sequence[OutboxRow]:
        """Unsent rows in id order, for the instance holding the relay lease; none for the others."""
        if not self._relay_lease:
            return await self.run(lambda db: self.core.pending(db, limit))
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
                    key = lock_key("outbox-relay", self.schema)
                    self._lease_held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
                    if not self._lease_held:
                        return []
                # read on the lease connection: if it died, the lease may be another instance's now
                return await self.core.pending(PgDb(conn), limit)
            except (OSError, asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.InterfaceError):
                self._lease_held = False
                self._lease_conn = None
                conn.terminate()
                raise

    @property
    def relay_lease_held(self) -> bool:
        """This instance publishes the shared outbox (as of its last :meth:`pending` call)."""
        return self._lease_held or not self._relay_lease
