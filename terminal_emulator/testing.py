"""A small scriptable ISO 8583 host for tests (the emulator's and integrators' own).

It listens on 127.0.0.1 (port 0 by default), decodes each frame with the profile, records what it
received (messages and raw frames), and answers with whatever ``handler`` returns: an
:class:`IsoMessage`, or ``None`` to swallow the request (no answer, as a lost response).

The default handler approves everything: MTI + 10, the request's fields echoed (PAN and track data
removed), DE37 a running RRN, DE38 an approval code, DE39 ``00``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from .codec import IsoMessage, decode_message, encode_message
from .framing import FrameDecoder, frame
from .messages import response_mti
from .profile import WireProfile

__all__ = ["Handler", "Received", "StubHost", "approve"]

Handler = Callable[[IsoMessage], "IsoMessage | None"]

_NOT_ECHOED = frozenset({2, 14, 35, 36, 45, 52, 55})


def approve(request: IsoMessage, rrn: str, approval_code: str = "A1B2C3", code: str = "00") -> IsoMessage:
    """The answer a plain host gives: echo (without card data), DE37, DE38 when approved, DE39."""
    fields = {k: v for k, v in request.fields.items() if k not in _NOT_ECHOED}
    if request.mti[1] in "12":
        fields[37] = rrn
        if code == "00":
            fields[38] = approval_code
    fields[39] = code
    return IsoMessage(mti=response_mti(request.mti), fields=dict(sorted(fields.items())))


@dataclass(frozen=True, slots=True)
class Received:
    message: IsoMessage
    frame: bytes = field(repr=False)


class StubHost:
    """``async with StubHost(profile) as host: ...`` then connect to ``host.port``."""

    def __init__(self, profile: WireProfile, handler: Handler | None = None) -> None:
        self.profile = profile
        self.handler: Handler = handler or self.approve_all
        self.received: list[Received] = []
        self.connections = 0
        #: Every byte received, one buffer per connection, exactly as it came off the socket.
        self.streams: list[bytearray] = []
        self._rrns = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Event()
        self._hang_up = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("host not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def messages(self) -> list[IsoMessage]:
        return [r.message for r in self.received]

    @property
    def mtis(self) -> list[str]:
        return [r.message.mti for r in self.received]

    async def __aenter__(self) -> StubHost:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()  # the connection's reader sees EOF and its task ends on its own
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[IsoMessage]:  # noqa: ASYNC109
        """Wait until at least ``count`` messages arrived (raises ``TimeoutError`` otherwise)."""
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.messages

    def approve_all(self, request: IsoMessage) -> IsoMessage | None:
        """The default handler: approve with the next RRN (usable from custom handlers)."""
        return approve(request, rrn=f"{next(self._rrns):012d}")

    def hang_up_next(self) -> None:
        """Close the connection instead of answering the next request."""
        self._hang_up = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.connections += 1
        self._writers.add(writer)
        stream = bytearray()
        self.streams.append(stream)
        decoder = FrameDecoder(self.profile.framing)
        try:
            while chunk := await reader.read(65536):
                stream += chunk
                for body in decoder.feed(chunk):
                    message = decode_message(self.profile, body)
                    self.received.append(Received(message, frame(body, self.profile.framing)))
                    self._arrived.set()
                    if self._hang_up:
                        self._hang_up = False
                        return
                    answer = self.handler(message)
                    if answer is not None:
                        writer.write(frame(encode_message(self.profile, answer), self.profile.framing))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
