"""What the acquirer host simulator answers, sans-I/O: a decoded request in, an :class:`Outcome` out.

The asyncio server (``server.py``) only moves bytes and waits; everything it decides comes from
here: the rule that applies, the answer (or none), the delay, whether to hang up. The clock is
passed in (it only stamps RRNs).

| request              | answer | DE39 by default                                                     |
|----------------------|--------|---------------------------------------------------------------------|
| 0800/0801 network    | 0810   | 00 for DE70 001 sign-on, 002 sign-off, 301 echo; else 12 (30: none) |
| 0100/0101, 0200/0201 | +10    | 00, with DE37 (echoed, else the host's own) and DE38                |
| 0120/0121, 0220/0221 | +10    | 00 (advices: accept-only), DE38 echoed when sent                    |
| 0400/0401            | 0410   | 00 when the host saw the original, else 25                          |
| 0420/0421            | 0430   | 00 (advices: accept-only)                                           |
| 0500/0501, 0520/0521 | +10    | 00                                                                  |
| other requests       | +10    | 12                                                                  |
| responses (xx10 ...) | none   | ignored (recorded)                                                  |
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ..codec import IsoMessage
from ..messages import response_mti
from .rules import Decision, Rule, RuleBook

__all__ = ["ECHOED_FIELDS", "Action", "HostEngine", "Kind", "Outcome", "RrnIssuer", "classify"]

Kind = Literal["network", "authorization", "financial", "advice", "reversal", "reversal_advice", "settlement",
               "response", "other"]  # fmt: skip
Action = Literal["answer", "drop", "close", "ignore"]

#: Echoed from the request when present (DE70 too for network management).
ECHOED_FIELDS = (3, 4, 7, 11, 12, 13, 41, 42, 49, 90)
_NETWORK_CODES = frozenset({"001", "002", "301"})  # sign-on, sign-off, echo
_WITH_RRN: frozenset[Kind] = frozenset({"authorization", "financial", "advice", "reversal", "reversal_advice"})
_RRN_MODULUS = 10**12


def classify(mti: str) -> Kind:
    """The kind of message an MTI names (0200 and its repeat 0201 are the same kind)."""
    if len(mti) != 4 or not mti.isdigit():
        return "other"
    if mti[2] in "13579":
        return "response"
    kinds: dict[str, Kind] = {
        "080": "network", "010": "authorization", "020": "financial", "012": "advice", "022": "advice",
        "040": "reversal", "042": "reversal_advice", "050": "settlement", "052": "settlement",
    }  # fmt: skip
    return kinds.get(mti[:3], "other")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with one request. ``answer`` is None for ``drop``, ``close`` and ``ignore``;
    ``original_found`` says, for reversals only, whether the host had seen the original."""

    request: IsoMessage
    kind: Kind
    decision: Decision
    action: Action
    answer: IsoMessage | None
    delay_ms: float = 0
    original_found: bool | None = None


class RrnIssuer:
    """12-digit RRNs (DE37): the clock in milliseconds, or one more than the last when faster.

    Unlike a counter from 1, this stays unique across a restart of the host, so a gateway that
    keeps RRNs in its ledger never sees the same RRN for two sales.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last = -1

    def next(self) -> str:
        now = int(self._clock() * 1000) % _RRN_MODULUS
        self._last = now if now > self._last else (self._last + 1) % _RRN_MODULUS
        return f"{self._last:012d}"


class HostEngine:
    """Rules plus the host's memory: the requests it received (for reversals) and its RRNs."""

    def __init__(self, rules: Sequence[Rule] = (), *, clock: Callable[[], float], remember: int = 100_000) -> None:
        self._book = RuleBook(rules)
        self._rrns = RrnIssuer(clock)
        self._remember = remember
        #: (DE41, MTI class, DE11) -> DE4 of every authorization/financial/advice request seen.
        self._originals: OrderedDict[tuple[str, str, str], str | None] = OrderedDict()

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._book.rules

    @rules.setter
    def rules(self, rules: Sequence[Rule]) -> None:
        """New rules take effect from the next request; their ``nth`` and ``times`` count from zero."""
        self._book = RuleBook(rules)

    def handle(self, request: IsoMessage) -> Outcome:
        kind = classify(request.mti)
        if kind == "response":
            return Outcome(request, kind, Decision(), "ignore", None)
        decision = self._book.decide(request)
        original_found = self._find_original(request) if kind in ("reversal", "reversal_advice") else None
        if kind in ("authorization", "financial", "advice"):
            self._remember_original(request)
        if decision.drop:
            return Outcome(request, kind, decision, "drop", None, 0, original_found)
        if decision.close:
            return Outcome(request, kind, decision, "close", None, decision.delay_ms, original_found)
        code = decision.code or _default_code(request, kind, original_found)
        answer = self._answer(request, kind, code, decision.approval_code)
        return Outcome(request, kind, decision, "answer", answer, decision.delay_ms, original_found)

    def _answer(self, request: IsoMessage, kind: Kind, code: str, approval_code: str | None) -> IsoMessage:
        fields = {n: request.fields[n] for n in ECHOED_FIELDS if n in request.fields}
        if kind == "network" and 70 in request.fields:
            fields[70] = request.fields[70]
        if kind in _WITH_RRN:
            own_rrn = self._rrns.next()
            fields[37] = request.fields.get(37) or own_rrn
            if code == "00" and kind in ("authorization", "financial"):
                fields[38] = approval_code or own_rrn[-6:]
        if kind == "advice" and 38 in request.fields:
            fields[38] = request.fields[38]
        fields[39] = code
        return IsoMessage(mti=response_mti(request.mti), fields=dict(sorted(fields.items())))

    def _remember_original(self, request: IsoMessage) -> None:
        key = _key(request.get(41), request.mti, request.stan)
        self._originals[key] = request.get(4)
        self._originals.move_to_end(key)
        while len(self._originals) > self._remember:
            self._originals.popitem(last=False)

    def _find_original(self, reversal: IsoMessage) -> bool:
        """By DE90 (original MTI + STAN) on the same terminal; without DE90, by the same DE11 and DE4."""
        terminal = reversal.get(41)
        reference = reversal.get(90)
        if reference and len(reference) >= 10:
            return _key(terminal, reference[:4], reference[4:10]) in self._originals
        return any(
            self._originals.get(_key(terminal, mti, reversal.stan), "") == reversal.get(4)
            for mti in ("0100", "0200", "0120", "0220")
        )


def _key(terminal: str | None, mti: str, stan: str | None) -> tuple[str, str, str]:
    return ((terminal or "").rstrip(), mti[:3], stan or "")


def _default_code(request: IsoMessage, kind: Kind, original_found: bool | None) -> str:
    if kind == "network":
        code = request.get(70)
        return "00" if code in _NETWORK_CODES else ("30" if code is None else "12")
    if kind == "reversal":
        return "00" if original_found else "25"
    if kind == "other":
        return "12"
    return "00"
