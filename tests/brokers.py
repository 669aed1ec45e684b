"""Real MQTT brokers and subscribers for tests.

- ``MosquittoBroker``: a private Mosquitto process on a free loopback port, with start / stop /
  kill / restart on the same port (for outage tests) and optional persistence, so that a subscriber
  with a persistent session gets what was published while it was away, even across a restart.
- ``ThreadedEmbeddedBroker``: the gateway's embedded amqtt broker on its own event loop thread, the
  fallback when Mosquitto is not installed; usable from sync, session-scoped fixtures.
- ``Subscriber`` / ``collect_messages``: subscribe with aiomqtt and gather what arrives, with timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest

from gateway.adapters.broker import EmbeddedBroker
from gateway.adapters.mqtt import parse_mqtt_url

DEFAULT_MOSQUITTO = "/usr/sbin/mosquitto"


def mosquitto_binary() -> str | None:
    """The Mosquitto executable (``MOSQUITTO_BIN`` overrides), or None when it is not installed."""
    candidate = os.environ.get("MOSQUITTO_BIN") or shutil.which("mosquitto") or DEFAULT_MOSQUITTO
    return candidate if Path(candidate).is_file() and os.access(candidate, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken by then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll ``predicate`` until it holds; ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.01,
) -> None:
    """``wait_until`` for async tests: polls without blocking the event loop."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polls plain state owned by the test
                await asyncio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}") from None


def _die_with_parent() -> None:
    """Linux: the broker gets SIGTERM when the test process dies, even if pytest is killed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class MosquittoBroker:
    """A private Mosquitto on ``127.0.0.1``; keeps its port across ``stop``/``start``/``restart``."""

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str,
        port: int | None = None,
        persistence: bool = True,
        extra_config: str = "",
    ) -> None:
        self.workdir = workdir
        self.binary = binary
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(self.host)
        self.persistence = persistence
        self.extra_config = extra_config
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 0",
        ]
        if os.geteuid() == 0:
            lines.append(f"user {getpass.getuser()}")  # stay root: do not drop to 'mosquitto'
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config)

    def start(self, timeout: float = 5.0) -> None:
        """Start and wait until it accepts connections; retries on another port if its own was taken."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self._write_config()
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    [self.binary, "-c", str(self.config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            process = self._process

            def listening_or_exited(process: subprocess.Popen[bytes] = process) -> bool:
                return process.poll() is not None or port_accepts(self.host, self.port)

            try:
                wait_until(listening_or_exited, timeout, f"mosquitto to listen on {self.host}:{self.port}")
            except TimeoutError:
                self.kill()
                raise
            if process.poll() is None:
                return
            self._process = None
            if attempt + 1 < attempts:
                self.port = free_port(self.host)
        raise RuntimeError(f"mosquitto did not start on {self.host}:{self.port}:\n{self.log()[-2000:]}")

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM: persistent sessions are saved); SIGKILL if it does not exit in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def kill(self, timeout: float = 5.0) -> None:
        """Crash it (SIGKILL): nothing is saved."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=timeout)

    def restart(self, timeout: float = 5.0) -> None:
        """Stop and start again on the same port."""
        self.stop(timeout)
        port, fixed = self.port, self._fixed_port
        self._fixed_port = True
        try:
            self.start(timeout)
        finally:
            self.port, self._fixed_port = port, fixed

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ThreadedEmbeddedBroker:
    """The gateway's ``EmbeddedBroker`` on a private event loop thread (for sync fixtures)."""

    host = "127.0.0.1"

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: EmbeddedBroker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._broker is not None and self._broker.running

    def _call(self, coro: Coroutine[Any, Any, None], timeout: float) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, timeout: float = 5.0) -> None:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="embedded-mqtt", daemon=True)
            self._thread.start()
            self._loop = loop
        self._broker = EmbeddedBroker(self.host, self.port)
        self._call(self._broker.start(), timeout)
        self.port = self._broker.port

    def stop(self, timeout: float = 5.0) -> None:
        if self._broker is not None:
            self._call(self._broker.stop(), timeout)
            self._broker = None

    def restart(self, timeout: float = 5.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self.stop(timeout)
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return str(payload).encode()


class Subscriber:
    """An aiomqtt subscriber: subscribed (SUBACK received) once ``async with`` has entered.

    With ``clean_session=False`` and a fixed ``client_id``, the broker keeps the subscription and
    queues QoS 1 messages while the subscriber is away (the way a back-office consumer runs).
    """

    def __init__(
        self,
        url: str,
        topic_filter: str,
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        qos: int = 1,
    ) -> None:
        self.address = parse_mqtt_url(url)
        self.topic_filter = topic_filter
        self.client_id = client_id or f"test-sub-{uuid.uuid4().hex[:12]}"
        self.clean_session = clean_session
        self.qos = qos
        self.received: list[Received] = []
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Self:
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=self.client_id,
            username=self.address.username,
            password=self.address.password,
            clean_session=self.clean_session,
            timeout=5,
        )
        await client.__aenter__()
        self._client = client
        try:
            await client.subscribe(self.topic_filter, qos=self.qos)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    async def collect(self, count: int, timeout: float) -> list[Received]:
        """Wait until ``count`` messages in total have been received; returns them all."""
        assert self._client is not None, "use 'async with Subscriber(...)'"
        try:
            async with asyncio.timeout(timeout):
                while len(self.received) < count:
                    message = await anext(aiter(self._client.messages))
                    self.received.append(self._convert(message))
        except TimeoutError:
            topics = [r.topic for r in self.received]
            raise TimeoutError(
                f"received {len(self.received)} of {count} messages on {self.topic_filter!r} "
                f"within {timeout:.1f}s: {topics}"
            ) from None
        return list(self.received)

    async def extra(self, within: float) -> list[Received]:
        """Messages that arrive within ``within`` seconds (for asserting that nothing more comes)."""
        assert self._client is not None, "use 'async with Subscriber(...)'"
        start = len(self.received)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while True:
                    message = await anext(aiter(self._client.messages))
                    self.received.append(self._convert(message))
        return self.received[start:]

    @staticmethod
    def _convert(message: aiomqtt.Message) -> Received:
        return Received(
            topic=message.topic.value,
            payload=_payload_bytes(message.payload),
            qos=message.qos,
            retain=message.retain,
        )


async def collect_messages(
    url: str,
    topic_filter: str,
    count: int,
    timeout: float,
    *,
    ready: asyncio.Event | None = None,
) -> list[tuple[str, bytes]]:
    """Subscribe (QoS 1) and return the first ``count`` messages as (topic, payload).

    When run as a task next to the code that publishes, pass ``ready`` and wait for it before
    publishing: it is set once the broker acknowledged the subscription. Raises ``TimeoutError``.
    """
    async with Subscriber(url, topic_filter) as subscriber:
        if ready is not None:
            ready.set()
        received = await subscriber.collect(count, timeout)
    return [(r.topic, r.payload) for r in received]


def missing_service(reason: str) -> None:
    """Skip the test, or fail it when ``REQUIRE_SERVICES=1`` (CI must not silently skip)."""
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (REQUIRE_SERVICES=1)")
    pytest.skip(reason)
