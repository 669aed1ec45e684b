"""The asyncio TCP server: connections, framing and concurrency around the service.

Each connection feeds a :class:`~gateway.protocol.framing.FrameBuffer`; every complete frame goes to
the service at once (no task per frame: the service calls back when the ledger has committed), so
several requests per connection are in flight and their answers go back in the order they finish
(terminals match them by STAN). Answers finished together leave in one write. A framing error, or a
frame that is not a readable request, closes that connection only. Idle connections are closed by a
sweeper; over the connection limit a new connection is closed at once. Shutdown stops accepting,
lets in-flight requests finish, then closes the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from gateway.protocol.framing import Frame, FrameBuffer, FramingError, encode_frame, reply_tpdu
from gateway.protocol.profile import Framing
from gateway.service import FrameRejectedError


class Service(Protocol):
    def handle_nowait(
        self, payload: bytes, reply: Callable[[bytes | None], None], fail: Callable[[BaseException], None]
    ) -> None: ...

#: stop reading from a connection while this many of its requests are in flight
_MAX_IN_FLIGHT = 128


class ConnectionRecorder(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def frame_rejected(self, reason: str) -> None: ...


class _Connection(asyncio.Protocol):
    def __init__(self, server: TerminalServer, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.buffer = FrameBuffer(server.framing)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.last_activity = time.monotonic()
        #: requests of this connection not answered yet
        self.pending = 0
        self.closing = False
        self.paused = False
        self.frames = 0
        #: answers finished in this loop iteration, written together by one flush
        self.outgoing: list[bytes] = []

    # asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        server = self.server
        if len(server.connections) >= server.max_connections or server.stopping:
            server.log_event("connection.refused", peer=self.peer, reason="connection limit")
            self.transport.abort()
            return
        server.connections.add(self)
        if server.recorder is not None:
            server.recorder.connection_opened()
        server.log_event("connection.opened", conn=self.id, peer=self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = time.monotonic()
        try:
            frames = self.buffer.feed(data)
        except FramingError as exc:
            for frame in exc.frames:
                self._dispatch(frame)
            self._reject(exc.reason, label="framing")
            return
        for frame in frames:
            self._dispatch(frame)

    def eof_received(self) -> bool | None:
        # half-close: finish what is in flight, then close
        self.closing = True
        if not self.pending and not self.outgoing and self.transport is not None:
            self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        if self in server.connections:
            server.connections.discard(self)
            if server.recorder is not None:
                server.recorder.connection_closed()
            server.log_event("connection.closed", conn=self.id, peer=self.peer, frames=self.frames)
        self.closing = True
        self.transport = None

    # frames ---------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        self.frames += 1
        self.pending += 1
        self.server.in_flight += 1
        if self.pending >= _MAX_IN_FLIGHT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        try:
            self.server.service.handle_nowait(frame.payload, lambda data: self._reply(frame, data), self._fail)
        except FrameRejectedError as exc:
            self._finished()
            self._reject(f"unreadable message: {exc}", label="unreadable")
        except Exception as exc:  # the per-request boundary: log, close this connection only
            self._finished()
            self._crashed(exc)

    def _fail(self, exc: BaseException) -> None:
        self._finished()
        self._crashed(exc)

    def _crashed(self, exc: BaseException) -> None:
        self.server.log_event("request.crashed", level="error", conn=self.id, error=type(exc).__name__)
        self._reject("internal error", label="internal_error")

    def _finished(self) -> None:
        self.pending -= 1
        self.server.request_finished()
        if self.paused and self.pending < _MAX_IN_FLIGHT // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        if self.closing and not self.pending and self.transport is not None and not self.outgoing:
            self.transport.close()

    def _reply(self, frame: Frame, response: bytes | None) -> None:
        transport = self.transport
        if response is not None and transport is not None and not transport.is_closing():
            tpdu = reply_tpdu(frame.tpdu) if frame.tpdu is not None else None
            if not self.outgoing:
                # answers completed by the same group commit leave in one write (one syscall)
                asyncio.get_running_loop().call_soon(self._flush)
            self.outgoing.append(encode_frame(self.server.framing, response, tpdu))
        self._finished()

    def _flush(self) -> None:
        transport = self.transport
        data, self.outgoing = self.outgoing, []
        if transport is None or transport.is_closing() or not data:
            return
        transport.write(b"".join(data) if len(data) > 1 else data[0])
        self.last_activity = time.monotonic()
        if self.closing and not self.pending:
            transport.close()

    def _reject(self, reason: str, *, label: str) -> None:
        server = self.server
        server.log_event("connection.rejected", level="warning", conn=self.id, peer=self.peer, reason=reason)
        if server.recorder is not None:
            server.recorder.frame_rejected(label)
        self.closing = True
        if self.transport is not None:
            # answers already in flight for earlier frames are dropped with the connection
            self.transport.close()


class TerminalServer:
    """Listens for terminals. ``start()``, then ``stop()`` for a clean shutdown."""

    def __init__(
        self,
        service: Service,
        framing: Framing,
        *,
        host: str = "127.0.0.1",
        port: int = 8583,
        idle_timeout_s: float = 300.0,
        max_connections: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
        logger: Any = None,
        recorder: ConnectionRecorder | None = None,
    ) -> None:
        self.service = service
        self.framing = framing
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self.log = logger
        self.recorder = recorder
        self.connections: set[_Connection] = set()
        #: requests received and not answered yet, over all connections
        self.in_flight = 0
        self._all_answered: asyncio.Event | None = None
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)

    @property
    def bound_port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._all_answered is not None:
            self._all_answered.set()

    def log_event(self, event: str, level: str = "info", **fields: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **fields)

    async def start(self, *, serve: bool = True) -> None:
        """Listen (a taken address raises ``OSError`` here) and accept terminals, or with
        ``serve=False`` only once :meth:`serve` is called (the gateway binds first, starts the rest,
        then accepts)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self, next(self._ids)),
            self.host,
            self.port,
            ssl=self.ssl_context,
            reuse_address=True,
            backlog=1024,
            start_serving=serve,
        )
        self._sweeper = loop.create_task(self._sweep())

    async def serve(self) -> None:
        """Start accepting terminals (after ``start(serve=False)``)."""
        assert self._server is not None
        await self._server.start_serving()

    async def _sweep(self) -> None:
        interval = min(1.0, self.idle_timeout_s / 2)
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - self.idle_timeout_s
            for conn in list(self.connections):
                if conn.last_activity < deadline and not conn.pending and conn.transport is not None:
                    self.log_event("connection.idle_timeout", conn=conn.id, peer=conn.peer)
                    conn.closing = True
                    conn.transport.close()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests (up to ``grace_s``), close every connection."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for conn in list(self.connections):
            conn.closing = True
            if conn.transport is not None:
                conn.transport.pause_reading()
        if self.in_flight:
            self._all_answered = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._all_answered.wait()
            await asyncio.sleep(0)  # let the last answers' flush run
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
