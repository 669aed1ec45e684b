"""A publish-only MQTT 3.1.1 client for the outbox relay: CONNECT, PUBLISH with QoS 1, PUBACK, PINGREQ.

The relay needs a small part of MQTT: one connection that publishes batches with QoS 1 and waits for
their PUBACKs. This module does exactly that on asyncio's protocol machinery, over TCP or TLS, with
user name and password. It subscribes to nothing and keeps no session (clean session): the outbox
is the relay's durable state, and what was not acknowledged is published again after reconnecting.

Why not aiomqtt for this (it stays the MQTT client of the demo, the emulator and the tests): through
aiomqtt and paho-mqtt one event cost the gateway about 50 µs of its event-loop thread: a coroutine,
an ``asyncio.Event``, a context manager and a scan of every pending call per publish, three
``recv`` calls to read each 4-byte PUBACK, and MQTT 5 reason-code and property objects built for
every PUBACK of an MQTT 3.1.1 session. Here a batch is one ``write``, a PUBACK is a dictionary pop,
and a batch has one future. See docs/performance.md.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["BrokerRefused", "MqttError", "MqttPublisher", "PublishedBatch", "connect_packet", "publish_packet"]

_PROTOCOL_LEVEL = 4  #: MQTT 3.1.1
_MAX_REMAINING = 268_435_455  #: the largest remaining length a packet may announce
_CONNACK_REFUSALS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_CONNACK, _PUBACK, _PINGRESP = 2, 4, 13


class MqttError(Exception):
    """The broker refused the connection, or the connection failed or was lost."""


class BrokerRefused(MqttError):
    """The broker answered the CONNECT with a refusal (bad credentials, not authorised, ...)."""


def _remaining_length(length: int) -> bytes:
    if length > _MAX_REMAINING:
        raise ValueError(f"an MQTT packet holds at most {_MAX_REMAINING} bytes")
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def _string(value: str) -> bytes:
    data = value.encode()
    if len(data) > 0xFFFF:
        raise ValueError("an MQTT string holds at most 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, *, username: str | None, password: str | None, keepalive: int) -> bytes:
    """CONNECT with a clean session; a password without a user name goes with an empty one."""
    if password is not None and username is None:
        username = ""
    flags = 0x02  # clean session
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    body = _string("MQTT") + bytes((_PROTOCOL_LEVEL, flags)) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + _remaining_length(len(body)) + body


@lru_cache(maxsize=4096)
def _topic(topic: str) -> bytes:
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"not a topic to publish to: {topic!r}")
    return _string(topic)


def publish_packet(topic: str, packet_id: int, payload: bytes) -> bytes:
    """PUBLISH with QoS 1, not retained, not a duplicate."""
    name = _topic(topic)
    return b"\x32" + _remaining_length(len(name) + 2 + len(payload)) + name + packet_id.to_bytes(2, "big") + payload


class PublishedBatch:
    """Messages written together; ``done`` resolves when the broker acknowledged all of them, and
    fails with :class:`MqttError` if the connection ends first. ``acked`` says which ones were."""

    __slots__ = ("_remaining", "acked", "done", "packet_ids")

    def __init__(self, packet_ids: list[int], done: asyncio.Future[None]) -> None:
        self.packet_ids = packet_ids
        self.acked: set[int] = set()
        self.done = done
        self._remaining = len(packet_ids)
        if not packet_ids:
            done.set_result(None)

    def _ack(self, packet_id: int) -> None:
        self.acked.add(packet_id)
        self._remaining -= 1
        if not self._remaining and not self.done.done():
            self.done.set_result(None)

    def _fail(self, error: MqttError) -> None:
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()  # retrieved: a batch nobody awaits any more must not be reported


class MqttPublisher(asyncio.Protocol):
    """One connection to a broker. Open it with :meth:`connect`; ``lost`` resolves (with an
    :class:`MqttError`) when the connection ends for any reason other than :meth:`close`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keepalive: int) -> None:
        self._loop = loop
        self._keepalive = keepalive
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._connack: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._inflight: dict[int, PublishedBatch] = {}
        self._last_id = 0
        self._last_received = loop.time()
        self._ping: asyncio.TimerHandle | None = None
        self._closing = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
    ) -> MqttPublisher:
        """Connect and wait for the broker's CONNACK; raises :class:`MqttError`."""
        loop = asyncio.get_running_loop()
        packet = connect_packet(client_id, username=username, password=password, keepalive=keepalive)
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                transport, protocol = await loop.create_connection(
                    lambda: cls(loop, keepalive), host, port, ssl=ssl_context
                )
                protocol._write(packet)
                code = await protocol._connack
        except TimeoutError:
            if transport is not None:
                transport.abort()
            raise MqttError(f"no answer from the broker within {connect_timeout:g} s") from None
        except OSError as exc:  # refused, unreachable, TLS verification (ssl.SSLError is an OSError)
            if transport is not None:
                transport.abort()
            raise MqttError(str(exc) or type(exc).__name__) from exc
        if code:
            assert transport is not None
            transport.close()
            raise BrokerRefused(f"connection refused: {_CONNACK_REFUSALS.get(code, f'code {code}')}")
        protocol._schedule_ping()
        return protocol

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, messages: Sequence[tuple[str, bytes]]) -> PublishedBatch:
        """Write ``(topic, payload)`` messages with QoS 1, in order, in one write."""
        if self._transport is None or self._closing or self.lost.done():
            raise MqttError("not connected")
        if len(messages) + len(self._inflight) > 0xFFFF:
            raise ValueError("more than 65535 messages in flight")
        packets: list[bytes] = []
        ids: list[int] = []
        for topic, payload in messages:
            packet_id = self._next_id()
            packets.append(publish_packet(topic, packet_id, payload))
            ids.append(packet_id)
        batch = PublishedBatch(ids, self._loop.create_future())
        for packet_id in ids:
            self._inflight[packet_id] = batch
        self._write(b"".join(packets))
        return batch

    def _next_id(self) -> int:
        packet_id = self._last_id
        while True:
            packet_id = packet_id % 0xFFFF + 1
            if packet_id not in self._inflight:
                self._last_id = packet_id
                return packet_id

    async def close(self) -> None:
        """Send DISCONNECT and close; batches still in flight fail."""
        if self._closing:
            return
        self._closing = True
        self._cancel_ping()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(_DISCONNECT)
            transport.close()
        self._fail_all(MqttError("connection closed"))

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport (TCP or TLS)

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        buffer = self._buffer
        buffer += data
        start, end = 0, len(buffer)
        inflight = self._inflight
        while end - start >= 2:
            header = buffer[start]
            if header == 0x40 and buffer[start + 1] == 2:  # PUBACK, the packet that comes by the thousand
                if end - start < 4:
                    break
                packet_id = (buffer[start + 2] << 8) | buffer[start + 3]
                batch = inflight.pop(packet_id, None)
                if batch is not None:
                    batch._ack(packet_id)
                start += 4
                continue
            length = shift = 0
            position = start + 1
            complete = False
            while position < end:
                byte = buffer[position]
                position += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    self._protocol_error("malformed remaining length")
                    return
            if not complete:
                break  # the remaining length itself has not all arrived yet
            if end - position < length:
                break
            self._packet(header >> 4, bytes(buffer[position : position + length]))
            start = position + length
        del buffer[:start]

    def _packet(self, kind: int, body: bytes) -> None:
        if kind == _CONNACK:
            if len(body) != 2:
                self._protocol_error("malformed CONNACK")
            elif not self._connack.done():
                self._connack.set_result(body[1])
        elif kind == _PUBACK:
            if len(body) != 2:
                self._protocol_error("malformed PUBACK")
                return
            packet_id = int.from_bytes(body, "big")
            batch = self._inflight.pop(packet_id, None)
            if batch is not None:
                batch._ack(packet_id)
        elif kind != _PINGRESP:
            # a publish-only client is sent nothing else (it subscribes to nothing)
            self._protocol_error(f"unexpected packet type {kind}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_ping()
        reason = f"connection lost: {exc}" if exc is not None else "connection closed by the broker"
        error = MqttError(reason)
        if not self._connack.done():
            self._connack.set_exception(error)
            self._connack.exception()
        self._lose(error)
        self._fail_all(error)
        self._transport = None

    # -- internals ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def _fail_all(self, error: MqttError) -> None:
        batches = {id(batch): batch for batch in self._inflight.values()}
        self._inflight.clear()
        for batch in batches.values():
            batch._fail(error)

    def _lose(self, error: MqttError) -> None:
        """Resolve ``lost``, unless :meth:`close` ended the connection (or it was never handed out)."""
        if not self.lost.done() and not self._closing:
            self.lost.set_exception(error)
            self.lost.exception()  # retrieved: a connection that failed while connecting has no reader

    def _protocol_error(self, what: str) -> None:
        self._lose(MqttError(f"protocol error: {what}"))
        if self._transport is not None:
            self._transport.abort()

    def _schedule_ping(self) -> None:
        if self._keepalive > 0:
            self._ping = self._loop.call_later(self._keepalive / 2, self._keep_alive)

    def _keep_alive(self) -> None:
        """Every half keep-alive interval: a PINGREQ, so the broker never times the connection out;
        nothing heard from the broker for a whole interval (not even a PINGRESP) means it is gone."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._loop.time() - self._last_received > self._keepalive:
            self._protocol_error(f"no answer from the broker for {self._keepalive} s")
            return
        transport.write(_PINGREQ)
        self._schedule_ping()

    def _cancel_ping(self) -> None:
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
