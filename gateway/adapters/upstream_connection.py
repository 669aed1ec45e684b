"""One connection of the upstream link: bytes in and out through the profile's framing, and why it ended.

:class:`Connection` is an asyncio protocol that cuts the host's bytes into frames and hands each
payload to its owner (the link, :mod:`gateway.adapters.upstream`), and tells the owner once, at
once, when it ends, whichever side ended it. It decides nothing. :func:`tls_context` builds the
client TLS context of ``tls://`` links.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, cast

from gateway.config import UpstreamSettings
from gateway.protocol.framing import FrameBuffer, FramingError
from gateway.protocol.profile import Framing

__all__ = ["Connection", "Owner", "Slot", "State", "TlsFilesError", "describe_os_error", "tls_context"]


class State(StrEnum):
    """Where a connection slot is: its states in order, ``closed`` before start and after stop."""

    CONNECTING = "connecting"
    SIGNING_ON = "signing_on"
    UP = "up"
    BACKOFF = "backoff"
    CLOSED = "closed"


class Owner(Protocol):
    def received(self, connection: Connection, payload: bytes) -> None: ...

    def lost(self, connection: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """A TCP (or TLS) connection to the host. ``index`` is its slot, ``serial`` unique per link.

    ``reason`` / ``detail`` say why it ended: ``closed_by_host``, ``connection_error``,
    ``framing_error``, or what :meth:`close` was given. ``lost`` is set, and the owner told, once.
    """

    def __init__(self, owner: Owner, framing: Framing, index: int, serial: int) -> None:
        self.owner, self.index, self.serial = owner, index, serial
        self.buffer = FrameBuffer(framing)
        self.transport: asyncio.Transport | None = None
        #: loop time of the last frame received (or of the connection), for the echo test
        self.last_received = asyncio.get_running_loop().time()
        self.closed = asyncio.Event()
        self.lost = False
        self.reason, self.detail = "closed_by_host", ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.buffer.feed(data)
        except FramingError as exc:  # the stream cannot be read any further: this connection is over
            for frame in exc.frames:  # the answers complete before the fault still reach their callers
                self.owner.received(self, frame.payload)
            self.close("framing_error", exc.reason)
            return
        for frame in frames:
            self.owner.received(self, frame.payload)

    def eof_received(self) -> bool | None:
        return False  # the host half-closed: close our side too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.lost:
            self.reason, self.detail = "connection_error", type(exc).__name__
        self.transport = None
        self._ended()

    def write(self, data: bytes) -> None:
        if self.transport is None:
            raise ConnectionError("the connection is closed")
        self.transport.write(data)

    def close(self, reason: str, detail: str = "") -> None:
        """Close at once (unsent bytes are dropped) and tell the owner now."""
        if not self.lost:
            self.reason, self.detail = reason, detail
        if self.transport is not None:
            self.transport.abort()
        self._ended()

    def _ended(self) -> None:
        if self.lost:
            return
        self.lost = True
        self.closed.set()
        self.owner.lost(self)


@dataclass(slots=True)
class Slot:
    """One of the link's ``connections``: its state, since when, why it last failed, its connection."""

    index: int
    state: State
    since: datetime
    last_error: str | None = None
    connection: Connection | None = None

    @property
    def live(self) -> Connection | None:
        """The connection, when it is signed on and not lost."""
        connection = self.connection
        return connection if self.state is State.UP and connection is not None and not connection.lost else None


def describe_os_error(exc: OSError) -> str:
    """``Connection refused``, ``TLS: CERTIFICATE_VERIFY_FAILED``: the cause, without addresses or values."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc.strerror or type(exc).__name__}"
    if isinstance(exc, socket.gaierror):  # a name that does not resolve: its errno is no errno
        return exc.strerror or type(exc).__name__
    if exc.errno:  # asyncio's text adds the address: the system's words alone
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class TlsFilesError(Exception):
    """A TLS file of the upstream settings is missing or does not load; ``setting`` is its variable."""

    def __init__(self, setting: str, detail: str) -> None:
        super().__init__(f"{setting}: {detail}")
        self.setting, self.detail = setting, detail


def tls_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """The client TLS context of a ``tls://`` link: the host verified (``tls_ca``, else the system's
    CAs, and its name or address against the URL's), our certificate offered when ``tls_cert`` is set."""
    files = (("TLS_CA", settings.tls_ca), ("TLS_CERT", settings.tls_cert), ("TLS_KEY", settings.tls_key))
    for name, path in files:
        if path is not None and not path.is_file():
            raise TlsFilesError(f"GATEWAY_UPSTREAM__{name}", f"no such file: {path}")
    try:
        context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
    except OSError as exc:  # ssl.SSLError is one; so is a file we may not read
        raise TlsFilesError("GATEWAY_UPSTREAM__TLS_CA", f"not a CA bundle: {describe_os_error(exc)}") from None
    if settings.tls_cert is not None:
        key = str(settings.tls_key) if settings.tls_key else None
        try:
            context.load_cert_chain(str(settings.tls_cert), key)
        except OSError as exc:
            setting = "GATEWAY_UPSTREAM__TLS_KEY" if key else "GATEWAY_UPSTREAM__TLS_CERT"
            detail = f"cannot load the certificate and its key: {describe_os_error(exc)}"
            raise TlsFilesError(setting, detail) from None
    return context
