"""Structured logging: structlog's processors, plus one of ours that keeps card data out of every line.

Every line, the gateway's own and the standard-library records of the libraries it uses (asyncio,
aiomqtt, amqtt), goes through one pipeline: context variables merged in, the logger's name, the
exception rendered to text, level, timestamp (UTC, ``Z``), :func:`mask_card_data`, then orjson (JSON
lines, when the stream is not a terminal) or structlog's console renderer (on one).

:func:`mask_card_data` (PCI DSS minded, design section 7), on every value, nested ones included:

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

The request line, one per request, is an ordinary ``logger.info("message.processed", ...)`` call; its
keys are ordered so that no two values of the gateway's own numbers (STAN, RRN, codes) are neighbours,
which would otherwise read as one long number. Importing this module configures nothing.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import re
import sys
import threading
import weakref
from collections.abc import Mapping
from datetime import date, datetime, time
from enum import Enum
from typing import IO, Any, BinaryIO, Final, Literal, TextIO, cast

import orjson
import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, clear_contextvars
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from gateway.core.cards import luhn_checksum_ok, mask_pan

__all__ = [
    "LogFormat",
    "bind_contextvars",
    "bound_contextvars",
    "clear_contextvars",
    "configure_logging",
    "flush_logs",
    "get_logger",
    "mask_card_data",
    "mask_text",
    "reset_logging",
]

LogFormat = Literal["auto", "json", "console"]
REDACTED: Final = "[redacted]"
_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# --- card data ------------------------------------------------------------------------------------

#: a card number as written in text: 13-19 digits, together or in groups of 3 to 6 joined by one space
#: or dash (a longer run is not a card number, e.g. DE90's 42 digits)
_CARD_IN_TEXT: Final = re.compile(r"(?<![0-9])(?:[0-9]{13,19}|[0-9]{3,6}(?:[ -][0-9]{3,6}){2,5})(?![0-9])")
_DIGIT_RUN: Final = re.compile(r"[0-9]{7,}")
_ASCII_DIGITS: Final = frozenset("0123456789")

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


def mask_card_data(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: what :func:`_clean_mapping` makes of the event (see the module docstring)."""
    return _clean_mapping(event_dict)


# --- output ---------------------------------------------------------------------------------------


class _CoalescingStream:
    """A byte stream whose lines, written on an event loop's thread, leave together once the loop's
    current iteration ends: one ``write`` per burst, not one system call per request. Lines written
    where no loop runs (start-up, other threads) go out at once, after the pending ones."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        #: the loop whose next iteration drains the pending lines (a loop may stop before it does)
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        _COALESCING.add(self)

    def write(self, data: bytes) -> int:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(data)
            if loop is None:
                self._drain()
            elif self._scheduled_on is not loop:
                self._scheduled_on = loop
                loop.call_soon(self.drain)
        return len(data)

    def flush(self) -> None:
        """structlog flushes after each line: the drain does, once per loop iteration."""

    def drain(self) -> None:
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        self._scheduled_on = None
        data, self._pending = b"".join(self._pending), []
        if data:
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: logging must never raise
                pass


_COALESCING: weakref.WeakSet[_CoalescingStream] = weakref.WeakSet()


def flush_logs() -> None:
    """Write out every line still waiting in a coalescing stream."""
    for stream in list(_COALESCING):
        stream.drain()


atexit.register(flush_logs)


def _dumps(event_dict: Any, **kw: Any) -> bytes:
    try:
        return orjson.dumps(event_dict, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # e.g. a lone surrogate, which orjson refuses: a log call must never raise
        return (json.dumps(event_dict, default=str, ensure_ascii=True) + "\n").encode()


class _JsonLines:
    """A bytes logger for one JSON line per call (``orjson`` ends it with its newline)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def msg(self, line: bytes) -> None:
        with self._lock:
            self._stream.write(line)
            self._stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _logger_key(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # ``logger`` cannot be a structlog initial value (it names wrap_logger's argument)
    if "logger_name" in event_dict:
        event_dict["logger"] = event_dict.pop("logger_name")
    return event_dict


class _StdlibBridge(logging.Handler):
    """Standard-library records (asyncio, aiomqtt, amqtt) through the same pipeline and stream."""

    def __init__(self, logger: Any) -> None:
        super().__init__()
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            extra: dict[str, Any] = {"logger_name": record.name}
            if record.exc_info:
                extra["exc_info"] = record.exc_info
            self._logger.log(record.levelno, record.getMessage(), **extra)
        except Exception:
            self.handleError(record)


def configure_logging(level: str = "info", fmt: LogFormat = "auto", stream: IO[Any] | None = None, *,
                      coalesce: bool = False) -> None:  # fmt: skip
    """Configure structlog and route standard-library logging through it.

    ``fmt``: ``json`` (orjson lines), ``console`` (readable) or ``auto`` (console on a terminal, JSON
    elsewhere). ``stream``: default ``sys.stdout``, text or binary. ``coalesce``: JSON lines of one
    event-loop iteration leave in one write (the server sets it). May be called again (tests do).
    """
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected debug, info, warning or error")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected auto, json or console")
    min_level = _LEVELS[level.lower()]
    flush_logs()
    out = sys.stdout if stream is None else stream
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _logger_key,
        structlog.processors.format_exc_info,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_card_data,
    ]
    if fmt == "console" or (fmt == "auto" and is_tty):
        processors.append(structlog.dev.ConsoleRenderer(colors=is_tty, sort_keys=False))
        factory: Any = structlog.WriteLoggerFactory(file=_text_stream(out))
    else:
        binary = _binary_stream(out)
        if coalesce:
            binary = cast(BinaryIO, _CoalescingStream(binary))
        processors.append(structlog.processors.JSONRenderer(serializer=_dumps))
        factory = _fixed(_JsonLines(binary))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(min_level)


def _fixed(logger: _JsonLines) -> Any:
    return lambda *args: logger


def _binary_stream(stream: IO[Any]) -> BinaryIO:
    """The byte stream under ``stream`` (a text stream's buffer), or a UTF-8 writer onto a text one."""
    if "b" in getattr(stream, "mode", "") or not hasattr(stream, "encoding"):
        return cast(BinaryIO, stream)
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()  # whatever was printed before keeps its place
        return cast(BinaryIO, buffer)
    return cast(BinaryIO, _Utf8Bytes(cast(TextIO, stream)))


class _Utf8Bytes:
    """Bytes written onto a text stream (an ``io.StringIO`` in tests)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return self._stream.write(data.decode())

    def flush(self) -> None:
        self._stream.flush()


class _Utf8Text:
    """Text onto a byte stream, without owning it (``io.TextIOWrapper`` would close it when collected)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(text.encode())

    def flush(self) -> None:
        self._stream.flush()


def _text_stream(stream: IO[Any]) -> TextIO:
    if "b" in getattr(stream, "mode", "") or not hasattr(stream, "encoding"):
        return cast(TextIO, _Utf8Text(cast(BinaryIO, stream)))
    return cast(TextIO, stream)


def _route_stdlib_logging(min_level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(_StdlibBridge(structlog.get_logger("stdlib")))
    root.setLevel(min_level)
    # chatty libraries speak at INFO about every connection; keep them to warnings unless debugging
    for name in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.DEBUG if min_level <= logging.DEBUG else logging.WARNING,
                                             min_level))  # fmt: skip


def reset_logging() -> None:
    """Undo :func:`configure_logging` (tests)."""
    flush_logs()
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger whose lines carry ``logger=name`` (safe at import time: it takes the
    configuration of its first use)."""
    return cast(FilteringBoundLogger, structlog.get_logger(name, logger_name=name))
