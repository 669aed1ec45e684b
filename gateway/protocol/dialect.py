"""The seam between the wire and the rules: a dialect says what a decoded message means and how it is
answered. A profile names its dialect (``[dialect] name``); :func:`dialect_for` gives the service that
dialect, which is the only part of the gateway that knows a network's MTIs, processing codes and
private fields. ``iso87`` (generic ISO 8583:1987, :mod:`gateway.protocol.iso87`) and ``cup``
(UnionPay-style POS, :mod:`gateway.protocol.cup`) are implemented; a new dialect is a module with a
``DIALECT`` and one line in :data:`_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.core.model import Request
from gateway.protocol.message import Message

#: dialect name -> the module that implements it (imported when a profile names it)
_MODULES: dict[str, str] = {"iso87": "gateway.protocol.iso87", "cup": "gateway.protocol.cup"}
#: dialects this release implements (a profile naming another is refused at start)
IMPLEMENTED_DIALECTS: tuple[str, ...] = tuple(_MODULES)


class DialectError(Exception):
    """A decoded message that cannot be understood: answered with DE39 = 30 (format error).

    The message names the field and what is wrong, never its value.
    """

    def __init__(self, reason: str, field: int | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"field {field}: {reason}" if field is not None else reason)


class UnsupportedMessage(Exception):
    """A well-formed request this gateway does not handle (answered with the profile's code)."""


@dataclass(frozen=True, slots=True)
class AnswerFacts:
    """What an answer may carry beyond its response code, RRN and approval code (a dialect takes what
    its terminals expect: ``cup`` sends the host's local time and a settlement's result digit)."""

    #: the decision's reason (``approved``, ``settlement_mismatch``...); None when nothing was decided
    reason: str | None = None
    #: the host's local date and time (the settlement time zone's), for DE12 / DE13
    local_time: datetime | None = None
    #: the batch number the terminal is to use (an answer to a sign-on)
    batch_no: str | None = None


class Dialect(Protocol):
    """What the service asks of a dialect. All of it is pure: no I/O, no clock, no ledger."""

    @property
    def name(self) -> str: ...

    def response_mti(self, mti: str) -> str | None:
        """The MTI of the answer to ``mti``, or None when ``mti`` is not a request (it gets no answer)."""
        ...

    def classify(self, message: Message) -> Request:
        """The request a decoded message is; raises :class:`DialectError` (answered with a format error)
        or :class:`UnsupportedMessage` (answered with the profile's code for it)."""
        ...

    def build_response(
        self,
        request: Message,
        response_code: str,
        *,
        rrn: str | None = None,
        approval_code: str | None = None,
        facts: AnswerFacts | None = None,
    ) -> Message:
        """The answer to ``request`` with the decision's response code, RRN and approval code (and what of
        ``facts`` the dialect's answers carry)."""
        ...


@dataclass(frozen=True, slots=True)
class FunctionDialect:
    """A dialect made of a module's three pure functions (how :mod:`~gateway.protocol.iso87` and
    :mod:`~gateway.protocol.cup` give their ``DIALECT``)."""

    name: str
    response_mti: Callable[[str], str | None]
    classify: Callable[[Message], Request]
    build_response: Callable[..., Message]


def dialect_for(name: str) -> Dialect:
    """The dialect a profile names; :class:`KeyError` for one this release does not implement."""
    module = importlib.import_module(_MODULES[name])
    dialect: Dialect = module.DIALECT
    return dialect
