"""The wire-neutral ISO 8583 message: an MTI and data elements as text.

This is what the codec hands out instead of pyiso8583's dicts. Field numbers are ints
(2..128); values are the decoded text (binary fields as upper-case hex).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: Data elements whose content is sensitive card data: never logged, stored or published.
SENSITIVE_FIELDS: frozenset[int] = frozenset({2, 35, 36, 45, 52, 55})


@dataclass(slots=True)
class Message:
    """One ISO 8583 message.

    ``mti`` is the 4-digit message type indicator; ``fields`` maps data element numbers to
    their text value. The repr never shows sensitive fields (PAN, track data, PIN, EMV).
    """

    mti: str
    fields: Mapping[int, str] = field(default_factory=dict)

    def get(self, number: int) -> str | None:
        return self.fields.get(number)

    def __repr__(self) -> str:
        shown = {k: ("<redacted>" if k in SENSITIVE_FIELDS else v) for k, v in sorted(self.fields.items())}
        return f"Message(mti={self.mti!r}, fields={shown!r})"
