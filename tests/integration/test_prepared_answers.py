"""Answers built while the commit waits for the fsync: none leaves, and nothing is counted or logged,
before the commit returned; a commit that fails after the answers were built still answers 96."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from harness import hold_commits, purchase, service_on

from gateway.adapters.ledger import SqliteLedger
from gateway.core.engine import Context
from gateway.core.policy import Policy
from gateway.ports import LedgerResult
from gateway.protocol.iso87 import classify
from gateway.protocol.message import Message
from gateway.protocol.profile import load_profile
from gateway.service import GatewayService


class Counted:
    """The metrics recorder: what the service counted, in order."""

    def __init__(self) -> None:
        self.codes: list[str] = []

    def request_done(self, mti: str, kind: str, response_code: str, seconds: float) -> None:
        self.codes.append(response_code)


def watched_service(ledger: SqliteLedger, monkeypatch: pytest.MonkeyPatch) -> tuple[GatewayService, Counted, list[str]]:
    """The service over ``ledger``, what it counted, and the DE39 of every answer it encodes, in
    order (built, not necessarily sent)."""
    counted = Counted()
    service = service_on(ledger, recorder=counted)
    built: list[str] = []
    encode = service._encode

    def spy(response: Message) -> bytes:
        built.append(str(response.fields[39]))
        return encode(response)

    monkeypatch.setattr(service, "_encode", spy)
    return service, counted, built


async def test_answers_are_built_while_the_commit_runs_and_leave_only_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        service, counted, built = watched_service(ledger, monkeypatch)
        committing, release = hold_commits(ledger, monkeypatch)
        codec = service.codec
        answers = [asyncio.ensure_future(service.handle(codec.encode(purchase(s)))) for s in ("000001", "000002")]
        try:
            for _ in range(500):  # the commit thread is in the fsync and both answers are built
                if committing.is_set() and len(built) == 2:
                    break
                await asyncio.sleep(0.01)
            assert committing.is_set() and built == ["00", "00"]
            await asyncio.sleep(0.05)
            assert not any(answer.done() for answer in answers)  # nothing sent before the commit returned
            assert counted.codes == []  # nor counted (nor logged: the same step writes the line)
        finally:
            release.set()
        codes = [codec.decode(await answer or b"").fields[39] for answer in answers]
        assert codes == ["00", "00"] and counted.codes == ["00", "00"]
        assert len(await ledger.all_txns()) == 2


async def test_a_commit_that_fails_after_the_answers_were_built_answers_96(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        service, counted, built = watched_service(ledger, monkeypatch)
        on_thread = ledger._on_thread

        def failing_commit(fn: Any, *args: Any) -> Any:
            if args != ("COMMIT",):
                return on_thread(fn, *args)

            def fail() -> None:  # only once the answer was built, so the prepared one must be dropped
                for _ in range(500):
                    if built:
                        break
                    time.sleep(0.01)
                raise sqlite3.OperationalError("disk I/O error")

            return on_thread(fail)

        monkeypatch.setattr(ledger, "_on_thread", failing_commit)
        codec = service.codec
        answer = codec.decode(await service.handle(codec.encode(purchase("000001"))) or b"")
        assert answer.fields[39] == "96" and 37 not in answer.fields
        assert built == ["00", "96"]  # the approval was built, then dropped
        assert counted.codes == ["96"]
        monkeypatch.setattr(ledger, "_on_thread", on_thread)
        assert await ledger.all_txns() == []
        again = codec.decode(await service.handle(codec.encode(purchase("000002"))) or b"")
        assert again.fields[39] == "00"


class _Told:
    """A completion that records what it was told, and whose ``prepare`` has a bug."""

    def __init__(self, settled: asyncio.Future[tuple[Any, Exception | None]]) -> None:
        self.calls: list[str] = []
        self.settled = settled

    def render(self, event: Any) -> tuple[str, str, bytes]:
        return "id", "topic", b"{}"

    def prepare(self, result: LedgerResult) -> None:
        self.calls.append("prepare")
        raise RuntimeError("a bug in the answer builder")

    def committed(self, result: LedgerResult) -> None:
        self.calls.append("committed")
        self.settled.set_result((result, None))

    def failed(self, error: Exception) -> None:
        self.calls.append("failed")
        self.settled.set_result((None, error))


async def test_a_prepare_that_raises_costs_the_writer_nothing_and_the_request_is_committed(tmp_path: Path) -> None:
    profile = load_profile("iso87-binary")
    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        told = _Told(asyncio.get_running_loop().create_future())
        ctx = Context(datetime.now(UTC), Policy(), b"test-key", profile.response_code)
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)  # the bug is reported there
        ledger.submit(classify(purchase("000001")), ctx, told)
        result, error = await told.settled
        assert error is None and isinstance(result, LedgerResult) and result.response_code == "00"
        assert told.calls == ["prepare", "committed"]
        assert [txn.stan for txn in await ledger.all_txns()] == ["000001"]
        assert await ledger.process(classify(purchase("000002")), ctx, told.render) is not None  # the writer lives
