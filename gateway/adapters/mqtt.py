"""The outbox relay: publishes pending correction events to an MQTT broker (design section 6).

One asyncio task (``OutboxRelay.run``) reads the outbox in id order, publishes each row with QoS 1
and marks a row sent only after the broker's PUBACK. It is the only place that talks to the broker,
so a broker outage never blocks anything else: terminals keep being answered, the outbox grows, and
it drains when the broker returns.

Delivery is at least once: a row whose PUBACK was lost (connection dropped, gateway killed) is
published again after reconnecting, with the same CloudEvents ``id``. The client is aiomqtt (MQTT
3.1.1, clean session). A batch of rows is published together: one aiomqtt publish per row, started
in id order on one connection (so the PUBLISH packets leave in that order) and awaited together with
``asyncio.gather`` under one time limit. Only the unbroken acknowledged prefix is marked sent, so
events about one original (one ordering key) reach the broker in the order they were written.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError  # a refused CONNACK (not re-exported by aiomqtt)

from gateway.ports import Clock, Outbox, OutboxRow

__all__ = ["BrokerAddress", "OutboxRelay", "RelayStats", "describe_mqtt_error", "parse_mqtt_url"]

_BACKOFF_INITIAL = 0.1  #: seconds before the first reconnect attempt
_BACKOFF_MAX = 5.0  #: the reconnect delay doubles up to this
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_MAX_ERROR_CHARS = 500
#: publishes in flight at once (a batch); MQTT packet identifiers are 16 bits
_MAX_BATCH = 10_000


class EventLogger(Protocol):
    """The part of a structlog bound logger the relay uses."""

    def info(self, event: str, **kw: Any) -> Any: ...

    def warning(self, event: str, **kw: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """A parsed ``mqtt://`` or ``mqtts://`` URL. ``str()`` and ``repr()`` never show the password."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username and self.password else ""
        if self.username and not self.password:
            user = f"{self.username}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}"


def parse_mqtt_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://[user:pass@]host[:port]`` (default port 1883) or ``mqtts://...`` (8883).

    Raises ``ValueError`` with a message that never contains the password.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise ValueError(f"invalid MQTT URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported MQTT URL scheme {scheme!r}: use mqtt://host:port or mqtts://host:port")
    host = parts.hostname
    if not host:
        raise ValueError("MQTT URL has no host: use mqtt://host:port or mqtts://host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"MQTT URL for host {host!r} has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"MQTT URL for host {host!r} must not have a path, query or fragment")
    return BrokerAddress(
        host=host,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        tls=scheme == "mqtts",
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


@dataclass(frozen=True, slots=True)
class RelayStats:
    """A snapshot of the relay's state, for metrics and ``outbox status``."""

    published: int  #: rows acknowledged by the broker since start
    connected: bool
    errors: int  #: failed connection / publish / outbox attempts since start
    last_error: str | None
    last_error_at: datetime | None
    last_published_at: datetime | None


def describe_mqtt_error(exc: BaseException) -> str:
    """An aiomqtt error in words, for logs and ``outbox status``: a reason code by its name
    (``connection refused: not authorized``, ``keep alive timeout``), anything else as it says."""
    if isinstance(exc, aiomqtt.MqttCodeError) and exc.rc is not None and not isinstance(exc.rc, int):
        reason = str(exc.rc).lower()  # paho's ReasonCode: its name, without MQTT 5's code number
        return f"connection refused: {reason}" if isinstance(exc, MqttConnectError) else reason
    return str(exc) or type(exc).__name__


class _BrokerFailure(Exception):
    """The broker could not be reached, or a publish was not acknowledged."""


class OutboxRelay:
    """Publishes the outbox to MQTT with QoS 1, in id order, marking rows sent after PUBACK."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        url: str,
        client_id: str,
        clock: Clock,
        batch_size: int = 100,
        poll_interval: float = 0.2,
        retention: timedelta = timedelta(days=7),
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_insecure: bool = False,
        logger: EventLogger | None = None,
        prune_interval: float = 60.0,
        publish_timeout: float = 10.0,
        keepalive: int = 30,
    ) -> None:
        if not 1 <= batch_size <= _MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {_MAX_BATCH}")
        if poll_interval <= 0 or prune_interval <= 0 or publish_timeout <= 0:
            raise ValueError("poll_interval, prune_interval and publish_timeout must be positive")
        self._address = parse_mqtt_url(url)
        if not self._address.tls and (tls_ca or tls_cert or tls_key or tls_insecure):
            raise ValueError(f"TLS settings are given but {self._address} is not TLS: use mqtts://")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a TLS client certificate needs both tls_cert and tls_key")
        self._outbox = outbox
        self._client_id = client_id
        self._clock = clock
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._retention = retention
        self._prune_interval = prune_interval
        self._publish_timeout = publish_timeout
        self._keepalive = keepalive
        self._tls_ca, self._tls_cert, self._tls_key, self._tls_insecure = tls_ca, tls_cert, tls_key, tls_insecure
        self._log: EventLogger = logger if logger is not None else structlog.get_logger("gateway.outbox")
        self._wake = asyncio.Event()
        self._published = 0
        self._connected = False
        self._errors = 0
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._last_published_at: datetime | None = None
        self._session_published = False  #: the current connection got at least one PUBACK

    @property
    def address(self) -> BrokerAddress:
        return self._address

    @property
    def stats(self) -> RelayStats:
        return RelayStats(
            published=self._published,
            connected=self._connected,
            errors=self._errors,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            last_published_at=self._last_published_at,
        )

    def notify(self) -> None:
        """Wake the relay at once: the ledger committed new outbox rows. Call from the event loop."""
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled; broker and outbox failures are retried, never raised."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._prune_forever(), name="outbox-prune")
            tasks.create_task(self._relay_forever(), name="outbox-relay")

    # -- publishing -------------------------------------------------------------------------

    async def _relay_forever(self) -> None:
        loop = asyncio.get_running_loop()
        delay = _BACKOFF_INITIAL
        while True:
            started = loop.time()
            self._session_published = False
            try:
                await self._session()
            except Exception as exc:  # the relay task's boundary: report, back off, reconnect
                if self._session_published or loop.time() - started >= _BACKOFF_MAX:
                    delay = _BACKOFF_INITIAL
                await self._report(exc, retry_in=delay)
            finally:
                self._connected = False
            _stop_if_cancelled()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    def _ssl_context(self) -> ssl.SSLContext | None:
        """Built at each connection, so a fixed certificate file is picked up by the next attempt."""
        if not self._address.tls:
            return None
        context = ssl.create_default_context(cafile=self._tls_ca)  # the system's CAs when none is given
        if self._tls_cert is not None:
            context.load_cert_chain(self._tls_cert, self._tls_key)
        if self._tls_insecure:
            context.check_hostname = False  # the chain is still verified; only the name is not
        return context

    def _client(self) -> aiomqtt.Client:
        """A client for one connection (a new one at each reconnect: nothing of a lost one is kept)."""
        address = self._address
        client = aiomqtt.Client(
            address.host,
            address.port,
            identifier=self._client_id,
            username=address.username,
            password=address.password,
            clean_session=True,  # the outbox is the relay's durable state, not a broker session
            keepalive=self._keepalive,
            timeout=self._publish_timeout,  # for the CONNACK and the DISCONNECT
            tls_context=self._ssl_context(),
            # no limit in paho: the relay's batch is the limit, all of it on the wire at once (paho's
            # default holds back all but 20, and any limit costs a scan of its messages per PUBACK)
            max_inflight_messages=0,
        )
        # a full batch in flight is the plan: no "There are N pending publish calls" warning per event
        client.pending_calls_threshold = self._batch_size
        return client

    async def _session(self) -> None:
        """One connection: publish until it fails (raises) or the task is cancelled."""
        address = self._address
        try:
            client = self._client()
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError) as exc:  # OSError: a CA or certificate file that cannot be read
            raise _BrokerFailure(f"cannot connect to {address}: {describe_mqtt_error(exc)}") from exc
        try:
            self._connected = True
            self._log.info("outbox.connected", broker=str(address), client_id=self._client_id)
            watcher = asyncio.create_task(self._until_disconnected(client))
            pump = asyncio.create_task(self._pump(client))
            try:
                done, _ = await asyncio.wait((watcher, pump), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (watcher, pump):
                    task.cancel()
                await asyncio.gather(watcher, pump, return_exceptions=True)
            for task in (watcher, pump):  # a lost connection first: it is why a publish failed
                if task in done:
                    task.result()
        finally:
            self._connected = False
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    async def _until_disconnected(self, client: aiomqtt.Client) -> None:
        """Raises when the connection is lost (aiomqtt ends its message iterator then; the relay
        subscribes to nothing, so no message ever arrives)."""
        try:
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError as exc:
            reason = describe_mqtt_error(exc.__cause__ or exc)
            raise _BrokerFailure(f"connection to {self._address} lost: {reason}") from exc
        raise _BrokerFailure(f"connection to {self._address} closed")

    async def _pump(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            rows = await self._outbox.pending(self._batch_size)
            if not rows:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the inner result when
                # a cancellation arrives just as the wait is woken, and this loop would never stop
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wake.wait()
                continue
            await self._publish_batch(client, rows)

    async def _publish_batch(self, client: aiomqtt.Client, rows: Sequence[OutboxRow]) -> None:
        """Publish a batch together and mark the acknowledged prefix sent.

        One aiomqtt publish per row, each returning once its PUBACK arrived; they start in id order
        (tasks run in the order they were made), so the PUBLISH packets leave in that order, and they
        are awaited together within one time limit for the whole batch (``timeout=math.inf`` gives
        none, and no extra task, to each publish). Only the unbroken run of acknowledged rows from
        the first one is marked sent: after a failure, a time-out or a lost connection the rest is
        published again (at least once, in order).
        """
        publishes = [
            asyncio.ensure_future(client.publish(row.topic, row.payload, qos=1, timeout=math.inf)) for row in rows
        ]
        try:
            async with asyncio.timeout(self._publish_timeout):
                await asyncio.gather(*publishes)
        except TimeoutError:
            raise _BrokerFailure(f"publish to {self._address} timed out") from None
        except aiomqtt.MqttError as exc:
            raise _BrokerFailure(f"publish to {self._address} failed: {describe_mqtt_error(exc)}") from exc
        finally:
            for publish in publishes:
                publish.cancel()  # a no-op for the finished ones
            acked: list[int] = []
            for row, publish in zip(rows, publishes, strict=True):
                if not _acknowledged(publish):
                    break
                acked.append(row.id)
            if acked:
                await self._mark_sent(acked)

    async def _mark_sent(self, acked: list[int]) -> None:
        sent_at = self._clock.now()
        await self._outbox.mark_sent(acked, sent_at)
        self._published += len(acked)
        self._last_published_at = sent_at
        self._session_published = True
        self._log.info("outbox.published", count=len(acked), first_id=acked[0], last_id=acked[-1])

    async def _report(self, exc: Exception, *, retry_in: float) -> None:
        message = str(exc) if isinstance(exc, _BrokerFailure) else f"outbox: {type(exc).__name__}: {exc}"
        message = message[:_MAX_ERROR_CHARS]
        at = self._clock.now()
        self._errors += 1
        self._last_error = message
        self._last_error_at = at
        self._log.warning("outbox.error", error=message, retry_in=retry_in)
        try:
            await self._outbox.record_error(message, at)
        except Exception as record_exc:  # the outbox itself may be what is failing
            self._log.warning(
                "outbox.error", error=f"cannot record the error: {type(record_exc).__name__}: {record_exc}"
            )

    # -- retention --------------------------------------------------------------------------

    async def _prune_forever(self) -> None:
        while True:
            try:
                pruned = await self._outbox.prune(self._clock.now() - self._retention)
            except Exception as exc:  # pruning is housekeeping: report and try again later
                self._log.warning("outbox.error", error=f"prune: {type(exc).__name__}: {exc}"[:500])
            else:
                if pruned:
                    self._log.info("outbox.pruned", count=pruned)
            await asyncio.sleep(self._prune_interval)


def _acknowledged(publish: asyncio.Future[None]) -> bool:
    """The publish returned: its PUBACK arrived (a cancelled or failed one did not)."""
    return publish.done() and not publish.cancelled() and publish.exception() is None


def _stop_if_cancelled() -> None:
    """Stop the relay if it was asked to, even when a library swallowed the request: Python 3.11's
    ``asyncio.wait_for`` (which aiomqtt's disconnect uses) returns its result instead of raising
    ``CancelledError`` when the awaited future completes as the cancellation arrives, and the relay
    would then reconnect forever after its ``stop``. ``Task.cancelling()`` still counts the request."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
