"""Interfaces the service needs from the outside world (typing.Protocol only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.core.events import CorrectionEvent
from gateway.core.host import HostRequest
from gateway.protocol.message import Message

#: renders a correction fact for the outbox: (event id, topic, payload)
Renderer = Callable[[CorrectionEvent], tuple[str, str, bytes]]


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...


@dataclass(slots=True)
class OutboxRow:
    """One pending event in the outbox, already rendered (not a frozen dataclass, though nothing
    changes it: the relay reads one per event, and a frozen one costs about 1 µs more to make)."""

    id: int  #: monotonically increasing within one ledger
    event_id: str  #: the CloudEvents id
    topic: str
    payload: bytes  #: CloudEvents structured-mode JSON
    ordering_key: str  #: events with the same key are published in id order
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    pending: int
    oldest_pending_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    last_sent_at: datetime | None


class Outbox(Protocol):
    """The relay's view of the ledger's outbox table."""

    async def pending(self, limit: int) -> Sequence[OutboxRow]:
        """Unsent rows, oldest first (by id)."""
        ...

    async def mark_sent(self, ids: Sequence[int], sent_at: datetime) -> None: ...

    async def record_error(self, message: str, at: datetime) -> None: ...

    async def prune(self, sent_before: datetime) -> int:
        """Delete rows sent before the given time; returns how many."""
        ...

    async def status(self) -> OutboxStatus: ...


@dataclass(slots=True)
class LedgerResult:
    """What the ledger committed for one request, and what to answer."""

    response_code: str  #: DE39
    reason: str  #: "approved" or why not
    rrn: str | None  #: DE37
    approval_code: str | None  #: DE38
    replayed: bool  #: a retransmission answered from the stored response
    events: int  #: correction events written to the outbox
    #: the record answered: the new one, or the first one for a replay; None when nothing is recorded
    #: (a duplicate conflict). Marked answered once the answer is written (see Ledger.mark_answered).
    txn_id: int | None = None
    #: the record is pending: what to send the acquirer host, whose answer decides it (Ledger.conclude);
    #: nothing is answered before that
    host: HostRequest | None = None
    #: entries written to the host's store-and-forward queue (reversals, advices)
    queued: int = 0

    @property
    def forward(self) -> bool:
        return self.host is not None


class Completion(Protocol):
    """What a ledger tells about one request it was given (``Ledger.submit``): the service's answer.

    ``render`` turns the request's correction facts into outbox rows inside its transaction.
    ``prepare`` may be called before the commit is durable, to build (never send, count or log) the
    answer while the commit waits for its fsync; ``committed`` follows once it is durable, and only
    then may the answer leave. ``failed`` instead when nothing of the request was committed.
    """

    def render(self, event: CorrectionEvent) -> tuple[str, str, bytes]: ...

    def prepare(self, result: LedgerResult) -> None: ...

    def committed(self, result: LedgerResult) -> None: ...

    def failed(self, error: Exception) -> None: ...


class UpstreamDown(Exception):
    """No connection to the acquirer host is signed on: nothing was sent."""


class UpstreamTimeout(Exception):
    """Sent to the acquirer host (or possibly sent) and not answered in time: the host may have acted."""


class HostExchange(Protocol):
    @property
    def answer(self) -> Message: ...


class Upstream(Protocol):
    """The link to the acquirer host (``gateway.adapters.upstream``), as the service uses it."""

    async def send(self, message: Message, *, stamp: bool = True) -> HostExchange:
        """The host's answer to ``message`` (sent as given when ``stamp`` is False). Raises
        :class:`UpstreamDown` when nothing was sent, :class:`UpstreamTimeout` when no answer came in time."""
        ...
