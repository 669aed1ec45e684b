"""The SQLite ledger: WAL, durable commits, group commit on one writer.

Requests queue for a writer task. It takes every request queued since its last commit, opens one
``BEGIN IMMEDIATE`` transaction for them (serialising corrections against one original, also across
processes sharing the file), decides them one after the other (the three reads nearly every request
makes done once for the group: ``lookahead.py``), and commits them with one fsync (group commit).
Should one of them raise, the group is rolled back and decided again with each request in a
savepoint of its own, so that it costs only itself (a savepoint per request in every group cost two
statements a request). The statements run on the event loop (microseconds each); the COMMIT and its
fsync run on a helper thread, and while it waits the loop builds the group's answers, which leave
once the commit returned: nothing is answered before it is durable. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.adapters.ledger import schema
from gateway.adapters.ledger.base import LedgerBase, LedgerClosedError
from gateway.adapters.ledger.core import LedgerCore
from gateway.adapters.ledger.db import Db
from gateway.adapters.ledger.lookahead import Lookahead
from gateway.core.engine import Context
from gateway.core.model import Request
from gateway.ports import Completion, LedgerResult, OutboxRow, Renderer

T = TypeVar("T")

#: RRNs reserved in the file at a time (a clean close gives the unused rest back)
RRN_BLOCK = 1000
#: requests decided in one transaction at most
MAX_GROUP = 256
#: how long a relay lease outlives its holder's last poll (several processes may share one file)
RELAY_LEASE_S = 10.0
#: the interpreter's switch interval the gateway runs with (``sys.setswitchinterval``): the commit
#: thread needs the GIL for a moment to start each COMMIT while the loop builds the group's answers;
#: with Python's default 5 ms the fsync would start only once they were built
SWITCH_INTERVAL_S = 0.0001


@functools.lru_cache(maxsize=512)
def _sqlite_sql(sql: str) -> str:
    """``$1`` placeholders as SQLite numbers them (``?1``)."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


class SqliteDb:
    """The core's :class:`~gateway.adapters.ledger.db.Db` on a ``sqlite3`` connection (on the loop)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self.conn.execute(_sqlite_sql(sql), args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return self.conn.execute(_sqlite_sql(sql), args).fetchone()

    async def execute(self, sql: str, *args: Any) -> int:
        return self.conn.execute(_sqlite_sql(sql), args).rowcount

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        self.conn.executemany(_sqlite_sql(sql), rows)

    async def insert(self, sql: str, *args: Any) -> int:
        rowid = self.conn.execute(_sqlite_sql(sql), args).lastrowid  # the id: an INTEGER PRIMARY KEY is the rowid
        assert rowid is not None
        return rowid


class SqliteDialect:
    """Moments as microseconds since the epoch; no row locks (the transaction holds the file's write
    lock); RRNs from a counter in ``meta``, reserved a block at a time."""

    def __init__(self) -> None:
        self.rrn_next = self.rrn_limit = 0

    def lock(self, mode: str) -> str:
        return ""

    def store(self, moment: datetime) -> int:
        return int(moment.timestamp() * 1_000_000)

    def moment(self, stored: Any) -> datetime:
        return datetime.fromtimestamp(int(stored) / 1_000_000, UTC)

    async def next_rrn(self, db: Db) -> str:
        if self.rrn_next >= self.rrn_limit:
            raise RuntimeError("no reserved RRN left in this transaction")
        value, self.rrn_next = self.rrn_next, self.rrn_next + 1
        return f"{value % 10**12:012d}"

    def reserve(self, conn: sqlite3.Connection, count: int) -> None:
        """At least ``count`` RRNs in hand, reserved in the open transaction before any request's
        savepoint (a request rolled back must not give back numbers others already hold)."""
        if self.rrn_limit - self.rrn_next >= count:
            return
        block = max(count, RRN_BLOCK)
        row = conn.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'rrn_next' RETURNING value", (block,)
        ).fetchone()
        self.rrn_limit = int(row[0])
        self.rrn_next = self.rrn_limit - block


@dataclass(slots=True)
class _Job:
    """A request to decide (``request``), or other work (``work``) whose outcome goes to ``future``."""

    request: Request | None = None
    ctx: Context | None = None
    completion: Completion | None = None
    work: Callable[[Db], Awaitable[Any]] | None = None
    future: asyncio.Future[Any] | None = None


class SqliteLedger(LedgerBase):
    """Ledger and outbox on one SQLite file. Use :meth:`open` / :meth:`close` (or ``async with``)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._synchronous = synchronous
        self.dialect = SqliteDialect()
        self.core = LedgerCore(self.dialect)
        self._queue: list[_Job] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = True
        self._token = uuid.uuid4().hex  #: names this ledger object in the relay lease
        #: called after a commit that wrote outbox events, and after every commit with its request count
        self.on_events: Callable[[], None] | None = None
        self.on_commit: Callable[[int], None] | None = None
        self.commits = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> SqliteLedger:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-commit")
        try:
            self._conn = await self._on_thread(self._connect)
        except BaseException:
            self._thread.shutdown()
            raise
        self._closed = False
        self._writer = asyncio.get_running_loop().create_task(self._write(), name="ledger-writer")
        return self

    async def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await self.run(self._release, durable=False)
        self._closed = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        conn, thread, self._conn, self._thread = self._conn, self._thread, None, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(thread, conn.close)
        if thread is not None:
            thread.shutdown()

    async def __aenter__(self) -> SqliteLedger:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _on_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

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
            if version > schema.VERSION:
                raise RuntimeError(f"ledger schema version {version} is newer than this gateway ({schema.VERSION})")
            if version == 0:
                for statement in schema.schema(schema.SQLITE):
                    conn.execute(statement)
                conn.execute("INSERT INTO meta (key, value) VALUES ('rrn_next', '1')")
            for step in range(max(version, 1), schema.VERSION if version else 0):
                for statement in filter(str.strip, schema.SQLITE_UPGRADES[step].split(";")):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {schema.VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def _release(self, db: Db) -> None:
        """At a clean close: the relay lease, and the unused rest of the RRN block, given back (a restart
        continues at the next RRN, unless another process took a block meanwhile)."""
        await self.core.release_lease(db, "relay_lease", self._token)
        if self.dialect.rrn_next < self.dialect.rrn_limit:
            await db.execute(
                "UPDATE meta SET value = $1 WHERE key = 'rrn_next' AND CAST(value AS INTEGER) = $2",
                str(self.dialect.rrn_next), self.dialect.rrn_limit,
            )  # fmt: skip
            self.dialect.rrn_limit = self.dialect.rrn_next

    # ------------------------------------------------------------------ work

    def submit(self, request: Request, ctx: Context, completion: Completion) -> None:
        """Queue one request for the next group commit (see :class:`gateway.ports.Completion`)."""
        self._enqueue(_Job(request=request, ctx=ctx, completion=completion))

    async def process(self, request: Request, ctx: Context, render: Renderer) -> LedgerResult:
        """Decide and record one request; returns after the commit is durable (tests and tools)."""
        future: asyncio.Future[LedgerResult] = asyncio.get_running_loop().create_future()
        self.submit(request, ctx, _Resolve(future, render))
        return await future

    async def run(self, work: Callable[[Db], Awaitable[T]], *, durable: bool = True) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(work=work, future=future))  # every group commits durably: ``durable`` is moot
        return await future

    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            raise LedgerClosedError("ledger closed")
        self._queue.append(job)
        self._wake.set()

    async def _write(self) -> None:
        while self._queue or not self._closed:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                await self._commit_group(group)
            except Exception as exc:  # the connection failed: nothing of the group is committed
                for job in group:
                    _fail(job, exc)
            if self._queue:
                await asyncio.sleep(0)  # let the answers just sent leave before the next group is decided

    async def _commit_group(self, group: list[_Job]) -> None:
        conn = self._conn
        assert conn is not None
        await self._begin(conn)
        db = SqliteDb(conn)
        try:
            self.dialect.reserve(conn, len(group))
            try:
                results = await self._run_jobs(db, group)
            except Exception:  # rare (a bug, a broken request): again, each job in a savepoint of its own
                conn.execute("ROLLBACK")
                self.dialect.rrn_next = self.dialect.rrn_limit = 0
                await self._begin(conn)
                self.dialect.reserve(conn, len(group))
                results = await self._run_jobs_isolated(conn, db, group)
            committing = self._on_thread(conn.execute, "COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.dialect.rrn_next = self.dialect.rrn_limit = 0
            raise
        for job, (value, error) in zip(group, results, strict=True):
            if job.completion is not None and error is None:
                _tell(job.completion.prepare, value)  # built while the fsync runs; nothing leaves yet
        try:
            await committing
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.dialect.rrn_next = self.dialect.rrn_limit = 0
            raise
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit(len(group))
        if self.on_events is not None and any(isinstance(v, LedgerResult) and v.events for v, _ in results):
            self.on_events()
        for job, (value, error) in zip(group, results, strict=True):
            if error is not None:
                _fail(job, error)
            elif job.completion is not None:
                _tell(job.completion.committed, value)
            elif job.future is not None and not job.future.done():
                job.future.set_result(value)

    async def _run_job(self, db: Db, job: _Job, ahead: Lookahead | None) -> Any:
        if job.request is not None:
            assert job.ctx is not None and job.completion is not None
            return await self.core.decide(db, job.request, job.ctx, job.completion.render, ahead)
        assert job.work is not None
        return await job.work(db)

    async def _read_ahead(self, db: Db, group: list[_Job], n: int, ahead: Lookahead | None) -> Lookahead | None:
        """What job ``n`` of the group decides with: the reads of its run of requests, done together
        (done again after any other job, which may write anything); None for other jobs."""
        if group[n].request is None:
            return None
        if ahead is None:
            run = itertools.takewhile(lambda job: job.request is not None, group[n:])
            ahead = await self.core.read_ahead(db, [(job.request, job.ctx) for job in run
                                                    if job.request is not None and job.ctx is not None])
        return ahead

    async def _run_jobs(self, db: Db, group: list[_Job]) -> list[tuple[Any, Exception | None]]:
        """The group's jobs one after the other; the first that raises stops them (see _commit_group)."""
        results: list[tuple[Any, Exception | None]] = []
        ahead: Lookahead | None = None
        for n, job in enumerate(group):
            ahead = await self._read_ahead(db, group, n, ahead)
            results.append((await self._run_job(db, job, ahead), None))
        return results

    async def _run_jobs_isolated(self, conn: sqlite3.Connection, db: Db, group: list[_Job]
                                 ) -> list[tuple[Any, Exception | None]]:  # fmt: skip
        """The group's jobs, each in a savepoint: one that raises costs only itself."""
        results: list[tuple[Any, Exception | None]] = []
        ahead: Lookahead | None = None
        for n, job in enumerate(group):
            ahead = await self._read_ahead(db, group, n, ahead)
            conn.execute("SAVEPOINT job")
            try:
                value = await self._run_job(db, job, ahead)
            except Exception as exc:
                conn.execute("ROLLBACK TO job")
                results.append((None, exc))
            else:
                results.append((value, None))
            conn.execute("RELEASE job")
        return results

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE on the loop when the write lock is free (microseconds); when another process
        holds it, wait for it on the thread with the busy timeout."""
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        await self._on_thread(conn.execute, "BEGIN IMMEDIATE")

    # ------------------------------------------------------------------ the relay's outbox

    async def pending(self, limit: int) -> Sequence[OutboxRow]:
        """Unsent rows in id order, to the ledger object holding the relay lease only: several processes
        may share one file, and one relay publishes (keeping the order of events per original)."""

        async def lease_then_read(db: Db) -> list[OutboxRow]:
            held = await self.core.hold_lease(db, "relay_lease", self._token, RELAY_LEASE_S)
            return await self.core.pending(db, limit) if held else []

        return await self.run(lease_then_read, durable=False)


class _Resolve:
    """A :class:`~gateway.ports.Completion` that resolves a future once the request is committed."""

    def __init__(self, future: asyncio.Future[LedgerResult], render: Renderer) -> None:
        self.future, self.render = future, render

    def prepare(self, result: LedgerResult) -> None:
        pass

    def committed(self, result: LedgerResult) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def failed(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def _fail(job: _Job, error: Exception) -> None:
    if job.completion is not None:
        _tell(job.completion.failed, error)
    elif job.future is not None and not job.future.done():
        job.future.set_exception(error)


def _tell(callback: Callable[[Any], None], value: Any) -> None:
    """A completion's callback: its bug must not stop the writer (reported as asyncio reports them)."""
    try:
        callback(value)
    except Exception as exc:
        asyncio.get_running_loop().call_exception_handler({"message": "ledger completion failed", "exception": exc})
