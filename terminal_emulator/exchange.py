"""One request of the emulated terminal and what came back (its own module: the errors name it too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .codec import IsoMessage
from .journal import TransactionRecord

__all__ = ["Exchange", "Outcome"]

Outcome = Literal["answered", "timeout", "lost", "connection_lost"]


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and its answer. ``outcome`` ``lost``: the answer came but was dropped on purpose
    (:meth:`Terminal.lose_next_response`), so the terminal behaved as after a time-out."""

    kind: str
    request: IsoMessage
    response: IsoMessage | None
    elapsed_ms: float
    outcome: Outcome = "answered"
    record: TransactionRecord | None = field(default=None, repr=False, compare=False)

    @property
    def response_code(self) -> str | None:
        """DE39 of the answer."""
        return self.response.get(39) if self.response is not None else None

    @property
    def approved(self) -> bool:
        return self.outcome == "answered" and self.response_code == "00"

    @property
    def rrn(self) -> str | None:
        """DE37 of the answer (the host's retrieval reference number)."""
        return self.response.get(37) if self.response is not None else None

    @property
    def approval_code(self) -> str | None:
        """DE38 of the answer."""
        return self.response.get(38) if self.response is not None else None
