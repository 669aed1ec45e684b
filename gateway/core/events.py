"""Correction event facts: what happened, as plain data (design section 6).

The core records these; ``gateway.events`` renders them as CloudEvents and the outbox relay
publishes them. Nothing here knows about JSON, MQTT or clocks.

The facts are not changed once made, but they are not ``frozen`` dataclasses: a frozen dataclass's
``__init__`` sets each field through ``object.__setattr__``, about five times the cost of a plain one
(1.6 against 0.3 µs for six fields), and a correction makes four of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(slots=True)
class RequestInfo:
    """The correction request as it may be published (masked PAN only)."""

    mti: str
    stan: str  #: DE11
    rrn: str | None  #: DE37 assigned by the gateway to this request
    amount: int | None  #: DE4, minor units
    currency: str | None  #: DE49, ISO 4217 numeric
    pan: str | None  #: masked: first 6 + last 4


@dataclass(slots=True)
class OriginalInfo:
    """The original authorization a correction points at."""

    mti: str
    stan: str
    rrn: str
    approval_code: str | None
    amount: int
    currency: str
    batch: str
    approved_at: datetime


@dataclass(slots=True)
class BalanceInfo:
    """The original's balance after the correction."""

    original_amount: int
    refunded: int
    reversed: int
    refundable: int
    status: str


@dataclass(slots=True)
class CorrectionEvent:
    """One correction fact. ``type`` is ``pos.<kind>.<outcome>``."""

    kind: str  #: void, refund, completion, reversal, duplicate, batch, upstream
    outcome: str  #: approved, declined, applied, unmatched, late, replayed, conflict, settled, mismatch, closed
    merchant_id: str  #: DE42
    terminal_id: str  #: DE41
    response_code: str | None  #: DE39 answered to the terminal; None for the gateway's own acts (a cut-off)
    reason: str | None
    subject_rrn: str  #: the original's RRN when known, else the request's own
    request: RequestInfo | None  #: None for the gateway's own acts (a batch closed by the cut-off)
    original: OriginalInfo | None = None
    balance: BalanceInfo | None = None
    #: kind-specific details (for example batch totals), JSON-compatible values only
    details: Mapping[str, object] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return f"pos.{self.kind}.{self.outcome}"
