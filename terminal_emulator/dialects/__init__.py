"""The seam between the terminal's behaviour and a network's messages.

The terminal (:mod:`terminal_emulator.terminal`) decides *what* to do: which transaction, which
original, when to reverse, when to settle. A dialect decides *how that looks on the wire*: MTIs,
processing codes, where the original is named, how totals travel, and how to read the answers that
change the terminal's state (a sign-on's batch, a settlement's result). Everything here is pure:
the STAN and time (:class:`~terminal_emulator.messages.Stamp`) and the terminal's identity and batch
(:class:`Station`) are passed in.

- ``iso87`` (:mod:`.iso87`): generic ISO 8583:1987, design section 4 (profiles ``iso87-binary``,
  ``iso87-ascii``);
- ``cup`` (:mod:`.cup`): UnionPay POS practice, transaction type in 60.1, originals in 37/38/61
  (profile ``cup-pos``).

A profile names its dialect (``[dialect] name``); :func:`dialect_for` gives it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from ..codec import IsoMessage
from ..errors import UsageError
from ..journal import PendingReversal, TransactionRecord
from ..messages import Stamp, Totals
from ..profile import WireProfile

__all__ = [
    "CARD_FIELDS",
    "Card",
    "Dialect",
    "LoadReference",
    "Reconciliation",
    "Station",
    "dialect_for",
]

#: Card data a terminal never keeps in its journal nor repeats from memory: PAN, expiry, tracks,
#: PIN block, EMV data, MAC.
CARD_FIELDS = frozenset({2, 14, 35, 36, 45, 52, 55, 64})

#: What a settlement answer says about the terminal's totals.
Reconciliation = Literal["balanced", "not_balanced", "error"]


@dataclass(frozen=True, slots=True)
class Station:
    """Who is sending: terminal id (DE41), merchant id (DE42), and the open batch number."""

    tid: str
    mid: str
    batch: int


@dataclass(frozen=True, slots=True)
class Card:
    """The card as read for this request (never stored: the journal keeps it masked)."""

    pan: str
    expiry: str | None = None


@dataclass(frozen=True, slots=True)
class LoadReference:
    """An approved purchase the load generator corrects: its STAN, DE7, RRN and date (MMDD)."""

    stan: str
    transmitted: str
    rrn: str
    date: str


class Dialect(Protocol):
    """What the terminal asks of a dialect. Amounts are integer minor units."""

    name: str
    #: the test card used when none is given (a card of the network's own range)
    default_pan: str
    #: ISO 4217 numeric currency used when none is given
    default_currency: str
    #: False when a reversal repeats the original's STAN instead of taking a new one
    reversal_has_own_stan: bool
    #: True when a batch the host finds not balanced is uploaded transaction by transaction
    has_batch_upload: bool

    # --- requests ------------------------------------------------------------------------------
    def purchase(self, st: Stamp, station: Station, card: Card, amount: int, currency: str) -> IsoMessage: ...

    def preauth(self, st: Stamp, station: Station, card: Card, amount: int, currency: str) -> IsoMessage: ...

    def completion(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        preauth: TransactionRecord | None, approval_code: str | None,
    ) -> IsoMessage:
        """Completion of ``preauth`` (the journal's record, ``None`` when not in the journal)."""
        ...

    def void(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        rrn: str, original: TransactionRecord | None,
    ) -> IsoMessage: ...

    def refund(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        rrn: str | None, original: TransactionRecord | None, by_original_data: bool,
    ) -> IsoMessage: ...

    def reversal(self, st: Stamp, station: Station, pan: str, pending: PendingReversal) -> IsoMessage:
        """The (first) reversal message of ``pending``; repeats change its MTI by :meth:`repeat_mti`."""
        ...

    def repeat_mti(self, mti: str) -> str:
        """The MTI a terminal repeats a request with (``0400`` -> ``0401`` in iso87)."""
        ...

    def settlement(self, st: Stamp, station: Station, currency: str, totals: Totals, others: Totals) -> IsoMessage:
        """``totals``: what :meth:`in_main_totals` selects (with the caller's overrides); ``others``:
        the rest of the batch (UnionPay's foreign cards)."""
        ...

    def in_main_totals(self, record: TransactionRecord) -> bool: ...

    def batch_upload(self, st: Stamp, station: Station, record: TransactionRecord, pan: str) -> IsoMessage:
        """One transaction of a batch the host found not balanced (UnionPay 0320), paid with ``pan``."""
        ...

    def batch_end(self, st: Stamp, station: Station, count: int) -> IsoMessage: ...

    def echo(self, st: Stamp, station: Station, code: str) -> IsoMessage: ...

    def signon(self, st: Stamp, station: Station, operator: str) -> IsoMessage: ...

    # --- reading answers and requests ----------------------------------------------------------
    def signed_on_batch(self, response: IsoMessage) -> int | None:
        """The batch number a sign-on answer tells the terminal to use, if any."""
        ...

    def reconciliation(self, response: IsoMessage) -> Reconciliation | None:
        """A settlement answer's verdict on the terminal's totals (``None``: not a verdict)."""
        ...

    def totals_sent(self, request: IsoMessage) -> Totals | None:
        """The totals a settlement request carries (all cards together)."""
        ...

    def original_stan(self, request: IsoMessage) -> str | None:
        """The STAN of the transaction a correction or reversal points at, where the request names it."""
        ...

    # --- load mode -----------------------------------------------------------------------------
    def load_templates(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str
    ) -> Mapping[str, IsoMessage]:
        """One request per load kind (purchase, refund, void, reversal), references as placeholders."""
        ...

    def load_reference(self, kind: str, original: LoadReference, batch: int) -> dict[int, str]:
        """The fields that make the ``kind`` template point at ``original`` (fixed width)."""
        ...


def dialect_for(profile: WireProfile) -> Dialect:
    """The dialect ``profile`` names; a :class:`UsageError` for one the emulator does not speak."""
    from .cup import CUP
    from .iso87 import ISO87

    known: dict[str, Dialect] = {"iso87": ISO87, "cup": CUP}
    try:
        return known[profile.dialect]
    except KeyError:
        raise UsageError(
            f"profile {profile.name} uses dialect {profile.dialect!r}; the emulator speaks {', '.join(known)}"
        ) from None
