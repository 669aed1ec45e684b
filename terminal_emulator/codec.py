"""ISO 8583 message encoding with pyiso8583 and a profile's spec (the emulator's own codec).

pyiso8583's dicts stay in this module: callers see :class:`IsoMessage` (MTI and data elements as
text keyed by number). Errors never carry the raw bytes or field values (they may hold card data).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import iso8583

from .masking import masked_fields
from .profile import WireProfile

__all__ = ["IsoMessage", "MessageDecodeError", "MessageEncodeError", "decode_message", "encode_message"]

_NON_DATA_KEYS = frozenset({"h", "t", "p", "1"})


class MessageEncodeError(ValueError):
    """A message could not be encoded with the profile (usage error: a field is too long, ...)."""


class MessageDecodeError(ValueError):
    """A received frame is not a valid ISO 8583 message in this profile."""


@dataclass(frozen=True, slots=True)
class IsoMessage:
    """An MTI plus data elements (``fields``: number -> text; binary fields as upper-case hex)."""

    mti: str
    fields: Mapping[int, str] = field(default_factory=dict)

    def get(self, number: int) -> str | None:
        return self.fields.get(number)

    @property
    def stan(self) -> str | None:
        """DE11, the system trace audit number."""
        return self.fields.get(11)

    @property
    def response_code(self) -> str | None:
        """DE39."""
        return self.fields.get(39)

    def masked(self) -> dict[str, str]:
        """The fields as text keys with PAN masked and track/PIN/EMV data redacted."""
        return masked_fields(self.fields, self.mti)

    def __repr__(self) -> str:
        return f"IsoMessage(mti={self.mti!r}, fields={self.masked()!r})"


def pyiso8583_document(profile: WireProfile, message: IsoMessage) -> dict[str, str]:
    """The dict pyiso8583 encodes: MTI, the profile's application header if it has one, fields."""
    if len(message.mti) != 4 or not message.mti.isdigit():
        raise MessageEncodeError(f"an MTI is 4 digits, got {message.mti!r}")
    doc: dict[str, str] = {"t": message.mti}
    header_spec = profile.spec["h"]
    if header_spec["max_len"] > 0:
        doc["h"] = profile.header_value or "0" * (
            header_spec["max_len"] * (2 if header_spec["data_enc"] == "b" else 1)
        )
    for number, value in message.fields.items():
        if str(number) not in profile.spec or number in (1, 65):
            raise MessageEncodeError(f"field {number} is not in profile {profile.name}")
        doc[str(number)] = value
    return doc


def encode_message(profile: WireProfile, message: IsoMessage) -> bytes:
    """The message body (no length header) as the profile encodes it."""
    doc = pyiso8583_document(profile, message)
    try:
        encoded, _ = iso8583.encode(doc, profile.spec)
    except iso8583.EncodeError as exc:
        raise MessageEncodeError(f"cannot encode field {exc.field}: {_safe_reason(exc.msg)}") from None
    except (TypeError, ValueError, UnicodeError) as exc:
        raise MessageEncodeError(f"cannot encode message: {type(exc).__name__}") from None
    return bytes(encoded)


def decode_message(profile: WireProfile, payload: bytes) -> IsoMessage:
    """Decode a message body (length header and TPDU already removed)."""
    try:
        doc, _ = iso8583.decode(payload, profile.spec)
    except iso8583.DecodeError as exc:
        raise MessageDecodeError(
            f"cannot decode field {exc.field} at byte {exc.pos}: {_safe_reason(exc.msg)}"
        ) from None
    except (TypeError, ValueError, UnicodeError, KeyError) as exc:
        raise MessageDecodeError(f"cannot decode message: {type(exc).__name__}") from None
    fields = {int(k): v for k, v in doc.items() if k not in _NON_DATA_KEYS}
    return IsoMessage(mti=doc["t"], fields=fields)


def _safe_reason(msg: str) -> str:
    # pyiso8583's ``msg`` (unlike ``str(exc)`` and the exception's attributes) only speaks of
    # lengths and encodings, never of the data itself; keep it short anyway.
    return msg[:120]
