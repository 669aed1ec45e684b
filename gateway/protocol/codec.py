"""ISO 8583 message codec: bytes <-> :class:`Message`, driven by a :class:`Profile`.

This is the only module of ``gateway`` that imports pyiso8583; its dicts never leave it. Decoding
checks every data element against its profile ``content`` class, so the rest of the gateway can
trust that an "n" field holds digits. Errors name the field, the byte position and the reason but
never the bytes or the values: pyiso8583's own exceptions hold the raw message, so they are
translated and raised outside the handler (no ``__cause__``, no ``__context__``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import iso8583

from gateway.protocol.message import Message
from gateway.protocol.profile import FieldDef, Profile

__all__ = ["Codec", "DecodeError", "EncodeError"]

_Check = Callable[[str], bool]

_CLASSES: Mapping[str, str] = {
    "n": "[0-9]",
    "an": "[0-9A-Za-z ]",
    "ans": "[\\x20-\\x7e]",
    "b": "[0-9A-Fa-f]",
    "z": "[0-9=D]",
}
_WHAT: Mapping[str, str] = {
    "n": "digits only",
    "an": "letters, digits and spaces",
    "ans": "printable ASCII",
    "b": "hexadecimal",
    "z": "track 2 characters (digits, '=' or 'D')",
}
_SPECIAL_NAMES: Mapping[str, str] = {
    "h": "message header",
    "t": "message type",
    "p": "primary bitmap",
    "1": "secondary bitmap",
}
#: Stands in for every data element a profile does not define: a fixed length no frame can reach,
#: so pyiso8583 stops there with its own DecodeError and keeps what it decoded so far.
_UNDEFINED: Mapping[str, Any] = {
    "data_enc": "ascii",
    "len_enc": "ascii",
    "len_type": 0,
    "max_len": 1 << 40,
    "desc": "not defined in this profile",
}


class DecodeError(Exception):
    """A message that cannot be decoded, or holds a malformed data element. Costs one message.

    ``mti`` is set when the message type was readable, ``field`` / ``position`` locate the fault
    (data element number, byte offset in the payload), and ``partial`` holds the data elements that
    did decode and validate, so a format-error response (MTI + 10, DE39 = 30) can echo DE11, 41, 42.
    The text never contains bytes or field values.
    """

    def __init__(
        self,
        reason: str,
        *,
        mti: str | None = None,
        field: int | None = None,
        position: int | None = None,
        partial: Message | None = None,
    ) -> None:
        self.reason = reason
        self.mti = mti
        self.field = field
        self.position = position
        self.partial = partial
        where = f"field {field}" if field is not None else "message"
        if position is not None:
            where += f" at byte {position}"
        what = f"cannot decode {mti}" if mti is not None else "cannot decode message"
        super().__init__(f"{what}: {where}: {reason}")


class EncodeError(Exception):
    """A message that cannot be encoded with this profile. The text never contains field values."""

    def __init__(self, reason: str, *, mti: str | None = None, field: int | None = None) -> None:
        self.reason = reason
        self.mti = mti
        self.field = field
        where = f"field {field}" if field is not None else "message"
        what = f"cannot encode {mti}" if mti is not None else "cannot encode message"
        super().__init__(f"{what}: {where}: {reason}")


def _pattern_check(content: str, even_length: bool) -> _Check:
    """The reference check of a content class: a regular expression over the whole value."""
    cls = _CLASSES[content]
    match = re.compile(f"(?:{cls}{cls})*" if even_length else f"{cls}*").fullmatch
    return lambda value: match(value) is not None


def _digits(value: str) -> bool:
    return value.isascii() and (value.isdigit() or not value)


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def _alphanumeric(value: str) -> bool:
    if not value.isascii():
        return False
    rest = value.replace(" ", "")
    return rest.isalnum() or not rest


#: the same answers as :func:`_pattern_check` through str methods (several times faster, checked
#: against it by a property test): ASCII ``isdigit`` is [0-9], ``isprintable`` 0x20-0x7E, ``isalnum``
#: [0-9A-Za-z]
_FAST_CHECKS: Mapping[str, _Check] = {"n": _digits, "ans": _printable, "an": _alphanumeric}


def _checker(field: FieldDef) -> _Check:
    fast = _FAST_CHECKS.get(field.content)
    if fast is None:
        return _pattern_check(field.content, field.even_length)
    if field.even_length:
        return lambda value: fast(value) and len(value) % 2 == 0
    return fast


def _content_reason(field: FieldDef) -> str:
    reason = f"content {field.content!r} expected ({_WHAT[field.content]})"
    if field.even_length:
        reason += " with an even number of characters"
    return reason


def _is_mti(value: str) -> bool:
    return len(value) == 4 and value.isdigit() and value.isascii()


def _offset(encoded: Mapping[str, Mapping[str, bytes]], key: str) -> int | None:
    """Byte offset of one element in the payload, from pyiso8583's encoded parts (error path only)."""
    position = 0
    for name, part in encoded.items():
        if name == key:
            return position
        position += len(part["len"]) + len(part["data"])
    return None


class Codec:
    """Decodes and encodes ISO 8583 messages of one profile. Stateless after construction."""

    __slots__ = ("_by_key", "_by_number", "_defs", "_header", "_profile", "_spec")

    def __init__(self, profile: Profile) -> None:
        self._profile = profile
        spec: dict[str, Any] = {key: dict(value) for key, value in profile.iso_spec.items()}
        for number in range(2, 193):
            if number != 65:
                spec.setdefault(str(number), dict(_UNDEFINED))
        header = spec["h"]
        self._header: str | None = header.pop("value", None) if header["max_len"] > 0 else None
        self._spec = spec
        self._defs: Mapping[int, FieldDef] = profile.fields
        self._by_key: dict[str, tuple[int, _Check]] = {
            str(number): (number, _checker(field)) for number, field in profile.fields.items()
        }
        self._by_number: dict[int, tuple[str, _Check]] = {
            number: (key, check) for key, (number, check) in self._by_key.items()
        }

    @property
    def profile(self) -> Profile:
        return self._profile

    def decode(self, payload: bytes) -> Message:
        """The message in ``payload`` (no length header, no TPDU). Raises only :class:`DecodeError`."""
        try:
            decoded, encoded = iso8583.decode(payload, self._spec)
        except iso8583.DecodeError as exc:
            failure = self._translate(exc)
        except Exception as exc:
            failure = DecodeError(f"malformed message ({type(exc).__name__})")
        else:
            return self._checked(decoded, encoded)
        # Raised outside the handler: no __context__ may point at pyiso8583's error and its raw bytes.
        raise failure

    def _checked(self, decoded: Mapping[str, str], encoded: Mapping[str, Mapping[str, bytes]]) -> Message:
        """The decoded message once every data element passed its content check."""
        mti = decoded["t"]
        if not _is_mti(mti):
            raise DecodeError("message type is not 4 digits", position=_offset(encoded, "t"))
        fields: dict[int, str] = {}
        bad: int | None = None
        by_key = self._by_key
        for key, value in decoded.items():
            entry = by_key.get(key)
            if entry is None:  # h, t, p, 1
                continue
            number, check = entry
            if not check(value):
                if bad is None:
                    bad = number
                continue
            fields[number] = value
        if bad is not None:
            raise DecodeError(
                _content_reason(self._defs[bad]),
                mti=mti,
                field=bad,
                position=_offset(encoded, str(bad)),
                partial=Message(mti, fields),
            )
        if len(decoded.get("1", "")) > 16:
            raise DecodeError(
                "bit 65 (tertiary bitmap) is not supported",
                mti=mti,
                field=65,
                position=_offset(encoded, "1"),
                partial=Message(mti, fields),
            )
        return Message(mti, fields)

    def _translate(self, exc: iso8583.DecodeError) -> DecodeError:
        """A safe DecodeError from pyiso8583's (which holds the raw bytes)."""
        key = str(exc.field)
        raw_mti = exc.doc_dec.get("t", "")
        mti = raw_mti if isinstance(raw_mti, str) and _is_mti(raw_mti) and key != "t" else None
        message = str(exc.msg)
        message = message[:1].lower() + message[1:]
        field: int | None = None
        if message.startswith("extra data"):
            reason = "extra data after the last field"
            failed = None
        elif key in _SPECIAL_NAMES:
            reason = f"{_SPECIAL_NAMES[key]}: {message}"
            field = 1 if key == "1" else None
            failed = key
        elif key.isdigit():
            field = int(key)
            failed = key
            defined = field in self._defs
            reason = message if defined else f"field {field} is not defined in profile {self._profile.name}"
            if field > 128 and not defined:
                field, reason = 65, "bit 65 (tertiary bitmap) is not supported"
        else:
            reason, failed = message, None
        partial: Message | None = None
        if mti is not None:
            fields: dict[int, str] = {}
            for name, value in exc.doc_dec.items():
                if name == failed:
                    continue
                entry = self._by_key.get(name)
                if entry is not None and entry[1](value):
                    fields[entry[0]] = value
            partial = Message(mti, fields)
        return DecodeError(reason, mti=mti, field=field, position=int(exc.pos), partial=partial)

    def encode(self, message: Message, *, checked: bool = False) -> bytes:
        """The payload for ``message`` (no length header, no TPDU). Raises only :class:`EncodeError`.

        ``checked``: every value already passed this profile's content checks (a response echoing a
        decoded request, plus values the gateway made itself), so only pyiso8583's own length and
        type checks run. The profile's field list is still enforced.
        """
        mti = message.mti
        if not isinstance(mti, str) or not _is_mti(mti):
            raise EncodeError("message type must be 4 digits")
        doc: dict[str, str] = {"t": mti}
        if self._header is not None:
            doc["h"] = self._header
        by_number = self._by_number
        if checked:
            for number, value in message.fields.items():
                entry = by_number.get(number)
                if entry is None or type(value) is not str:
                    return self.encode(message)  # the full checks say precisely what is wrong
                doc[entry[0]] = value
            return self._encode_doc(doc, mti)
        for number, value in message.fields.items():
            entry = by_number.get(number)
            if entry is None:
                raise EncodeError(f"not a data element of profile {self._profile.name}", mti=mti, field=number)
            key, check = entry
            if type(value) is not str:
                raise EncodeError(f"value must be text, not {type(value).__name__}", mti=mti, field=number)
            if not check(value):
                raise EncodeError(_content_reason(self._defs[number]), mti=mti, field=number)
            doc[key] = value
        return self._encode_doc(doc, mti)

    def _encode_doc(self, doc: dict[str, str], mti: str) -> bytes:
        try:
            encoded, _ = iso8583.encode(doc, self._spec)
        except iso8583.EncodeError as exc:
            key = str(exc.field)
            field = int(key) if key.isdigit() else None
            reason = str(exc.msg) if field is not None else f"{_SPECIAL_NAMES.get(key, key)}: {exc.msg}"
            failure = EncodeError(reason, mti=mti, field=field)
        except Exception as exc:
            failure = EncodeError(f"malformed message ({type(exc).__name__})", mti=mti)
        else:
            return bytes(encoded)
        raise failure
