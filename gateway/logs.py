"""Structured logging: structlog's processors, plus one of ours that keeps card data out of every line.

Every line, the gateway's own and the standard-library records of the libraries it uses (asyncio,
aiomqtt, amqtt), goes through one pipeline: context variables merged in, the logger's name, the
exception rendered to text, level, timestamp (UTC, ``Z``), the card-data masking of
:mod:`gateway.masking`, then orjson (JSON lines, when the stream is not a terminal) or structlog's
console renderer (on one).

The request line, one per request, is an ordinary ``logger.info("message.processed", ...)`` call; its
keys are ordered so that no two values of the gateway's own numbers (STAN, RRN, codes) are neighbours,
which would otherwise read as one long number. Importing this module configures nothing.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import weakref
from typing import IO, Any, BinaryIO, Final, Literal, TextIO, cast

import orjson
import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, clear_contextvars
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from gateway.masking import mask_card_data, mask_text

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
_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

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
        return orjson.dumps(event_dict, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # e.g. a lone surrogate, which orjson refuses: a log call must never raise
        return json.dumps(event_dict, default=str, ensure_ascii=True).encode()


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
        factory = structlog.BytesLoggerFactory(file=binary)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(min_level)


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
