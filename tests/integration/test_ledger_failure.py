"""A ledger that cannot commit: the request is answered 96 at once, nothing is recorded, and the next
request goes through when the ledger is writable again."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from harness import purchase, service_on
from postgres import postgres_schema, postgres_url, schema_settings

from gateway.adapters.ledger import PostgresLedger, SqliteLedger
from gateway.service import GatewayService

__all__ = ["postgres_schema", "postgres_url"]  # fixtures


async def test_a_locked_ledger_answers_96_records_nothing_and_the_next_request_is_approved(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with SqliteLedger(path, busy_timeout_s=0.05) as ledger:
        service = service_on(ledger)
        codec = service.codec
        # another process holds the write lock longer than this ledger waits for it
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            answer = await service.handle(codec.encode(purchase("000001")))
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert answer is not None
        refused = codec.decode(answer)
        assert (refused.mti, refused.fields[39], refused.fields[11]) == ("0210", "96", "000001")
        assert 37 not in refused.fields and 38 not in refused.fields
        assert await ledger.all_txns() == []

        approved = codec.decode(await service.handle(codec.encode(purchase("000002"))) or b"")
        assert approved.fields[39] == "00"
        assert [txn.stan for txn in await ledger.all_txns()] == ["000002"]


async def test_the_postgresql_ledger_answers_through_the_service_and_96_once_it_is_closed(
    postgres_url: str, postgres_schema: str
) -> None:
    ledger = await PostgresLedger(postgres_url, server_settings=schema_settings(postgres_schema)).open()
    service = service_on(ledger)
    codec = service.codec
    try:
        approved = codec.decode(await service.handle(codec.encode(purchase("000001"))) or b"")
        assert approved.fields[39] == "00"
        assert len(approved.fields[37]) == 12
    finally:
        await ledger.close()
    refused = codec.decode(await service.handle(codec.encode(purchase("000002"))) or b"")
    assert (refused.fields[39], refused.fields[11]) == ("96", "000002")


def one_request_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.adapters import sqlite_ledger

    monkeypatch.setattr(sqlite_ledger, "_MAX_GROUP", 1)


def record_follows(ledger: SqliteLedger, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each commit also opened the next group's transaction, in commit order."""
    follows: list[bool] = []
    commit = ledger._commit

    def spy(conn: sqlite3.Connection, may_follow: bool) -> tuple[bool, Exception | None]:
        followed, error = commit(conn, may_follow)
        follows.append(followed)
        return followed, error

    monkeypatch.setattr(ledger, "_commit", spy)
    return follows


async def purchases_together(service: GatewayService, stans: list[str]) -> list[str]:
    """The response codes of purchases sent all at once (queued while earlier groups commit)."""
    codec = service.codec
    answers = await asyncio.gather(*(service.handle(codec.encode(purchase(stan))) for stan in stans))
    return [codec.decode(answer or b"").fields[39] for answer in answers]


async def test_a_group_begins_on_the_event_loop_when_the_lock_is_free_and_waits_off_it_when_not(
    tmp_path: Path,
) -> None:
    """BEGIN IMMEDIATE runs on the event loop without waiting; only when another process holds the
    write lock does the group wait for it, on the commit thread, with the busy timeout."""
    path = tmp_path / "ledger.db"
    async with SqliteLedger(path, busy_timeout_s=5.0) as ledger:
        assert ledger._conn is not None
        begins: list[int] = []  # the thread of every BEGIN IMMEDIATE the ledger ran
        ledger._conn.set_trace_callback(
            lambda sql: begins.append(threading.get_ident()) if sql == "BEGIN IMMEDIATE" else None
        )
        loop_thread = threading.get_ident()
        service = service_on(ledger)
        assert await purchases_together(service, ["000001"]) == ["00"]
        assert begins == [loop_thread]

        begins.clear()
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, other.execute, ("ROLLBACK",)).start()  # the other process lets go
        try:
            assert await purchases_together(service, ["000002"]) == ["00"]
        finally:
            await asyncio.sleep(0.3)
            other.close()
        assert len(begins) == 2 and begins[0] == loop_thread and begins[1] != loop_thread
        assert [txn.stan for txn in await ledger.all_txns()] == ["000001", "000002"]


async def test_a_job_that_raises_in_a_group_costs_only_itself(tmp_path: Path) -> None:
    """A group is decided without a savepoint per request; when one of its jobs raises, the group is
    decided again with each job in a savepoint of its own: the others are committed as they were."""
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        service = service_on(ledger)
        codec = service.codec

        async def broken(db: object) -> None:
            await ledger.core.set_meta(db, note="half done")  # type: ignore[arg-type]
            raise RuntimeError("a bug in one job")

        commits = ledger.commits
        first, failed, second = await asyncio.gather(
            service.handle(codec.encode(purchase("000001"))), ledger.run(broken),
            service.handle(codec.encode(purchase("000002"))), return_exceptions=True,
        )  # fmt: skip
        assert ledger.commits == commits + 1  # one group
        assert isinstance(failed, RuntimeError)
        assert [codec.decode(answer).fields[39] for answer in (first, second)] == ["00", "00"]  # type: ignore[arg-type]
        assert [txn.stan for txn in await ledger.all_txns()] == ["000001", "000002"]
        assert await ledger.run(lambda db: db.fetch("SELECT value FROM meta WHERE key = 'note'")) == []
        rrns = [txn.rrn for txn in await ledger.all_txns()]
        assert len(set(rrns)) == 2
