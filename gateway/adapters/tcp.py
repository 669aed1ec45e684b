"""The asyncio TCP server: connections, framing, limits and back-pressure around the service.

Each connection feeds a :class:`~gateway.protocol.framing.FrameBuffer`; complete frames go to the
service at once (no task per frame: the service calls back when the ledger has committed), so several
requests per connection are in flight and their answers go back in the order they finish (terminals
match them by STAN). Answers finished together leave in one write.

What a hostile or broken client can cost is bounded (docs/operations.md, "Limits"):

- a frame that cannot be framed or read stops that connection's reading at once: nothing read after
  it is decided; the answers of requests already being decided are still written, then it closes;
- reading stops while a connection has too many requests in flight, while more than
  ``limits.unsent_bytes`` of its answers are written but not acknowledged by the client's TCP (the
  client does not read: the kernel's buffers would hold megabytes of answers, booked but not
  delivered), or while the whole server has too many requests in flight; a client that takes none
  of its answers for ``limits.write_timeout_s`` is closed;
- a frame must be complete ``limits.frame_timeout_s`` after its first byte, a TLS handshake within
  ``limits.handshake_timeout_s`` (handshakes count as connections), and a connection without a
  complete frame for ``idle_timeout_s`` is closed (bytes alone do not keep it open);
- connections per source address are capped, and ``limits.reserved`` of the slots are kept for
  *proven* connections (a verified client certificate, or a request the service accepted from an
  allowed terminal): when the unproven ones fill the rest, the oldest unproven one makes room.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from gateway.protocol.framing import FrameBuffer, FramingError, encode_frame, reply_tpdu
from gateway.service import FrameRejectedError, Peer

if TYPE_CHECKING:
    from gateway.adapters.tcp_server import TerminalServer


class Service(Protocol):
    def handle_nowait(
        self,
        payload: bytes,
        reply: Callable[[bytes | None, Callable[[], None] | None], None],
        fail: Callable[[BaseException], None],
        peer: Peer | None = None,
    ) -> None: ...


#: bytes received but not yet decided past which a connection is not read (about two frames' worth)
_BUFFERED_BYTES = 16 * 1024
#: how soon after an answer is written its acknowledgement is looked for (then 5 times later, then each sweep)
_CONFIRM_AFTER_S = 0.05
#: a connection that is done waits this long at most for its client to take the last answers and close:
#: closing while the client still sends would reset the connection, and a reset throws away the answers
#: waiting in the client's buffers (the longest is GATEWAY_LIMITS__WRITE_TIMEOUT_S, for a client that
#: takes none of them)
_LINGER_S = 2.0
#: frames of one connection decided per loop iteration at most, so that one busy client cannot make
#: every other connection wait for its whole burst
_BATCH = 32


class ConnectionRecorder(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def frame_rejected(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection, and all of them, may hold (defaults: docs/configuration.md)."""

    max_connections: int = 1000
    #: slots only proven connections may take (see the module docstring)
    reserved: int = 100
    per_address: int = 250
    idle_timeout_s: float = 300.0
    frame_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    write_timeout_s: float = 30.0
    #: requests in flight on one connection before it is no longer read
    in_flight: int = 128
    #: requests in flight on the whole server before connections are no longer read
    in_flight_total: int = 4096
    #: answers written but not yet acknowledged by the client's TCP, per connection, before it is no
    #: longer read
    unsent_bytes: int = 64 * 1024


class _Connection(asyncio.Protocol):
    def __init__(self, server: TerminalServer, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.buffer = FrameBuffer(server.framing)
        self.transport: asyncio.Transport | None = None
        self.peer = Peer("?")
        self.address = "?"
        self.opened = time.monotonic()
        #: the last complete frame received or answer written (idle timeout)
        self.last_activity = self.opened
        #: when the frame being received began (its deadline), None between frames
        self.frame_started: float | None = None
        #: since when the transport has held more unsent answers than allowed (pause_writing), None while not
        self.write_blocked: float | None = None
        #: since when the client's TCP has left more of the written answers unacknowledged than allowed,
        #: None while not: the kernel's buffers hold megabytes, and answers in them are not delivered
        self.unacked_since: float | None = None
        #: answers the kernel still holds for the client at the last sweep, and since when they have
        #: not shrunk while nothing more was written (a client that stopped reading; see _kernel_stall)
        self.kernel_unsent = 0
        self.stalled_since: float | None = None
        self.last_write = self.opened
        self.handshaking = False
        #: a call to take frames that waited for room is scheduled
        self.more_scheduled = False
        #: requests of this connection not answered yet
        self.pending = 0
        #: no more frames are taken; the connection closes once its pending answers are written
        self.closing = False
        #: the client half-closed: the frames it sent before are still decided and answered
        self.eof = False
        #: since when every answer is written and the connection waits for its client to take them and
        #: close (what it still sends is read and dropped); None before
        self.lingering: float | None = None
        self.reading = True
        self.frames = 0
        #: answers finished in this loop iteration, written together by one flush
        self.outgoing: list[bytes] = []
        #: bytes written so far, and up to which the client's TCP acknowledged them when last looked
        self.written = self.acknowledged = 0
        #: the answers not yet acknowledged: (their last byte's offset, whom to tell)
        self.to_confirm: collections.deque[tuple[int, Callable[[], None]]] = collections.deque()
        self.confirm_timer: asyncio.TimerHandle | None = None

    # asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self.peer = Peer(f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer))
        limits = self.server.limits
        self.transport.set_write_buffer_limits(high=limits.unsent_bytes, low=limits.unsent_bytes // 4)
        refusal = self.server.admit(self)
        if refusal is not None:
            self.server.log_event("connection.refused", peer=self.peer.address, reason=refusal)
            self.transport.abort()
            self.transport = None
            return
        self.server.log_event("connection.opened", conn=self.id, peer=self.peer.address)
        if self.server.ssl_context is not None:
            self.handshaking = True
            self.transport.pause_reading()  # the ClientHello is for the TLS layer, not for the framing
            self.server.start_tls(self)

    def tls_ready(self, transport: asyncio.Transport, certificate: dict[str, Any] | None) -> None:
        self.transport = transport
        limits = self.server.limits
        transport.set_write_buffer_limits(high=limits.unsent_bytes, low=limits.unsent_bytes // 4)
        self.handshaking = False
        self.last_activity = time.monotonic()
        if certificate is not None:
            self.peer.bound_terminals = self.server.terminals_of(certificate)
            self.peer.proven = True
        self.server.log_event("connection.tls", level="debug", conn=self.id, certificate=certificate is not None)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.frame_started is None:
            self.frame_started = time.monotonic()
        self._take_frames(data)

    def eof_received(self) -> bool | None:
        # half-close: decide what was received before it, answer all of it, then close
        self.eof = True
        if self.lingering is not None:
            self.linger_check(time.monotonic())
            return True
        self._schedule_more()
        self._close_when_done()
        return True

    def pause_writing(self) -> None:
        self.write_blocked = time.monotonic()
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_blocked = None
        self.update_reading()
        self._schedule_more()

    def connection_lost(self, exc: Exception | None) -> None:
        # answers are confirmed as the client's TCP acknowledges them (the close waits for that): what was
        # not acknowledged by now stays unanswered, whichever side closed
        self.to_confirm.clear()
        if self.confirm_timer is not None:
            self.confirm_timer.cancel()
        self.server.forget(self)
        self.closing = True
        self.transport = None

    # frames ---------------------------------------------------------------------

    def _room(self) -> int:
        """How many more requests of this connection may be decided now."""
        server = self.server
        if self.closing or self.held_back() or server.in_flight >= server.limits.in_flight_total:
            return 0
        return max(0, min(_BATCH, server.limits.in_flight - self.pending))

    def _take_frames(self, data: bytes) -> None:
        """Decide the frames received so far, as many as the limits allow now (the rest wait)."""
        try:
            frames = self.buffer.feed(data, self._room())
        except FramingError as exc:
            for frame in exc.frames:
                if self.closing:
                    break
                self._dispatch(frame.payload, frame.tpdu)
            self._reject(exc.reason, label="framing")
            return
        for frame in frames:
            if self.closing:  # a frame before this one closed the connection: nothing after it is decided
                return
            self._dispatch(frame.payload, frame.tpdu)
        if not self.buffer.buffered:
            self.frame_started = None
        elif frames:  # the bytes left over begin the next frame (or are frames waiting for room)
            self.frame_started = time.monotonic()
        self.update_reading()

    def _dispatch(self, payload: bytes, tpdu: bytes | None) -> None:
        self.frames += 1
        self.pending += 1
        self.last_activity = time.monotonic()
        self.server.request_started()
        try:
            self.server.service.handle_nowait(payload, _Reply(self, tpdu), self._fail, self.peer)
        except FrameRejectedError as exc:
            self._finished()
            self._reject(f"unreadable message: {exc}", label="unreadable")
        except Exception as exc:  # the per-request boundary: log, close this connection only
            self._finished()
            self._crashed(exc)

    def update_reading(self) -> None:
        """Read while nothing holds this connection back; else let TCP push back on the client."""
        transport = self.transport
        if transport is None or self.handshaking:
            return
        server = self.server
        wanted = self.lingering is not None or not (  # lingering: read, to drop what the client still sends
            self.closing
            or self.pending >= server.limits.in_flight
            or self.held_back()
            or server.in_flight >= server.limits.in_flight_total
            # frames received but not decided yet (taken a batch per loop iteration): read no more until
            # they are, or a client that sends faster than it is answered fills the gateway's memory
            or self.buffer.buffered > _BUFFERED_BYTES
        )
        if wanted == self.reading:
            return
        self.reading = wanted
        if wanted:
            server.throttled.discard(self)
            transport.resume_reading()
        else:
            if server.in_flight >= server.limits.in_flight_total:
                server.throttled.add(self)
            transport.pause_reading()

    def held_back(self) -> bool:
        """The client is not taking its answers fast enough: decide none of its requests meanwhile."""
        return self.write_blocked is not None or self.unacked_since is not None

    def _fail(self, exc: BaseException) -> None:
        self._finished()
        self._crashed(exc)

    def _crashed(self, exc: BaseException) -> None:
        self.server.log_event("request.crashed", level="error", conn=self.id, error=type(exc).__name__)
        self._reject("internal error", label="internal_error")

    def _finished(self) -> None:
        self.pending -= 1
        self.server.request_finished()
        self._schedule_more()
        self.update_reading()
        self._close_when_done()

    def _schedule_more(self) -> None:
        """Frames that waited for room are taken in a later callback (one batch per loop iteration, so
        that other connections get their turn), never from inside the callback that made room."""
        if not self.closing and self.buffer.buffered and not self.more_scheduled:
            self.more_scheduled = True
            asyncio.get_running_loop().call_soon(self._take_more)

    def _take_more(self) -> None:
        self.more_scheduled = False
        if not self.closing and self.transport is not None and self._room():
            self._take_frames(b"")

    def _reply(self, tpdu: bytes | None, response: bytes | None, delivered: Callable[[], None] | None) -> None:
        """Queue one answer for this loop iteration's write. ``delivered`` is called once the client's
        TCP acknowledged all of its bytes (never, if the connection goes first)."""
        transport = self.transport
        if response is not None and transport is not None and not transport.is_closing():
            if not self.outgoing:
                # answers completed by the same group commit leave in one write (one syscall)
                asyncio.get_running_loop().call_soon(self._flush)
            self.outgoing.append(encode_frame(self.server.framing, response, reply_tpdu(tpdu) if tpdu else None))
            if delivered is not None:
                self.to_confirm.append((self.written + sum(map(len, self.outgoing)), delivered))
        self._finished()

    def _flush(self) -> None:
        transport = self.transport
        data, self.outgoing = self.outgoing, []
        if transport is None or transport.is_closing() or not data:
            return
        self.confirm_delivered()
        payload = b"".join(data) if len(data) > 1 else data[0]
        transport.write(payload)
        self.written += len(payload)
        limit = self.server.limits.unsent_bytes
        if self.written - self.acknowledged > limit and self._unacknowledged() > limit:
            self.unacked_since = self.unacked_since or time.monotonic()
            self.update_reading()
        if (self.to_confirm or self.unacked_since) and self.confirm_timer is None:
            # the terminal acknowledges within milliseconds
            self.confirm_timer = asyncio.get_running_loop().call_later(_CONFIRM_AFTER_S, self._confirm_later)
        self.last_activity = self.last_write = time.monotonic()
        self._close_when_done()

    def _confirm_later(self) -> None:
        self.confirm_timer = None
        self.confirm_delivered()
        if self.lingering is not None:
            self.linger_check(time.monotonic())
        if (self.to_confirm or self.unacked_since or self.lingering is not None) and self.transport is not None:
            # not yet: look again (the sweeper looks too)
            self.confirm_timer = asyncio.get_running_loop().call_later(5 * _CONFIRM_AFTER_S, self._confirm_later)

    def _unacknowledged(self) -> int:
        """Bytes written that the client's TCP has not acknowledged. On Linux over plain TCP, the kernel's
        count of acknowledged bytes (exact, and unchanged by a reset, which empties the send queue);
        over TLS (the kernel counts encrypted bytes), what the transport and the send queue still hold
        (elsewhere, what the transport holds)."""
        transport = self.transport
        assert transport is not None
        acknowledged = _kernel_acknowledged(transport)
        if acknowledged is not None:
            self.acknowledged = min(self.written, acknowledged)
        else:
            held = _kernel_unsent(transport) or 0
            self.acknowledged = self.written - transport.get_write_buffer_size() - held
        return self.written - self.acknowledged

    def confirm_delivered(self) -> None:
        """Tell the answers whose bytes the client's TCP acknowledged; take requests again once the
        client took most of what it was behind on."""
        if not (self.to_confirm or self.unacked_since) or self.transport is None:
            return
        unacknowledged = self._unacknowledged()
        while self.to_confirm and self.to_confirm[0][0] <= self.acknowledged:
            self.to_confirm.popleft()[1]()
        if self.unacked_since is not None and unacknowledged <= self.server.limits.unsent_bytes // 4:
            self.unacked_since = None
            self.update_reading()
            self._schedule_more()

    def _close_when_done(self) -> None:
        """Once nothing more will be decided and every answer is written: end this side (FIN after the
        answers), then linger until the client took them and closed (:meth:`linger_check`)."""
        transport = self.transport
        if transport is None or self.lingering is not None or self.pending or self.outgoing:
            return
        if not (self.closing or (self.eof and not self.buffer.has_frame())):
            return
        self.closing = True
        self.lingering = time.monotonic()
        if not self.eof and transport.can_write_eof():  # not over TLS: it cannot half-close
            transport.write_eof()
        self.update_reading()
        self.linger_check(self.lingering)
        if self.transport is not None and self.confirm_timer is None:
            self.confirm_timer = asyncio.get_running_loop().call_later(_CONFIRM_AFTER_S, self._confirm_later)

    def linger_check(self, now: float) -> None:
        """Close a lingering connection once the client took every answer and closed too (or after
        _LINGER_S with every answer taken, or after the write timeout with some not taken: those stay
        unanswered)."""
        transport = self.transport
        if transport is None or self.lingering is None:
            return
        self.confirm_delivered()
        taken = not self.to_confirm and not transport.get_write_buffer_size() and not _kernel_unsent(transport)
        waited = now - self.lingering
        if (taken and (self.eof or waited >= _LINGER_S)) or waited >= self.server.limits.write_timeout_s:
            transport.close()

    def _reject(self, reason: str, *, label: str) -> None:
        server = self.server
        server.log_event("connection.rejected", level="warning", conn=self.id, peer=self.peer.address, reason=reason)
        if server.recorder is not None:
            server.recorder.frame_rejected(label)
        self.closing = True
        self.frame_started = None
        self.update_reading()
        self._close_when_done()

    def drop(self, event: str, *, reset: bool = False, **fields: Any) -> None:
        """Close at once, unwritten answers included (deadlines, eviction). ``reset`` for a client that
        does not read: a FIN queued behind the answers it never takes would never reach it."""
        self.server.log_event(event, conn=self.id, peer=self.peer.address, **fields)
        self.closing = True
        if self.transport is not None:
            if reset:
                sock = self.transport.get_extra_info("socket")
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()


def _kernel_unsent(transport: asyncio.BaseTransport) -> int | None:
    """Bytes the kernel holds for the peer, sent or not but not acknowledged (Linux); None if unknown."""
    sock = transport.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, AttributeError, ValueError):  # not a Linux socket, or already closed
        return None


#: struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a 64-bit count at this offset (Linux 4.1 and later)
_TCP_INFO_BYTES_ACKED = 120


def _kernel_acknowledged(transport: asyncio.BaseTransport) -> int | None:
    """Bytes the client's TCP acknowledged over the connection's life (Linux, plain TCP); None when
    unknown, or over TLS."""
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES_ACKED + 8)
        return int(struct.unpack_from("Q", info, _TCP_INFO_BYTES_ACKED)[0])
    except (OSError, AttributeError, struct.error):
        return None


def _kernel_stall(conn: _Connection, now: float, interval: float) -> float | None:
    """Since when the client has taken none of the answers the kernel still holds for it, or None.

    The socket buffers between the two ends hold megabytes: a client that stops reading after a burst
    may never fill the transport's own buffer (``pause_writing``). The kernel's send queue tells: if
    it holds bytes, did not shrink since the last sweep, and nothing was written meanwhile, the
    client is not reading."""
    unsent = (_kernel_unsent(conn.transport) or 0) if conn.transport is not None else 0
    if unsent and unsent >= conn.kernel_unsent and now - conn.last_write >= interval:
        conn.stalled_since = conn.stalled_since or now
    else:
        conn.stalled_since = None
    conn.kernel_unsent = unsent
    return conn.stalled_since


class _Reply:
    """What the service calls with a request's answer (the connection and the request's TPDU)."""

    __slots__ = ("conn", "tpdu")

    def __init__(self, conn: _Connection, tpdu: bytes | None) -> None:
        self.conn, self.tpdu = conn, tpdu

    def __call__(self, response: bytes | None, delivered: Callable[[], None] | None = None) -> None:
        self.conn._reply(self.tpdu, response, delivered)
