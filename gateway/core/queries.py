"""The engine's vocabulary: what it asks the ledger, what it decides in, what it returns.

The engine (:mod:`gateway.core.engine` for requests, :mod:`gateway.core.batches` for batches) yields
:class:`Query` values, one class per question, each with the type of its answer in its docstring; a
ledger adapter answers them with its own SQL. A request is decided in a :class:`Context` and ends in
a :class:`Plan`, which the adapter writes. Plain data: nothing here asks or writes anything.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from gateway.core.decide import TxnChange
from gateway.core.events import CorrectionEvent
from gateway.core.host import HostRequest
from gateway.core.model import ExceptionCase, Kind, SettlementTotals, Txn, TxnStatus, UploadedLine
from gateway.core.policy import Policy
from gateway.core.reasons import Reason

T = TypeVar("T")

# --------------------------------------------------------------------------- queries


class Query:
    """Something the engine needs from the ledger.

    Queries are transient values: plain slots (not frozen, which costs a setattr per field) but
    hashable by value, so an adapter may answer one ahead of time and look it up when it comes.
    """

    __slots__ = ()


@dataclass(slots=True, unsafe_hash=True)
class FindDuplicate(Query):
    """The earlier request with this retransmission key, or None. Answer: ``Txn | None``.

    The key is merchant + terminal + STAN + MTI class, newer than ``since`` (design §5): DE7 is not
    part of it, as terminals stamp a new transmission time on every repeat.
    """

    merchant_id: str
    terminal_id: str
    stan: str
    mti_class: str
    since: datetime


@dataclass(slots=True, unsafe_hash=True)
class FindOriginal(Query):
    """The original a correction points at, locked for update. Answer: ``Txn | None``.

    One of four lookups, by the fields given, always within the merchant and among ``kinds``:

    - ``rrn``: the record with that RRN;
    - ``stan`` + ``transmission_time`` (+ ``mti_class``): DE90 as sent, the request's terminal first;
    - ``stan`` + ``since`` (+ ``mti_class`` when given): the latest record of the request's own
      terminal with that STAN, not older than ``since`` (DE90 whose DE7 did not match, or a
      reversal without DE90);
    - ``approval_code`` + ``pan_hmac``: the latest pre-auth with that approval code and card.
    """

    merchant_id: str
    terminal_id: str
    kinds: frozenset[Kind]
    rrn: str | None = None
    mti_class: str | None = None
    stan: str | None = None
    transmission_time: str | None = None
    approval_code: str | None = None
    pan_hmac: str | None = None
    since: datetime | None = None


@dataclass(slots=True, unsafe_hash=True)
class GetTxn(Query):
    """A record by id, locked for update. Answer: ``Txn | None``."""

    txn_id: int


@dataclass(slots=True, unsafe_hash=True)
class GetBatch(Query):
    """Answer: ``Batch | None``."""

    batch_id: int


@dataclass(slots=True, unsafe_hash=True)
class FindTombstone(Query):
    """An unmatched reversal of the same merchant and terminal, newer than ``since``, that names this
    request: by DE90 (same STAN and MTI class; its DE7 is not compared, as for duplicates), or without
    DE90 (same STAN and the same amount in DE4). Answer: ``Txn | None``."""

    merchant_id: str
    terminal_id: str
    stan: str
    mti_class: str
    amount: int
    since: datetime


@dataclass(slots=True, unsafe_hash=True)
class CurrentBatch(Query):
    """The terminal's open batch; opened now when ``create`` and there is none. Answer: ``Batch | None``."""

    merchant_id: str
    terminal_id: str
    now: datetime
    create: bool
    #: locked for update (a settlement closes it), not only for share (a request writes into it)
    exclusive: bool = False


@dataclass(slots=True, unsafe_hash=True)
class CloseBatch(Query):
    """Close an open batch at the cut-off instant ``closed_at`` (closed by ``cutoff``, not reconciled).
    Answer: ``bool``, whether it was still open (this transaction closed it)."""

    batch_id: int
    closed_at: datetime


@dataclass(slots=True, unsafe_hash=True)
class StaleBatches(Query):
    """Every open batch opened before ``opened_before`` (a cut-off), any terminal. Answer: ``list[Batch]``."""

    opened_before: datetime


@dataclass(slots=True, unsafe_hash=True)
class UnreconciledBatches(Query):
    """The terminal's batches the cut-off closed and no 0500 reconciled yet, oldest first.
    Answer: ``list[Batch]``."""

    merchant_id: str
    terminal_id: str


@dataclass(slots=True, unsafe_hash=True)
class RefundVelocity(Query):
    """Approved, unreversed refunds since ``since``. Answer: :class:`Velocity`."""

    merchant_id: str
    terminal_id: str
    pan_hmac: str | None
    since: datetime


@dataclass(slots=True, unsafe_hash=True)
class NextRrn(Query):
    """A new unique 12-digit retrieval reference number. Answer: ``str``."""


@dataclass(slots=True, unsafe_hash=True)
class BatchTxns(Query):
    """Every record of a batch, in id order. Answer: ``list[Txn]``."""

    batch_id: int


@dataclass(slots=True, unsafe_hash=True)
class PendingCorrections(Query):
    """The corrections of an original sent to the acquirer host and not answered yet (status pending),
    in id order. Answer: ``list[Txn]``."""

    original_id: int


@dataclass(slots=True, unsafe_hash=True)
class StandingCorrections(Query):
    """The approved refunds and completions recorded against an original, in id order.
    Answer: ``list[Txn]``."""

    original_id: int


@dataclass(slots=True, unsafe_hash=True)
class TerminalBatchTxns(Query):
    """Every record of a terminal that carries its batch number ``terminal_batch`` (cup DE60.2), in id
    order. Answer: ``list[Txn]``."""

    merchant_id: str
    terminal_id: str
    terminal_batch: str


@dataclass(slots=True, unsafe_hash=True)
class UploadedLines(Query):
    """The lines a terminal uploaded for its batch ``terminal_batch``, in trace order.
    Answer: ``list[UploadedLine]``."""

    merchant_id: str
    terminal_id: str
    terminal_batch: str


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class BatchClose:
    """A batch reconciled by a 0500: closed now if still open, its result and both totals recorded."""

    batch_id: int
    closed_at: datetime
    result: str  #: settled | mismatch
    terminal_totals: SettlementTotals
    ledger_totals: SettlementTotals


@dataclass(frozen=True, slots=True)
class SafEntry:
    """A message for the acquirer host's store-and-forward queue, about the record ``txn_id``: a reversal
    of what the host may have approved (``reverse``; ``amount``: a partial reversal's new amount), or
    an advice of what the gateway approved in its place (``advise``). Built from the record when sent."""

    txn_id: int
    action: str  #: reverse | advise
    amount: int | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a pending record became once the host answered (or did not)."""

    txn_id: int
    status: TxnStatus
    response_code: str
    reason: str | None
    approval_code: str | None


@dataclass(slots=True)
class Plan:
    """What to write, and what to answer. ``record`` is None for replays and conflicts."""

    response_code: str
    reason: Reason
    rrn: str | None
    approval_code: str | None
    record: Txn | None = None
    changes: tuple[TxnChange, ...] = ()
    #: the batches a settlement reconciled (the open one and those the cut-off closed)
    batch_closes: tuple[BatchClose, ...] = ()
    events: list[CorrectionEvent] = field(default_factory=list)
    replayed: bool = False
    #: something applied that an operator must resolve (a reversal advice over refunds)
    exception: ExceptionCase | None = None
    #: for a replay: the first request's record, whose answer this one repeats
    replay_of: int | None = None
    #: the record is pending: what to send the acquirer host, whose answer is the terminal's
    #: (:func:`gateway.core.upstream.conclude`)
    host: HostRequest | None = None
    #: a pending record's outcome (written over it)
    outcome: Outcome | None = None
    #: messages for the host's store-and-forward queue
    saf: list[SafEntry] = field(default_factory=list)
    #: a batch upload's lines, kept (a line uploaded again replaces the earlier one) until its batch end
    uploads: tuple[UploadedLine, ...] = ()

    @property
    def answered_id(self) -> int | None:
        """The record this plan's answer answers (the ledger gives a new record its id when it writes it)."""
        if self.record is not None:
            return self.record.id
        return self.outcome.txn_id if self.outcome is not None else self.replay_of


@dataclass(slots=True)
class Context:
    """Everything from outside that a decision may use: time, keys, policy, the code map."""

    now: datetime
    policy: Policy
    pan_key: bytes
    response_code: Callable[[str], str]


Step = Generator[Query, Any, Plan]
#: a step that returns something other than a plan (a helper of :func:`process`, or the cut-off sweep)
SubStep = Generator[Query, Any, T]

__all__ = [
    "BatchClose",
    "BatchTxns",
    "CloseBatch",
    "Context",
    "CurrentBatch",
    "FindDuplicate",
    "FindOriginal",
    "FindTombstone",
    "GetBatch",
    "GetTxn",
    "NextRrn",
    "Outcome",
    "PendingCorrections",
    "Plan",
    "Query",
    "RefundVelocity",
    "SafEntry",
    "StaleBatches",
    "StandingCorrections",
    "Step",
    "SubStep",
    "TerminalBatchTxns",
    "UnreconciledBatches",
    "UploadedLines",
]
