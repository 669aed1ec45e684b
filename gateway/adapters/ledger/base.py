"""The ledger's public API, the same on SQLite and PostgreSQL.

:class:`LedgerBase` is what both adapters (``sqlite.py``, ``postgres.py``) offer beyond deciding a
request: the host's answer for a pending record, the store-and-forward queue, leases, the cut-off
sweep, listings of batches, records and exception cases, and the outbox. Each call is one unit of
work on :class:`~gateway.adapters.ledger.core.LedgerCore`, run by the adapter's :meth:`LedgerBase.run`.
:class:`LedgerClosedError` is what a closed ledger raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

from gateway.adapters.ledger.core import LedgerCore
from gateway.adapters.ledger.db import Db
from gateway.core.batches import batch_to_use
from gateway.core.model import BatchSummary, ExceptionCase, Request, SafItem, Txn
from gateway.core.policy import Policy
from gateway.core.queries import Context
from gateway.core.upstream import HostAnswer, NoAnswer
from gateway.ports import LedgerResult, OutboxStatus, Renderer

T = TypeVar("T")


class LedgerClosedError(RuntimeError):
    """The ledger is closed (or was never opened)."""


class LedgerBase:
    """The ledger's public API, the same on both databases: each adapter says how a unit of work runs
    (:meth:`run`: on which connection, in which transaction) and how one request is decided."""

    core: LedgerCore

    async def run(self, work: Callable[[Db], Awaitable[T]], *, durable: bool = True) -> T:
        """``work`` in a transaction of its own, committed (durably, unless it is bookkeeping) before this
        returns."""
        raise NotImplementedError

    on_events: Callable[[], None] | None

    def _notify(self) -> None:
        if self.on_events is not None:
            self.on_events()

    async def conclude(
        self, txn_id: int, request: Request | None, result: HostAnswer | NoAnswer, ctx: Context, render: Renderer
    ) -> LedgerResult:
        """The acquirer host's answer, or its absence, for the pending record ``txn_id``
        (:func:`gateway.core.upstream.conclude`), committed durably before this returns."""
        outcome = await self.run(lambda db: self.core.conclude(db, txn_id, request, result, ctx, render))
        if outcome.events:
            self._notify()
        return outcome

    async def pending_records(self) -> list[Txn]:
        return await self.run(self.core.pending_records)

    async def saf_items(self, *, queued_only: bool = True, limit: int = 100) -> list[SafItem]:
        return await self.run(lambda db: self.core.saf_items(db, queued_only=queued_only, limit=limit), durable=False)

    async def saf_attempted(self, item_id: int, at: datetime) -> None:
        await self.run(lambda db: self.core.saf_attempted(db, item_id, at))

    async def hold_lease(self, name: str, token: str, ttl_s: float) -> bool:
        """Whether ``token`` holds the lease ``name`` now (taken or renewed; see LedgerCore.hold_lease)."""
        return await self.run(lambda db: self.core.hold_lease(db, name, token, ttl_s), durable=False)

    async def release_lease(self, name: str, token: str) -> None:
        await self.run(lambda db: self.core.release_lease(db, name, token), durable=False)

    async def saf_finished(self, item: SafItem, state: str, at: datetime, *, response_code: str | None = None,
                           error: str | None = None, render: Renderer) -> None:  # fmt: skip
        await self.run(lambda db: self.core.saf_finished(db, item, state, at, response_code, error, render))
        self._notify()

    async def close_batches(self, policy: Policy, now: datetime, render: Renderer) -> int:
        return await self.run(lambda db: self.core.close_batches(db, policy, now, render))

    async def list_batches(self, merchant: str | None = None, terminal: str | None = None, open_only: bool = False
                           ) -> list[BatchSummary]:  # fmt: skip
        return await self.run(lambda db: self.core.list_batches(db, merchant, terminal, open_only))

    async def find_txn(self, merchant_id: str, rrn: str) -> Txn | None:
        return await self.run(lambda db: self.core.find_txn(db, merchant_id, rrn))

    async def batch_to_use(self, merchant_id: str, terminal_id: str, policy: Policy, now: datetime) -> str:
        """The batch number a terminal signing on is to use (:func:`gateway.core.batches.batch_to_use`)."""
        latest = await self.run(lambda db: self.core.latest_batch(db, merchant_id, terminal_id), durable=False)
        return batch_to_use(latest, policy, now)

    async def all_txns(self) -> list[Txn]:
        return await self.run(self.core.all_txns)

    async def unanswered(self, recorded_before: datetime) -> list[Txn]:
        """Records not known to have been answered, recorded before ``recorded_before`` (oldest first)."""
        return await self.run(lambda db: self.core.unanswered(db, recorded_before))

    async def mark_answered(self, txn_ids: Sequence[int]) -> None:
        """Record that these records' answers reached their terminals (bookkeeping: a power cut may undo
        a mark, and the record is then listed as unanswered, which is safe)."""
        await self.run(lambda db: self.core.mark_answered(db, txn_ids), durable=False)

    async def list_exceptions(self, *, include_resolved: bool = False) -> list[ExceptionCase]:
        return await self.run(lambda db: self.core.list_exceptions(db, include_resolved))

    async def resolve_exception(self, case_id: int, *, by: str, note: str, at: datetime) -> ExceptionCase | None:
        """Mark an open case resolved, with who and why; None when there is no such open case."""
        return await self.run(lambda db: self.core.resolve_exception(db, case_id, by, note, at))

    async def mark_sent(self, ids: Sequence[int], sent_at: datetime) -> None:
        if ids:  # bookkeeping: an unmarked row is published again (at least once)
            await self.run(lambda db: self.core.mark_sent(db, ids, sent_at), durable=False)

    async def record_error(self, message: str, at: datetime) -> None:
        await self.run(lambda db: self.core.record_error(db, message, at), durable=False)

    async def prune(self, sent_before: datetime) -> int:
        return await self.run(lambda db: self.core.prune(db, sent_before), durable=False)

    async def status(self) -> OutboxStatus:
        return await self.run(self.core.status, durable=False)

    outbox_status = status
