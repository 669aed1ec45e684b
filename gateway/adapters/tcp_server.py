"""The terminal listener: accepts connections (plain TCP or TLS), admits them under the connection
limits, runs the sweeper (idle, frame, handshake and write deadlines) and stops cleanly.

Each accepted connection is a :class:`gateway.adapters.tcp._Connection` (framing, back-pressure and
answers, per connection); what a hostile client can cost is described in :mod:`gateway.adapters.tcp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from gateway.adapters.tcp import (
    ConnectionRecorder,
    Limits,
    Service,
    _Connection,
    _kernel_stall,
)
from gateway.protocol.profile import Framing


class TerminalServer:
    """Listens for terminals. ``start()``, then ``stop()`` for a clean shutdown."""

    def __init__(
        self,
        service: Service,
        framing: Framing,
        *,
        host: str = "127.0.0.1",
        port: int = 8583,
        limits: Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        certificate_terminals: Callable[[dict[str, Any]], frozenset[str]] | None = None,
        logger: Any = None,
        recorder: ConnectionRecorder | None = None,
    ) -> None:
        self.service = service
        self.framing = framing
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self.ssl_context = ssl_context
        self._certificate_terminals = certificate_terminals
        self.log = logger
        self.recorder = recorder
        #: every connection from TCP accept on, TLS handshakes in progress included, oldest first
        self.connections: dict[_Connection, None] = {}
        self.per_address: Counter[str] = Counter()
        #: connections that have not proven themselves yet (some may have since: see ``admit``), oldest first
        self.unproven: dict[_Connection, None] = {}
        #: connections not read because the server as a whole has too many requests in flight
        self.throttled: set[_Connection] = set()
        #: requests received and not answered yet, over all connections
        self.in_flight = 0
        self._all_answered: asyncio.Event | None = None
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    @property
    def bound_port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    # admission ------------------------------------------------------------------

    def admit(self, conn: _Connection) -> str | None:
        """Take ``conn`` in, or say why not. A full pool of unproven connections makes room by
        closing its oldest member: a real terminal proves itself with its first request, a flood
        of connections that never do only pushes its own out."""
        limits = self.limits
        if self.stopping:
            return "shutting down"
        if self.per_address[conn.address] >= limits.per_address:
            return "connections per address"
        unproven = self.unproven
        if len(unproven) >= limits.max_connections - limits.reserved or len(self.connections) >= limits.max_connections:
            # drop those that proved themselves since they came (amortised: only when the pool looks full)
            self.unproven = unproven = {c: None for c in unproven if not c.peer.proven}
        if len(unproven) >= limits.max_connections - limits.reserved or len(self.connections) >= limits.max_connections:
            if not unproven:
                return "connection limit"
            oldest = next(iter(unproven))
            oldest.drop("connection.evicted", reason="room for a new connection; it never sent an accepted request")
            self.forget(oldest)
        self.connections[conn] = None
        unproven[conn] = None
        self.per_address[conn.address] += 1
        if self.recorder is not None:
            self.recorder.connection_opened()
        return None

    def forget(self, conn: _Connection) -> None:
        if conn not in self.connections:
            return
        del self.connections[conn]
        self.unproven.pop(conn, None)
        self.throttled.discard(conn)
        self.per_address[conn.address] -= 1
        if self.per_address[conn.address] <= 0:
            del self.per_address[conn.address]
        if self.recorder is not None:
            self.recorder.connection_closed()
        self.log_event("connection.closed", conn=conn.id, peer=conn.peer.address, frames=conn.frames)

    def start_tls(self, conn: _Connection) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: _Connection) -> None:
        plain, context = conn.transport, self.ssl_context
        assert plain is not None and context is not None
        try:
            secure = await asyncio.get_running_loop().start_tls(
                plain, conn, context, server_side=True, ssl_handshake_timeout=self.limits.handshake_timeout_s
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            conn.drop("connection.tls_failed", reason=type(exc).__name__)
            self.forget(conn)
            return
        if secure is None:  # the connection went away during the handshake
            self.forget(conn)
            return
        conn.tls_ready(secure, secure.get_extra_info("peercert") or None)

    def terminals_of(self, certificate: dict[str, Any]) -> frozenset[str]:
        """The terminals a verified client certificate may act as (see ``certificate_terminals``)."""
        return self._certificate_terminals(certificate) if self._certificate_terminals else frozenset({"*"})

    # requests -------------------------------------------------------------------

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.throttled and self.in_flight < self.limits.in_flight_total // 2:
            for conn in list(self.throttled):
                conn.update_reading()
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
        """Close connections past a deadline: idle, a frame not completed, answers not taken."""
        limits = self.limits
        interval = min(1.0, limits.idle_timeout_s / 2, limits.frame_timeout_s / 2, limits.write_timeout_s / 2)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            frame_s = limits.frame_timeout_s
            for conn in list(self.connections):
                if conn.closing and conn.transport is None:
                    continue
                if conn.lingering is not None:
                    conn.linger_check(now)
                    continue
                conn.confirm_delivered()
                stalled = conn.write_blocked or conn.unacked_since or _kernel_stall(conn, now, interval)
                if stalled is not None and now - stalled > limits.write_timeout_s:
                    conn.drop("connection.write_timeout", reset=True, unsent=len(conn.outgoing))
                elif conn.frame_started is not None and conn.reading and now > conn.frame_started + frame_s:
                    conn.drop("connection.frame_timeout")
                elif not conn.pending and now - conn.last_activity > limits.idle_timeout_s:
                    conn.drop("connection.idle_timeout")

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
            conn.update_reading()
        if self.in_flight:
            self._all_answered = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._all_answered.wait()
            await asyncio.sleep(0)  # let the last answers' flush run
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):  # the terminals' TCP acknowledges the last answers
                while any(conn.to_confirm for conn in self.connections):
                    for conn in list(self.connections):
                        conn.confirm_delivered()
                    await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self._handshakes):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
