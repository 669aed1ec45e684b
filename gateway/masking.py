"""Card data kept out of every log line (PCI DSS minded, design section 7): :func:`mask_card_data`, the
structlog processor the logging pipeline ends with, applied to every value, nested ones included:

- keys that name card data are masked whatever their value: under a PAN-like key (``pan``,
  ``card_number``, ...) every run of 7 or more digits keeps only its first 6 and last 4; a key naming
  track data, PIN blocks, EMV/ICC data or card verification values is replaced by ``[redacted]``;
- in any text, a card number that passes the Luhn check is masked to first 6 + last 4: a run of 13 to
  19 digits, or one written in groups (``4761 7390 0101 0119``, ``4761-7390-0101-0119``);
- a card number split across neighbouring values (a shifted bitmap made track-2 bytes parse as
  DE41 and DE42: ``"terminal": "33491753", "merchant": "0212345672=2812"``) is masked too: the digits
  that end one value and begin the next (through values made only of digits) are read as one number;
- bytes are never written (they may be a raw frame), only their length; other objects are written
  through ``str()`` and masked like text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from datetime import date, datetime, time
from enum import Enum
from typing import Any, Final

from structlog.typing import EventDict, WrappedLogger

from gateway.core.cards import luhn_checksum_ok, mask_pan

__all__ = ["REDACTED", "mask_card_data", "mask_text"]

REDACTED: Final = "[redacted]"

#: a card number as written in text: 13-19 digits, together or in groups of 3 to 6 joined by one space
#: or dash (a longer run is not a card number, e.g. DE90's 42 digits)
_CARD_IN_TEXT: Final = re.compile(r"(?<![0-9])(?:[0-9]{13,19}|[0-9]{3,6}(?:[ -][0-9]{3,6}){2,5})(?![0-9])")
_DIGIT_RUN: Final = re.compile(r"[0-9]{7,}")
_ASCII_DIGITS: Final = frozenset("0123456789")
#: what every card number _CARD_IN_TEXT finds is made of, together or grouped (a shortcut's test: _quiet)
_CARD_CHARS: Final = re.compile(r"[0-9 -]{13}")
#: between the texts joined for that test: a value that is no text ends a neighbourhood
_NOT_TEXT: Final = "\x00"

_PLAIN, _PAN, _SECRET = 0, 1, 2
_PAN_NAMES: Final = frozenset({"pan", "de2", "cardnumber", "cardno", "accountnumber", "maskedpan"})
_SECRET_NAMES: Final = frozenset(
    {"track", "track1", "track2", "track3", "trackdata", "track2data", "de35", "de36", "de45", "pin", "pinblock",
     "de52", "icc", "iccdata", "emv", "emvdata", "de55", "cvv", "cvv2", "cvc", "cvc2", "cvn", "cav", "pvv"}
)  # fmt: skip
#: decoded messages use data element numbers as keys
_FIELD_KINDS: Final = {"2": _PAN, "35": _SECRET, "36": _SECRET, "45": _SECRET, "52": _SECRET, "55": _SECRET}
_kinds: dict[str, int] = {}  # bounded cache of key -> kind
#: values orjson writes as they are, and that cannot hold a card number as text
_NATIVE: Final = (int, float, bool, type(None), datetime, date, time)


def _kind(key: object) -> int:
    """Whether a key names a PAN, secret card data, or neither (``pin_block``, ``cardNumber``, ``35``...)."""
    if type(key) is str and (known := _kinds.get(key)) is not None:
        return known
    if not isinstance(key, str | int):
        return _PLAIN
    text = str(key)
    kind = _kinds.get(text)
    if kind is None:
        tokens = re.findall(r"[a-z0-9]+", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", text).lower())
        names = {*tokens, "".join(tokens), *(a + b for a, b in itertools.pairwise(tokens))}
        kind = _FIELD_KINDS.get(text) or (_SECRET if names & _SECRET_NAMES else _PAN if names & _PAN_NAMES else _PLAIN)
        if len(_kinds) < 4096:
            _kinds[text] = kind
    return kind


def _is_card_number(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and luhn_checksum_ok(digits)


def _mask_digits(text: str, positions: list[int]) -> str:
    """``text`` with the digits at ``positions`` (a card number's, in order) masked to first 6 + last 4."""
    chars = list(text)
    for index in positions[6:-4]:
        chars[index] = "*"
    return "".join(chars)


def _mask_match(match: re.Match[str]) -> str:
    found = match.group()
    digits = found.replace(" ", "").replace("-", "")
    if not _is_card_number(digits):
        return found
    return _mask_digits(found, [index for index, char in enumerate(found) if char.isdigit()])


def mask_text(text: str) -> str:
    """``text`` with every Luhn-valid card number in it (13-19 digits, together or in groups) masked."""
    return _CARD_IN_TEXT.sub(_mask_match, text) if len(text) >= 13 else text


def _clean(value: Any, kind: int = _PLAIN) -> Any:
    """``value`` as it may be written: masked, JSON-safe."""
    if kind == _SECRET and value is not None:
        return REDACTED
    if isinstance(value, _NATIVE) and not (kind == _PAN and isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, Mapping):
        return _clean_mapping(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(item, kind) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Enum):
        value = value.value
    text = value if isinstance(value, str) else f"{type(value).__name__}: {value}" if isinstance(
        value, BaseException) else str(value)  # fmt: skip
    if kind == _PAN:
        return _DIGIT_RUN.sub(lambda match: mask_pan(match.group()) or "", text)
    return mask_text(text)


def _clean_mapping(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    cleaned = {
        (mask_text(key) if isinstance(key, str) else key if isinstance(key, int) else mask_text(str(key))):
            _clean(value, _kind(key))
        for key, value in mapping.items()
    }
    _mask_split_numbers(cleaned)
    return cleaned


def _mask_split_numbers(values: dict[Any, Any]) -> None:
    """Mask a card number whose digits are spread over neighbouring text values (see the module
    docstring): two or three of them, read together in either order, padding and all. Anything but
    text between them ends the neighbourhood; only numbers that cross from one value into the next
    are looked for here (each value's own are masked already), so only where digits meet."""
    keys = list(values)
    # per value: whether it ends with a digit and whether it begins with one (past padding); None: not text
    edges = [_edges(values[key]) for key in keys]
    for n in range(len(keys) - 1):
        first, second = edges[n], edges[n + 1]
        if first is None or second is None:
            continue
        third = edges[n + 2] if n + 2 < len(keys) else None
        if first[0] and second[1]:  # in order: ... 1234 | 5678 ...
            _mask_across(values, keys[n:n + 2])
            if third is not None and second[0] and third[1]:
                _mask_across(values, keys[n:n + 3])
        if second[0] and first[1]:  # in reverse order
            _mask_across(values, [keys[n + 1], keys[n]])
            if third is not None and third[0] and second[1]:
                _mask_across(values, [keys[n + 2], keys[n + 1], keys[n]])


def _edges(value: Any) -> tuple[bool, bool] | None:
    if not isinstance(value, str):
        return None
    end, begin = value.rstrip(" -")[-1:], value.lstrip(" -")[:1]
    return end in _ASCII_DIGITS and end != "", begin in _ASCII_DIGITS and begin != ""


def _mask_across(values: dict[Any, Any], keys: list[Any]) -> None:
    """Mask the card numbers of ``values[key]`` for ``keys`` read as one text that cross a boundary."""
    joined = "".join(values[key] for key in keys)
    owner: list[tuple[Any, int]] = [(key, index) for key in keys for index in range(len(values[key]))]
    for match in _CARD_IN_TEXT.finditer(joined):
        first, last = owner[match.start()][0], owner[match.end() - 1][0]
        digits = match.group().replace(" ", "").replace("-", "")
        if first == last or digits[0] == "0" or not _is_card_number(digits):  # no card number starts with 0
            continue
        positions = [n for n in range(match.start(), match.end()) if joined[n] in _ASCII_DIGITS]
        hidden = set(positions[6:-4])
        for key in {owner[n][0] for n in hidden}:
            chars = list(values[key])
            for n in hidden:
                if owner[n][0] == key:
                    chars[owner[n][1]] = "*"
            values[key] = "".join(chars)


def _quiet(mapping: Mapping[Any, Any]) -> bool:
    """Whether :func:`_clean_mapping` would give ``mapping`` back unchanged, told cheaply (most lines):
    plain keys holding None, numbers or text, PAN keys holding text without a run of 7 digits (masked
    already), and no 13 digits, spaces or dashes in a row in a key, in a value, or across neighbouring
    values in either order (the texts joined in order, then in reverse, hold every such neighbourhood)."""
    texts: list[str] = []
    for key, value in mapping.items():
        if type(key) is not str or (len(key) >= 13 and _CARD_CHARS.search(key)):
            return False
        kind = _kind(key)
        if type(value) is str:
            if kind == _SECRET or (kind == _PAN and _DIGIT_RUN.search(value)):
                return False
            texts.append(value)
        elif value is None or (kind == _PLAIN and type(value) in (int, float, bool)):
            texts.append(_NOT_TEXT)
        else:
            return False
    return not _CARD_CHARS.search("".join(texts)) and not _CARD_CHARS.search("".join(reversed(texts)))


def mask_card_data(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: what :func:`_clean_mapping` makes of the event (see the module docstring)."""
    return event_dict if _quiet(event_dict) else _clean_mapping(event_dict)
