"""The embedded MQTT 3.1.1 broker (amqtt) used when ``GATEWAY_MQTT_URL=embedded``.

The gateway opens the listening socket itself and hands each accepted connection to amqtt through
its external-listener API, so a taken port fails with one clear ``BrokerError`` before anything
else starts, port 0 works (the ``url`` then shows the port the system chose), and ``stop`` closes
every client connection. Anonymous clients are allowed: bind it to loopback (the default) or put a
real broker in front of anything that is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.errors import BrokerError as AmqttBrokerError

__all__ = ["BrokerError", "EmbeddedBroker"]

_LISTENER = "default"
_HINT = "set GATEWAY_MQTT__EMBEDDED_LISTEN or GATEWAY_MQTT_URL"
_QUIET_LOGGERS = ("amqtt", "transitions")

_log = logging.getLogger(__name__)


class BrokerError(Exception):
    """The embedded broker cannot start (for example its port is taken)."""


def _reason(exc: OSError) -> str:
    """``address already in use`` and friends, without asyncio's wrapping text."""
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _quiet_amqtt_logging() -> None:
    """amqtt logs every connection at INFO and tracebacks at ERROR; the gateway logs what matters."""
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.CRITICAL)


class EmbeddedBroker:
    """An in-process MQTT broker listening on ``host:port``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self._host = host
        self._port = port
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listening port (the one the system chose when constructed with port 0 and started)."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen and serve; raises ``BrokerError`` when the address cannot be used."""
        if self._server is not None:
            raise BrokerError(f"embedded broker on {self._host}:{self._port} is already running")
        _quiet_amqtt_logging()
        broker = Broker(self._config())
        try:
            # bind first (not yet accepting) so that a taken port fails before amqtt starts
            server = await asyncio.start_server(self._serve, self._host, self._port, start_serving=False)
        except OSError as exc:
            raise BrokerError(f"cannot listen on {self._host}:{self._port}: {_reason(exc)}; {_HINT}") from exc
        try:
            await broker.start()
        except AmqttBrokerError as exc:
            server.close()
            await server.wait_closed()
            raise BrokerError(f"embedded broker on {self._host}:{self._port} cannot start: {exc}") from exc
        if self._port == 0:
            self._port = int(server.sockets[0].getsockname()[1])
        self._broker = broker
        self._server = server
        await server.start_serving()

    async def stop(self) -> None:
        """Stop listening, disconnect every client and shut the broker down. Idempotent."""
        server, broker = self._server, self._broker
        self._server = None
        self._broker = None
        if server is None or broker is None:
            return
        server.close()
        try:
            await broker.shutdown()
        finally:
            for writer in list(self._writers):
                writer.close()
            for writer in list(self._writers):
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()
            self._writers.clear()
            await server.wait_closed()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {_LISTENER: {"type": "external"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker = self._broker
        if broker is None:  # accepted while stopping
            writer.close()
            return
        self._writers.add(writer)
        try:
            await broker.external_connected(StreamReaderAdapter(reader), StreamWriterAdapter(writer), _LISTENER)
        except Exception as exc:  # one client's failure must not reach the event loop's handler
            _log.debug("embedded broker client failed: %s", type(exc).__name__)
        finally:
            self._writers.discard(writer)
            writer.close()
