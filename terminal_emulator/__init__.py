"""ISO 8583 terminal emulator: a POS terminal for integration tests, scenarios and load.

It encodes with pyiso8583 and the ``specs/`` data files directly, never through ``gateway.protocol``,
so that a codec bug cannot cancel out between the gateway and its test terminal. The profile's dialect
(``iso87`` or UnionPay's ``cup``, :mod:`terminal_emulator.dialects`) builds the requests.
"""

from __future__ import annotations

from .codec import IsoMessage, MessageDecodeError, MessageEncodeError, decode_message, encode_message
from .errors import (
    ConnectionFailed,
    ConnectionLost,
    ResponseTimeout,
    ReversalPending,
    TerminalError,
    TransportError,
    UsageError,
)
from .journal import Journal, PendingReversal, TransactionRecord, load_journal
from .masking import mask_pan
from .messages import DEFAULT_PAN, Totals
from .profile import Framing, ProfileError, WireProfile, load_profile, profile_from_spec
from .terminal import Exchange, Terminal

__all__ = [
    "DEFAULT_PAN",
    "ConnectionFailed",
    "ConnectionLost",
    "Exchange",
    "Framing",
    "IsoMessage",
    "Journal",
    "MessageDecodeError",
    "MessageEncodeError",
    "PendingReversal",
    "ProfileError",
    "ResponseTimeout",
    "ReversalPending",
    "Terminal",
    "TerminalError",
    "Totals",
    "TransactionRecord",
    "TransportError",
    "UsageError",
    "WireProfile",
    "decode_message",
    "encode_message",
    "load_journal",
    "load_profile",
    "mask_pan",
    "profile_from_spec",
]
