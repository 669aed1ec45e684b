"""What the host simulator received: one :class:`Record` per request, a JSON line in the journal file
and a line in the log. The PAN is masked (first 6 + last 4); track, PIN and EMV data are never kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ..codec import IsoMessage
from ..masking import mask_pan
from .engine import Outcome
from .rules import card_number

__all__ = ["JournalFile", "Record", "describe", "record_of"]


@dataclass(frozen=True, slots=True)
class Record:
    """One received request and what the host did with it.

    ``stan`` DE11, ``terminal_id`` DE41, ``merchant_id`` DE42, ``processing_code`` DE3, ``amount``
    DE4 (minor units), ``original`` DE90, ``pan`` DE2 or DE35's PAN masked; ``response_code`` DE39,
    ``rrn`` DE37 and ``approval_code`` DE38 as sent (None when nothing was sent); ``action``:
    ``answer``, ``drop``, ``close``, ``ignore`` (a response arrived) or ``error`` (undecodable).
    ``message`` is the request as received, for in-process tests only: never written anywhere.
    """

    time: datetime
    connection: int
    mti: str | None
    action: str
    kind: str | None = None
    stan: str | None = None
    terminal_id: str | None = None
    merchant_id: str | None = None
    processing_code: str | None = None
    amount: int | None = None
    original: str | None = None
    pan: str | None = None
    response_mti: str | None = None
    response_code: str | None = None
    rrn: str | None = None
    approval_code: str | None = None
    rule: int | None = None
    rule_name: str | None = None
    delay_ms: float = 0
    original_found: bool | None = None
    error: str | None = None
    message: IsoMessage | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The journal line's object (no ``message``; absent values as null)."""
        out: dict[str, Any] = {"time": self.time.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
        for name in Record.__dataclass_fields__:
            if name not in ("time", "message"):
                out[name] = getattr(self, name)
        return out


def record_of(outcome: Outcome, connection: int, now: datetime) -> Record:
    request = outcome.request
    fields = request.fields
    pan = card_number(request)
    amount = fields.get(4)
    answer = outcome.answer
    return Record(
        time=now,
        connection=connection,
        mti=request.mti,
        action=outcome.action,
        kind=outcome.kind,
        stan=fields.get(11),
        terminal_id=fields.get(41),
        merchant_id=fields.get(42),
        processing_code=fields.get(3),
        amount=int(amount) if amount is not None and amount.isdigit() else None,
        original=fields.get(90),
        pan=mask_pan(pan) if pan else None,
        response_mti=answer.mti if answer is not None else None,
        response_code=answer.get(39) if answer is not None else None,
        rrn=answer.get(37) if answer is not None else None,
        approval_code=answer.get(38) if answer is not None else None,
        rule=outcome.decision.rule,
        rule_name=outcome.decision.name,
        delay_ms=outcome.delay_ms,
        original_found=outcome.original_found,
        message=request,
    )


def describe(record: Record) -> str:
    """The log line: ``conn 3 0200 stan 000123 tid TERM0001 amount 1000 card 476173******0119 -> 0210 00``."""
    parts = [f"conn {record.connection}", record.mti or "????"]
    for label, value in (("stan", record.stan), ("tid", record.terminal_id), ("amount", record.amount),
                         ("card", record.pan), ("orig", record.original[:10] if record.original else None)):
        if value is not None:
            parts.append(f"{label} {value}")
    if record.action == "answer":
        parts.append(f"-> {record.response_mti} {record.response_code}")
    else:
        parts.append(f"-> {record.action}" + (f" ({record.error})" if record.error else ""))
    if record.rule is not None:
        parts.append(f"rule {record.rule}" + (f" {record.rule_name!r}" if record.rule_name else ""))
    if record.delay_ms:
        parts.append(f"after {record.delay_ms:g} ms")
    if record.original_found is not None:
        parts.append("original seen" if record.original_found else "original unknown")
    return "  ".join(parts)


class JournalFile:
    """Appends one JSON object per line and flushes it (a reader can ``tail -f`` the file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle: IO[str] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: Record) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
