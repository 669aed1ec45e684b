"""The emulator's exceptions. Messages never hold card data or raw frames."""

from __future__ import annotations

from .exchange import Exchange

__all__ = [
    "ConnectionFailed",
    "ConnectionLost",
    "ResponseTimeout",
    "ReversalPending",
    "TerminalError",
    "TransportError",
    "UsageError",
]


class TerminalError(Exception):
    """Base class of everything the emulator raises on purpose."""


class UsageError(TerminalError, ValueError):
    """The request cannot be built from what was given (CLI exit code 2)."""


class TransportError(TerminalError):
    """Connection-level failure (CLI exit code 1). ``exchange`` is the request that got no answer."""

    def __init__(self, message: str, exchange: Exchange | None = None) -> None:
        super().__init__(message)
        self.exchange = exchange


class ConnectionFailed(TransportError):
    """The host could not be reached; nothing was sent."""


class ConnectionLost(TransportError):
    """The connection closed (or the host sent garbage) while a request waited for its answer."""


class ResponseTimeout(TransportError):
    """No answer within the time-out (or, simulated, the answer was lost on the way)."""


class ReversalPending(TransportError):
    """A stored reversal could not be delivered, so the terminal refuses to send anything new."""
