"""One TCP connection to a host: send framed requests, match responses by MTI class and STAN.

A reader task decodes every frame; a response wakes the request waiting for it (key: response MTI
class + DE11). Responses nobody waits for any more (late answers to timed-out requests) go to
``on_late`` instead of being dropped silently. When the connection dies, every waiting request
fails with :class:`ConnectionLost`. Pending entries are always removed in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from .codec import IsoMessage, MessageDecodeError, decode_message, encode_message
from .errors import ConnectionFailed, ConnectionLost, ResponseTimeout, TransportError
from .framing import FrameDecoder, FramingError, frame
from .profile import WireProfile

__all__ = [
    "Connection",
    "ConnectionFailed",
    "ConnectionLost",
    "ResponseTimeout",
    "TransportError",
]

_READ_CHUNK = 65536


def _request_key(mti: str, stan: str | None) -> tuple[str, str | None]:
    # 0200/0201 -> "021"; the response's class is its first three digits.
    return (f"{mti[:2]}{int(mti[2]) + 1}", stan)


class Connection:
    """Use :meth:`open`; then :meth:`request` any number of times; then :meth:`close`."""

    def __init__(
        self,
        profile: WireProfile,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_late: Callable[[IsoMessage], None] | None = None,
        tpdu: bytes | None = None,
    ) -> None:
        self.profile = profile
        self.tpdu = tpdu  # None: the profile's
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(profile.framing)
        self._pending: dict[tuple[str, str | None], asyncio.Future[IsoMessage]] = {}
        self._on_late = on_late
        self._closed_reason: str | None = None
        self._reader_task = asyncio.create_task(self._read_loop(), name="terminal-reader")

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        profile: WireProfile,
        *,
        connect_timeout: float = 10.0,
        on_late: Callable[[IsoMessage], None] | None = None,
        tpdu: bytes | None = None,
    ) -> Connection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
        except TimeoutError:
            raise ConnectionFailed(f"connecting to {host}:{port} timed out after {connect_timeout:g}s") from None
        except OSError as exc:  # asyncio's strerror repeats the address: the system's words are enough
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc) or type(exc).__name__
            raise ConnectionFailed(f"cannot connect to {host}:{port}: {reason}") from None
        return cls(profile, reader, writer, on_late, tpdu)

    @property
    def is_open(self) -> bool:
        return self._closed_reason is None

    def encode(self, message: IsoMessage) -> bytes:
        return frame(encode_message(self.profile, message), self.profile.framing, self.tpdu)

    async def request(
        self, message: IsoMessage, response_timeout: float, data: bytes | None = None
    ) -> IsoMessage:
        """Send ``message`` (or its pre-encoded frame ``data``) and wait for the matching answer."""
        if self._closed_reason is not None:
            raise ConnectionLost(self._closed_reason)
        key = _request_key(message.mti, message.stan)
        if key in self._pending:
            raise RuntimeError(f"a request with STAN {message.stan} is already waiting")
        future: asyncio.Future[IsoMessage] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            try:
                self._writer.write(data if data is not None else self.encode(message))
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise ConnectionLost(f"send failed: {exc.strerror or type(exc).__name__}") from None
            try:
                return await asyncio.wait_for(future, response_timeout)
            except TimeoutError:
                raise ResponseTimeout(
                    f"no answer to {message.mti} STAN {message.stan} within {response_timeout:g}s"
                ) from None
        finally:
            self._pending.pop(key, None)
            if not future.done():
                future.cancel()

    async def send_only(self, data: bytes) -> None:
        """Write bytes without waiting for an answer (retransmission tests, raw frames)."""
        if self._closed_reason is not None:
            raise ConnectionLost(self._closed_reason)
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"send failed: {exc.strerror or type(exc).__name__}") from None

    async def close(self) -> None:
        self._fail_all("connection closed")
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)

    async def _read_loop(self) -> None:
        reason = "connection closed by the host"
        try:
            while True:
                chunk = await self._reader.read(_READ_CHUNK)
                if not chunk:
                    break
                for body in self._decoder.feed(chunk):
                    self._dispatch(decode_message(self.profile, body))
        except (FramingError, MessageDecodeError) as exc:
            reason = f"host sent an invalid frame ({exc})"
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc.strerror or type(exc).__name__}"
        finally:
            self._fail_all(reason)

    def _dispatch(self, response: IsoMessage) -> None:
        key = (response.mti[:3], response.stan)
        future = self._pending.get(key)
        if future is None and response.stan is None and len(self._pending) == 1:
            future = next(iter(self._pending.values()))
        if future is not None and not future.done():
            future.set_result(response)
        elif self._on_late is not None:
            self._on_late(response)

    def _fail_all(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
