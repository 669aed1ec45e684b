"""A group's records are inserted together: what runs inside the group still sees every record decided
before it, and a group that fails there is run again one request at a time."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from harness import hold_commits, purchase

from gateway.adapters.sqlite_ledger import SqliteLedger
from gateway.core.engine import Context
from gateway.core.model import Txn
from gateway.core.policy import Policy
from gateway.ports import LedgerResult
from gateway.protocol.dialect import classify
from gateway.protocol.profile import load_profile

_EVENT_IDS = itertools.count(1)


def _render(event: object) -> tuple[str, str, bytes]:
    return f"id-{next(_EVENT_IDS)}", "topic", b"{}"


def _context() -> Context:
    return Context(datetime.now(UTC), Policy(), b"test-key", load_profile("iso87-binary").response_code)


async def _until_set(event: threading.Event) -> None:
    """Wait (at most 5 s) until the commit thread sets ``event``."""
    for _ in range(500):
        if event.is_set():
            break
        await asyncio.sleep(0.01)
    assert event.is_set()


class Queued:
    """Requests submitted to ``ledger``; ``results`` once each one's group committed."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self.ledger = ledger
        self.ctx = _context()
        self.settled: list[asyncio.Future[tuple[Any, Exception | None]]] = []

    def submit(self, stan: str) -> None:
        future: asyncio.Future[tuple[Any, Exception | None]] = asyncio.get_running_loop().create_future()
        self.settled.append(future)
        request = classify(purchase(stan))
        self.ledger.submit(request, self.ctx, _render, lambda value, error: future.set_result((value, error)))

    async def results(self) -> list[tuple[Any, Exception | None]]:
        return list(await asyncio.gather(*self.settled))


async def _hold_a_first_group(
    ledger: SqliteLedger, monkeypatch: pytest.MonkeyPatch
) -> tuple[Queued, Callable[[], None]]:
    """Submit request 000001 as a group of its own and hold it in its commit, so that what is submitted
    next queues as one group; the function returned lets the commits go on."""
    commit = ledger._commit
    committing, release = hold_commits(ledger, monkeypatch)
    queued = Queued(ledger)
    queued.submit("000001")
    await _until_set(committing)

    def let_go() -> None:
        monkeypatch.setattr(ledger, "_commit", commit)
        release.set()

    return queued, let_go


async def test_a_lookup_queued_between_requests_of_one_group_sees_the_records_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        queued, let_go = await _hold_a_first_group(ledger, monkeypatch)
        commits = ledger.commits
        queued.submit("000002")
        queued.submit("000003")
        seen: list[str] = []
        # the lookup's job is queued between the requests: the coroutine runs up to its first wait
        lookup = asyncio.ensure_future(ledger._call(lambda conn: seen.extend(
            row[0] for row in conn.execute("SELECT stan FROM txns ORDER BY id"))))  # fmt: skip
        await asyncio.sleep(0)
        queued.submit("000004")
        let_go()
        await lookup
        results = await queued.results()
        assert [value.response_code for value, _ in results if isinstance(value, LedgerResult)] == ["00"] * 4
        assert ledger.commits == commits + 2  # the held group, then one group with everything queued meanwhile
        assert seen == ["000001", "000002", "000003"]
        txns: list[Txn] = await ledger.all_txns()
        assert [(txn.id, txn.stan) for txn in txns] == [(1, "000001"), (2, "000002"), (3, "000003"), (4, "000004")]


async def test_decisions_after_a_lookup_in_one_group_see_every_record_before_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        queued, let_go = await _hold_a_first_group(ledger, monkeypatch)
        commits = ledger.commits
        queued.submit("000002")
        count = "SELECT COUNT(*) FROM txns"
        lookup = asyncio.ensure_future(ledger._call(lambda conn: conn.execute(count).fetchone()[0]))
        await asyncio.sleep(0)
        # after the lookup: a retransmission of a record of the group before it, one of the earlier
        # group, a new request, and a retransmission of that new request in the same run of decisions
        for stan in ("000002", "000001", "000003", "000003"):
            queued.submit(stan)
        let_go()
        assert await lookup == 2
        results = await queued.results()
        assert ledger.commits == commits + 2
        assert [(value.response_code, value.replayed) for value, _ in results] == [
            ("00", False), ("00", False), ("00", True), ("00", True), ("00", False), ("00", True)
        ]  # fmt: skip
        assert [txn.stan for txn in await ledger.all_txns()] == ["000001", "000002", "000003"]


async def test_a_group_whose_insert_fails_is_run_again_request_by_request(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with SqliteLedger(path) as ledger:
        queued = Queued(ledger)
        queued.submit("000001")
        await queued.results()
        conn = sqlite3.connect(path, isolation_level=None)
        try:  # the ledger refuses one record: the group's insert of all of them together fails
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON txns WHEN NEW.stan = '000003' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        finally:
            conn.close()
        queued = Queued(ledger)
        for stan in ("000002", "000003", "000004"):
            queued.submit(stan)
        commits = ledger.commits
        results = await queued.results()
        assert ledger.commits == commits + 1
        outcome = [value.response_code if value is not None else type(error).__name__ for value, error in results]
        # alone, only the refused request fails; the others are approved and recorded
        assert outcome == ["00", "IntegrityError", "00"]
        assert [txn.stan for txn in await ledger.all_txns()] == ["000001", "000002", "000004"]


async def test_a_group_that_writes_nothing_commits_without_a_trip_to_the_commit_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        trips: list[int] = []
        commit = ledger._commit

        def counted(conn: sqlite3.Connection, may_follow: bool) -> tuple[bool, Exception | None]:
            trips.append(threading.get_ident())
            return commit(conn, may_follow)

        monkeypatch.setattr(ledger, "_commit", counted)
        await ledger.pending(10)  # takes the relay lease: a write
        assert len(trips) == 1
        for _ in range(3):  # polls on a fresh lease read only
            assert await ledger.pending(10) == []
        assert len(trips) == 1
        other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None, timeout=0)
        try:  # each poll committed: the write lock is free
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        finally:
            other.close()
        queued = Queued(ledger)
        queued.submit("000001")
        [(result, error)] = await queued.results()
        assert error is None and result.response_code == "00"
        assert len(trips) == 2 and trips[1] != threading.get_ident()  # the fsync still off the loop


async def test_a_group_of_relay_bookkeeping_only_commits_without_waiting_for_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        levels: list[int] = []  # PRAGMA synchronous at each COMMIT on the commit thread: 2 FULL, 1 NORMAL
        commit = ledger._commit

        def observed(conn: sqlite3.Connection, may_follow: bool) -> tuple[bool, Exception | None]:
            levels.append(conn.execute("PRAGMA synchronous").fetchone()[0])
            return commit(conn, may_follow)

        monkeypatch.setattr(ledger, "_commit", observed)
        await ledger._call(lambda conn: conn.execute(
            "INSERT INTO outbox(event_id, topic, payload, ordering_key, created_at) VALUES ('e1', 't', x'7b7d', 'k', 0)"
        ))  # fmt: skip
        [row] = await ledger.pending(10)  # takes the lease: bookkeeping
        await ledger.mark_sent([row.id], datetime.now(UTC))  # bookkeeping
        queued = Queued(ledger)
        queued.submit("000001")  # a request: durable
        [(result, error)] = await queued.results()
        assert error is None and result.response_code == "00"
        assert levels == [2, 1, 1, 2]
        assert await ledger._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == 2
        assert (await ledger.status()).pending == 0  # the mark is there


async def test_a_failed_bookkeeping_group_still_leaves_the_ledger_durable(tmp_path: Path) -> None:
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta(key, value) VALUES ('x', '1')")
            raise sqlite3.OperationalError("disk I/O error")

        with pytest.raises(sqlite3.OperationalError):
            await ledger._call(broken, durable=False)
        assert await ledger._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == 2
        row = await ledger._call(lambda conn: conn.execute("SELECT value FROM meta WHERE key = 'x'").fetchone())
        assert row is None


async def test_what_a_groups_answers_schedule_runs_before_the_next_group_is_decided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TCP server writes the answers of one group commit in a loop callback (one write per
    connection). That callback must run before the next queued group's decisions, not after them:
    else every answer waits for the next group to be decided and its answers built."""
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        committing, release = hold_commits(ledger, monkeypatch)
        loop = asyncio.get_running_loop()
        ctx = _context()
        order: list[str] = []
        both = loop.create_future()

        def first_done(value: Any, error: Exception | None) -> None:
            assert error is None
            loop.call_soon(order.append, "first group's answers written")

        def second_prepared(result: LedgerResult) -> Callable[[], None]:
            order.append("second group decided")
            return lambda: both.set_result(None)

        ledger.submit(classify(purchase("000001")), ctx, _render, first_done)
        await _until_set(committing)
        # queued while the first group waits in its commit: the next group
        ledger.submit(classify(purchase("000002")), ctx, _render, lambda value, error: None, second_prepared)
        release.set()
        await asyncio.wait_for(both, 10)
        assert order == ["first group's answers written", "second group decided"]


async def test_a_cancellation_between_groups_does_not_settle_the_committed_group_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer yields between groups once the first is settled; if it is cancelled there (the
    loop shutting down), that group's requests must not be told a second time (as failed)."""
    ledger = await SqliteLedger(tmp_path / "ledger.db").open()
    committing, release = hold_commits(ledger, monkeypatch)
    ctx = _context()
    told: list[tuple[Any, Exception | None]] = []
    ledger.submit(classify(purchase("000001")), ctx, _render, lambda value, error: told.append((value, error)))
    await _until_set(committing)
    ledger.submit(classify(purchase("000002")), ctx, _render, lambda value, error: None)
    sleep = asyncio.sleep

    async def cancelled_at_the_yield(delay: float, *args: Any) -> Any:
        if delay == 0 and told:
            raise asyncio.CancelledError
        return await sleep(delay, *args)

    writer = ledger._writer_task
    assert writer is not None
    monkeypatch.setattr(asyncio, "sleep", cancelled_at_the_yield)
    release.set()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(writer), 10)
    finally:
        monkeypatch.setattr(asyncio, "sleep", sleep)
        # the writer is gone: close what it would have closed
        ledger._closed = True
        thread, conn = ledger._thread, ledger._conn
        assert thread is not None and conn is not None
        await thread.run(conn.close)
        thread.stop()
    assert len(told) == 1
    value, error = told[0]
    assert error is None and isinstance(value, LedgerResult)
