"""The outbox relay against a real broker (Mosquitto when installed, and the embedded one).

The outbox here is a small in-memory implementation of the ``Outbox`` port (the contract the
SQLite and PostgreSQL ledgers implement), not a mock: the relay is driven exactly as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from brokers import (
    MosquittoBroker,
    Received,
    Subscriber,
    async_wait_until,
    free_port,
    missing_service,
    mosquitto_binary,
)

from gateway.adapters.broker import EmbeddedBroker
from gateway.adapters.mqtt import OutboxRelay, parse_mqtt_url
from gateway.core.events import BalanceInfo, CorrectionEvent, OriginalInfo, RequestInfo
from gateway.events import event_subject, render_event
from gateway.ports import OutboxRow, OutboxStatus

FULL_PAN = "4761739001010119"


class ManualClock:
    """A ``Clock`` the test sets and advances."""

    def __init__(self, now: datetime | None = None) -> None:
        self.current = now or datetime(2026, 11, 22, 10, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> None:
        self.current += delta


@dataclass
class _Stored:
    row: OutboxRow
    sent_at: datetime | None = None


class InMemoryOutbox:
    """The ``Outbox`` port over a list; records errors with their monotonic time for backoff checks."""

    def __init__(self) -> None:
        self._rows: dict[int, _Stored] = {}
        self._next_id = 1
        self.errors: list[tuple[str, datetime, float]] = []
        self.last_sent_at: datetime | None = None

    def add(self, event_id: str, topic: str, payload: bytes, ordering_key: str, created_at: datetime) -> int:
        row_id = self._next_id
        self._next_id += 1
        self._rows[row_id] = _Stored(OutboxRow(row_id, event_id, topic, payload, ordering_key, created_at))
        return row_id

    def unsent_ids(self) -> list[int]:
        return [i for i, s in sorted(self._rows.items()) if s.sent_at is None]

    def sent_at(self, row_id: int) -> datetime | None:
        return self._rows[row_id].sent_at

    def ids(self) -> list[int]:
        return sorted(self._rows)

    async def pending(self, limit: int) -> Sequence[OutboxRow]:
        return [s.row for _, s in sorted(self._rows.items()) if s.sent_at is None][:limit]

    async def mark_sent(self, ids: Sequence[int], sent_at: datetime) -> None:
        for row_id in ids:
            self._rows[row_id].sent_at = sent_at
        self.last_sent_at = sent_at

    async def record_error(self, message: str, at: datetime) -> None:
        self.errors.append((message, at, time.monotonic()))

    async def prune(self, sent_before: datetime) -> int:
        old = [i for i, s in self._rows.items() if s.sent_at is not None and s.sent_at < sent_before]
        for row_id in old:
            del self._rows[row_id]
        return len(old)

    async def status(self) -> OutboxStatus:
        unsent = [s.row.created_at for s in self._rows.values() if s.sent_at is None]
        last = self.errors[-1] if self.errors else None
        return OutboxStatus(
            pending=len(unsent),
            oldest_pending_at=min(unsent, default=None),
            last_error=last[0] if last else None,
            last_error_at=last[1] if last else None,
            last_sent_at=self.last_sent_at,
        )


class RecordingLogger:
    """A structlog-shaped logger that keeps what the relay logs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    def events(self) -> list[str]:
        return [event for event, _ in self.lines]


async def max_loop_lag(seconds: float, tick: float = 0.01) -> float:
    """The worst lateness of a 10 ms timer over ``seconds``: how blocked the event loop was."""
    worst = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        await asyncio.sleep(tick)
        worst = max(worst, time.perf_counter() - started - tick)
    return worst


def first_deliveries(
    received: Sequence[Received], already: Sequence[tuple[str, bytes]] = ()
) -> list[tuple[str, bytes]]:
    """What a consumer that de-duplicates on the CloudEvents id keeps, in arrival order."""
    seen = {orjson.loads(payload)["id"] for _, payload in already}
    kept = []
    for message in received:
        event_id = orjson.loads(message.payload)["id"]
        if event_id not in seen:
            seen.add(event_id)
            kept.append((message.topic, message.payload))
    return kept


def correction(seq: int, *, merchant: str = "MERCHANT0000001", terminal: str = "TERM0001") -> CorrectionEvent:
    """A refund approval against original ``seq`` (a full PAN on purpose: rendering masks it)."""
    rrn = f"6330120{seq:05d}"
    return CorrectionEvent(
        kind="refund",
        outcome="approved" if seq % 3 else "declined",
        merchant_id=merchant,
        terminal_id=terminal,
        response_code="00" if seq % 3 else "64",
        reason=None if seq % 3 else "exceeds_refundable",
        subject_rrn=rrn,
        request=RequestInfo("0200", f"{seq:06d}", f"7330120{seq:05d}", 100, "840", FULL_PAN),
        original=OriginalInfo(
            "0200", f"{seq:06d}", rrn, "A1B2C3", 1000, "840", "000001", datetime(2026, 11, 22, 9, tzinfo=UTC)
        ),
        balance=BalanceInfo(1000, 100, 0, 900, "partially_refunded"),
    )


def enqueue(outbox: InMemoryOutbox, fact: CorrectionEvent, prefix: str, clock: ManualClock) -> tuple[str, bytes]:
    event_id = f"evt-{len(outbox.ids()) + 1:04d}-{fact.subject_rrn}"
    topic, payload = render_event(fact, event_id=event_id, instance_id="test", time=clock.now(), topic_prefix=prefix)
    outbox.add(event_id, topic, payload, event_subject(fact), clock.now())
    return topic, payload


@pytest.fixture(params=["shared", "embedded"])
async def broker_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The session's broker (Mosquitto when installed), and the gateway's embedded broker."""
    if request.param == "shared":
        yield request.getfixturevalue("mqtt_broker_url")
        return
    broker = EmbeddedBroker("127.0.0.1", 0)
    await broker.start()
    try:
        yield broker.url
    finally:
        await broker.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def outbox() -> InMemoryOutbox:
    return InMemoryOutbox()


@pytest.fixture
def relay_log() -> RecordingLogger:
    return RecordingLogger()


class RunningRelay:
    def __init__(self, relay: OutboxRelay) -> None:
        self.relay = relay
        self.task = asyncio.create_task(relay.run())

    async def stop(self) -> None:
        self.task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def start_relay(outbox: InMemoryOutbox, clock: ManualClock, relay_log: RecordingLogger) -> AsyncIterator[Any]:
    running: list[RunningRelay] = []

    def start(url: str, **options: Any) -> OutboxRelay:
        options.setdefault("client_id", f"relay-{len(running)}-{time.monotonic_ns()}")
        relay = OutboxRelay(outbox, url=url, clock=clock, logger=relay_log, **options)
        running.append(RunningRelay(relay))
        return relay

    yield start
    for item in running:
        await item.stop()


async def test_pending_events_arrive_in_id_order_with_qos_1_on_their_topics_and_are_marked_sent(
    broker_url: str, topic_prefix: str, outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    facts = [correction(i, terminal=f"TERM000{i % 3}") for i in range(1, 41)]
    expected = [enqueue(outbox, fact, topic_prefix, clock) for fact in facts]

    async with Subscriber(broker_url, f"{topic_prefix}/#") as subscriber:
        relay = start_relay(broker_url, batch_size=16)
        received = await subscriber.collect(len(expected), timeout=10)
        extra = await subscriber.extra(within=0.2)

    assert [(r.topic, r.payload) for r in received] == expected
    assert {r.qos for r in received} == {1}
    assert extra == []
    await async_wait_until(lambda: outbox.unsent_ids() == [], 5, "every row marked sent")
    assert relay.stats.published == len(expected)
    assert relay.stats.connected
    assert relay.stats.last_published_at == clock.now()


async def test_notify_publishes_at_once_without_waiting_for_the_poll_interval(
    broker_url: str, topic_prefix: str, outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    async with Subscriber(broker_url, f"{topic_prefix}/#") as subscriber:
        relay = start_relay(broker_url, poll_interval=30.0)
        await async_wait_until(lambda: relay.stats.connected, 5, "the relay to connect")
        await asyncio.sleep(0.05)  # let it go idle: its first outbox query found nothing
        latencies = []
        for i in range(1, 6):
            enqueue(outbox, correction(i), topic_prefix, clock)
            started = time.perf_counter()
            relay.notify()
            await subscriber.collect(i, timeout=2)
            latencies.append(time.perf_counter() - started)

    assert max(latencies) < 1.0, latencies  # the poll interval is 30 s


async def test_a_stopped_broker_leaves_rows_pending_and_recorded_errors_then_everything_is_delivered(
    mosquitto: MosquittoBroker,
    topic_prefix: str,
    outbox: InMemoryOutbox,
    clock: ManualClock,
    start_relay: Any,
    relay_log: RecordingLogger,
) -> None:
    consumer = f"backoffice-{topic_prefix.rsplit('/', 1)[-1]}"
    before = [enqueue(outbox, correction(i), topic_prefix, clock) for i in range(1, 4)]
    async with Subscriber(mosquitto.url, f"{topic_prefix}/#", client_id=consumer, clean_session=False) as sub:
        relay = start_relay(mosquitto.url)
        assert [(r.topic, r.payload) for r in await sub.collect(3, timeout=5)] == before
        await async_wait_until(lambda: outbox.unsent_ids() == [], 5, "the first rows marked sent")
    mosquitto.stop()  # the consumer is offline too; its persistent session is saved with the broker
    await async_wait_until(lambda: not relay.stats.connected, 5, "the relay to see the outage")

    # while the broker is down: the outbox keeps growing, the relay keeps retrying, the loop stays free
    probe = asyncio.create_task(max_loop_lag(seconds=1.0))
    during = []
    for i in range(4, 14):
        during.append(enqueue(outbox, correction(i), topic_prefix, clock))
        relay.notify()
    errors_before = len(outbox.errors)
    await async_wait_until(lambda: len(outbox.errors) >= errors_before + 3, 10, "three more failed attempts")
    assert await probe < 0.1
    assert len(outbox.unsent_ids()) == 10
    status = await outbox.status()
    assert status.pending == 10
    assert status.last_error is not None
    assert status.last_error.startswith(f"cannot connect to {mosquitto.url}")
    assert relay.stats.last_error == status.last_error
    assert "outbox.error" in relay_log.events()

    mosquitto.start()
    async with Subscriber(mosquitto.url, f"{topic_prefix}/#", client_id=consumer, clean_session=False) as sub:
        received = await sub.collect(10, timeout=10)
        while len(first_deliveries(received, already=before)) < 10:  # duplicates came first
            received = await sub.collect(len(received) + 1, timeout=10)
    await async_wait_until(lambda: outbox.unsent_ids() == [], 5, "the outage's rows marked sent")

    # at least once: the consumer may see an earlier event again and de-duplicates on its id
    assert first_deliveries(received, already=before) == during
    assert relay.stats.connected
    assert relay.stats.published == 13


async def test_an_unreachable_broker_is_retried_with_a_doubling_delay(
    outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any, relay_log: RecordingLogger
) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    enqueue(outbox, correction(1), "test/unreachable", clock)

    relay = start_relay(url)
    await async_wait_until(lambda: len(outbox.errors) >= 5, 10, "five failed attempts")

    gaps = [b[2] - a[2] for a, b in zip(outbox.errors, outbox.errors[1:], strict=False)]
    assert gaps[0] >= 0.1
    assert all(later > earlier * 1.5 for earlier, later in itertools.pairwise(gaps)), gaps
    assert [kw["retry_in"] for e, kw in relay_log.lines if e == "outbox.error"][:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert outbox.unsent_ids() == [1]
    assert not relay.stats.connected
    assert relay.stats.errors >= 5


async def test_cancelling_the_relay_stops_it_promptly_even_while_the_broker_is_down(
    outbox: InMemoryOutbox, clock: ManualClock
) -> None:
    relay = OutboxRelay(outbox, url=f"mqtt://127.0.0.1:{free_port()}", client_id="c", clock=clock)
    task = asyncio.create_task(relay.run())
    await async_wait_until(lambda: len(outbox.errors) >= 2, 5, "two failed attempts")

    task.cancel()
    async with asyncio.timeout(2):
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


async def test_the_relay_stops_even_when_a_library_swallows_its_cancellation(
    outbox: InMemoryOutbox, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Python 3.11's ``asyncio.wait_for`` in aiomqtt's disconnect does when the broker's goodbye and
    the cancellation arrive together: the session returns as if nothing was asked."""
    relay = OutboxRelay(outbox, url=f"mqtt://127.0.0.1:{free_port()}", client_id="c", clock=clock)
    sessions = 0

    async def swallowing_session() -> None:
        nonlocal sessions
        sessions += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)

    monkeypatch.setattr(relay, "_session", swallowing_session)
    task = asyncio.create_task(relay.run())
    await async_wait_until(lambda: sessions == 1, 5, "the session")

    task.cancel()
    await asyncio.wait({task}, timeout=2)  # (a relay that reconnects forever cannot be awaited)
    assert task.cancelled() and sessions == 1


async def test_sent_rows_older_than_the_retention_are_pruned_and_recent_ones_kept(
    mqtt_broker_url: str, topic_prefix: str, outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    for i in range(1, 5):
        enqueue(outbox, correction(i), topic_prefix, clock)
    await outbox.mark_sent([1, 2], clock.now() - timedelta(days=8))
    await outbox.mark_sent([3], clock.now() - timedelta(days=6))

    start_relay(mqtt_broker_url, retention=timedelta(days=7), prune_interval=0.05)
    await async_wait_until(lambda: outbox.ids() == [3, 4] and outbox.unsent_ids() == [], 5, "rows 1-2 pruned")

    clock.advance(timedelta(days=2))  # row 3 now 8 days old, row 4 two days
    await async_wait_until(lambda: outbox.ids() == [4], 5, "row 3 pruned")


async def test_the_relay_logs_what_it_did_but_never_payload_content(
    mqtt_broker_url: str,
    topic_prefix: str,
    outbox: InMemoryOutbox,
    clock: ManualClock,
    start_relay: Any,
    relay_log: RecordingLogger,
) -> None:
    for i in range(1, 4):
        enqueue(outbox, correction(i), topic_prefix, clock)

    relay = start_relay(mqtt_broker_url)
    await async_wait_until(lambda: relay.stats.published == 3, 5, "three rows published")

    assert "outbox.connected" in relay_log.events()
    published = [kw for event, kw in relay_log.lines if event == "outbox.published"]
    assert sum(kw["count"] for kw in published) == 3
    logged = repr(relay_log.lines)
    for forbidden in ("476173", FULL_PAN, "evt-", "MERCHANT0000001", "refund"):
        assert forbidden not in logged


async def test_a_full_batch_in_flight_is_not_reported_as_a_client_warning(
    mqtt_broker_url: str,
    topic_prefix: str,
    outbox: InMemoryOutbox,
    clock: ManualClock,
    start_relay: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch keeps batch_size publishes in flight on purpose; the MQTT client must not warn about
    it once per publish (those warnings reached the gateway's log, one line per event)."""
    for i in range(1, 121):
        enqueue(outbox, correction(i), topic_prefix, clock)
    with caplog.at_level(logging.WARNING):
        relay = start_relay(mqtt_broker_url, batch_size=60)
        await async_wait_until(lambda: relay.stats.published == 120, 10, "every row published")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class FakeBroker:
    """A minimal MQTT 3.1.1 broker for what a real broker cannot be made to do on demand: stop
    acknowledging mid-batch (``acks``: PUBACKs sent on the first connection, all on later ones),
    refuse the connection (``connack``), never answer PINGREQ, or send each PUBACK byte by byte."""

    def __init__(
        self, acks: int | None = None, *, connack: int = 0, answer_pings: bool = True, trickle: bool = False
    ) -> None:
        self.acks = acks
        self.connack = connack
        self.answer_pings = answer_pings
        self.trickle = trickle
        self.connections = 0
        self.connects: list[bytes] = []  #: CONNECT bodies
        self.pings = 0
        self.published: list[tuple[int, bytes]] = []  #: (connection number, payload)
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"mqtt://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> FakeBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        number = self.connections
        acked = 0
        try:
            while True:
                header = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = header >> 4
                if kind == 1:  # CONNECT
                    self.connects.append(body)
                    writer.write(bytes((0x20, 0x02, 0x00, self.connack)))
                elif kind == 3:  # PUBLISH, QoS 1 from the relay
                    topic_len = int.from_bytes(body[:2], "big")
                    packet_id = body[2 + topic_len : 4 + topic_len]
                    self.published.append((number, body[4 + topic_len :]))
                    if self.acks is None or number > 1 or acked < self.acks:
                        acked += 1
                        puback = b"\x40\x02" + packet_id
                        if self.trickle:
                            for i in range(len(puback)):
                                writer.write(puback[i : i + 1])
                                await writer.drain()
                                await asyncio.sleep(0.002)
                        else:
                            writer.write(puback)
                elif kind == 12:  # PINGREQ
                    self.pings += 1
                    if self.answer_pings:
                        writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_batch_whose_acknowledgements_stop_marks_the_acknowledged_prefix_and_publishes_the_rest_again(
    topic_prefix: str, outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    expected = [enqueue(outbox, correction(i), topic_prefix, clock) for i in range(1, 11)]
    async with FakeBroker(acks=4) as broker:
        relay = start_relay(broker.url, batch_size=10, publish_timeout=0.5)
        await async_wait_until(lambda: len(outbox.errors) >= 1, 5, "the batch to time out")
        # the first four were acknowledged and are marked sent; the other six are still pending
        assert outbox.unsent_ids() == list(range(5, 11))
        assert "timed out" in outbox.errors[0][0]
        await async_wait_until(lambda: outbox.unsent_ids() == [], 10, "the rest published after reconnecting")
    assert relay.stats.published == 10
    first = [payload for number, payload in broker.published if number == 1]
    again = [payload for number, payload in broker.published if number == 2]
    assert first == [payload for _, payload in expected]  # the whole batch left, in id order
    assert again == [payload for _, payload in expected[4:]]  # only the unacknowledged rest, in order


async def test_a_whole_batch_is_on_the_wire_before_any_acknowledgement(
    topic_prefix: str, outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    """All of a batch leaves at once (the MQTT client's own default would hold back all but 20 until
    PUBACKs free their places): a broker that acknowledges nothing still receives every row."""
    expected = [enqueue(outbox, correction(i), topic_prefix, clock) for i in range(1, 51)]
    async with FakeBroker(acks=0) as broker:
        start_relay(broker.url, batch_size=50, publish_timeout=1.0)
        await async_wait_until(lambda: len(outbox.errors) >= 1, 5, "the batch to time out")
        first = [payload for number, payload in broker.published if number == 1]
    assert first == [payload for _, payload in expected]
    assert outbox.unsent_ids() == list(range(1, 51))  # nothing acknowledged, nothing marked


def test_broker_urls_are_parsed_with_their_default_ports_and_never_show_the_password() -> None:
    plain = parse_mqtt_url("mqtt://broker.example")
    secure = parse_mqtt_url("mqtts://gw%40acme:s3cr%2Ft@broker.example")
    ipv6 = parse_mqtt_url("mqtt://[::1]:1884")

    assert (plain.host, plain.port, plain.tls) == ("broker.example", 1883, False)
    assert (secure.port, secure.tls, secure.username, secure.password) == (8883, True, "gw@acme", "s3cr/t")
    assert str(secure) == "mqtts://gw@acme:***@broker.example:8883"
    assert "s3cr" not in repr(secure)
    assert str(ipv6) == "mqtt://[::1]:1884"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://user:hunter2@host", "unsupported MQTT URL scheme 'http'"),
        ("mqtt://user:hunter2@:1883", "has no host"),
        ("mqtt://user:hunter2@host:99999", "invalid port"),
        ("mqtt://user:hunter2@host:1883/topic", "must not have a path"),
        ("embedded", "unsupported MQTT URL scheme ''"),
    ],
)
def test_a_bad_broker_url_is_refused_without_echoing_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_mqtt_url(url)
    assert "hunter2" not in str(caught.value)


def test_tls_settings_on_a_plain_mqtt_url_are_refused(outbox: InMemoryOutbox, clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="use mqtts://"):
        OutboxRelay(outbox, url="mqtt://host", client_id="c", clock=clock, tls_ca="/etc/ssl/ca.pem")


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A private CA and a server certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        missing_service("the openssl command is not installed")
    pki = tmp_path / "pki"
    pki.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA", cwd=pki)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=pki)
    (pki / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext",
        cwd=pki,
    )  # fmt: skip
    return {"ca": pki / "ca.crt", "cert": pki / "server.crt", "key": pki / "server.key"}


@pytest.fixture
def tls_mosquitto(tmp_path: Path, tls_files: dict[str, Path]) -> Iterator[tuple[MosquittoBroker, int]]:
    """Mosquitto with a plain listener (for the test's subscriber) and a TLS one (for the relay)."""
    binary = mosquitto_binary()
    if binary is None:
        missing_service("mosquitto is not installed")
        raise AssertionError("unreachable")
    tls_port = free_port()
    extra = (
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {tls_files['ca']}\ncertfile {tls_files['cert']}\nkeyfile {tls_files['key']}\n"
    )
    workdir = tmp_path / "mosquitto-tls"
    workdir.mkdir()
    with MosquittoBroker(workdir, binary=binary, persistence=False, extra_config=extra) as broker:
        yield broker, tls_port


async def test_the_relay_publishes_over_mqtts_to_a_broker_signed_by_a_private_ca(
    tls_mosquitto: tuple[MosquittoBroker, int],
    tls_files: dict[str, Path],
    topic_prefix: str,
    outbox: InMemoryOutbox,
    clock: ManualClock,
    start_relay: Any,
) -> None:
    broker, tls_port = tls_mosquitto
    expected = [enqueue(outbox, correction(i), topic_prefix, clock) for i in range(1, 4)]

    async with Subscriber(broker.url, f"{topic_prefix}/#") as subscriber:
        start_relay(f"mqtts://127.0.0.1:{tls_port}", tls_ca=str(tls_files["ca"]))
        received: list[Received] = await subscriber.collect(3, timeout=10)

    assert [(r.topic, r.payload) for r in received] == expected


async def test_the_relay_refuses_a_broker_certificate_it_cannot_verify(
    tls_mosquitto: tuple[MosquittoBroker, int], outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    _, tls_port = tls_mosquitto
    enqueue(outbox, correction(1), "test/tls", clock)

    relay = start_relay(f"mqtts://127.0.0.1:{tls_port}")  # system CAs only: the private CA is unknown
    await async_wait_until(lambda: len(outbox.errors) >= 2, 10, "two failed attempts")

    assert "certificate verify failed" in outbox.errors[-1][0]
    assert outbox.unsent_ids() == [1]
    assert relay.stats.published == 0


@pytest.mark.timeout(30)  # without the fix the relay never stops: fail in 30 s, not at the suite's limit
async def test_the_relay_stops_when_cancelled_right_after_a_notify(
    mqtt_broker_url: str, topic_prefix: str, outbox: InMemoryOutbox, clock: ManualClock
) -> None:
    """A cancellation arriving while the relay's idle wait is being woken must not be lost (Python
    3.11's ``wait_for`` returns the inner result instead of raising; the relay would then never stop)."""
    for attempt in range(10):
        client_id = f"relay-stop-{attempt}-{time.monotonic_ns()}"
        relay = OutboxRelay(outbox, url=mqtt_broker_url, clock=clock, client_id=client_id)
        task = asyncio.create_task(relay.run())
        await async_wait_until(lambda relay=relay: relay.stats.connected, 5, "the relay to connect")
        await asyncio.sleep(0.05)  # idle: waiting to be notified
        enqueue(outbox, correction(attempt), topic_prefix, clock)
        relay.notify()
        task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(task, return_exceptions=True)


async def test_acknowledgements_arriving_byte_by_byte_complete_the_batch(
    topic_prefix: str, outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    for i in range(1, 6):
        enqueue(outbox, correction(i), topic_prefix, clock)
    async with FakeBroker(trickle=True) as broker:
        relay = start_relay(broker.url, batch_size=5)
        await async_wait_until(lambda: outbox.unsent_ids() == [], 10, "every row marked sent")
    assert relay.stats.published == 5
    assert outbox.errors == []


async def test_a_refused_connection_is_recorded_with_the_brokers_reason_and_retried(
    outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    enqueue(outbox, correction(1), "test/refused", clock)
    loop = asyncio.get_running_loop()
    reported: list[str] = []  # e.g. "Future exception was never retrieved" for a failed connection
    loop.set_exception_handler(lambda _, context: reported.append(str(context.get("message"))))
    try:
        async with FakeBroker(connack=4) as broker:
            url = broker.url.replace("mqtt://", "mqtt://gateway:wrong@")
            start_relay(url)
            await async_wait_until(lambda: len(outbox.errors) >= 2, 10, "two refused attempts")
        gc.collect()
        await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(None)
    assert reported == []
    assert "bad user name or password" in outbox.errors[0][0]
    assert "wrong" not in repr(outbox.errors)
    assert outbox.unsent_ids() == [1]
    # the CONNECT carried the credentials of the URL, a clean session and the keep-alive
    connect = broker.connects[0]
    assert connect[:7] == b"\x00\x04MQTT\x04" and connect[7] == 0x80 | 0x40 | 0x02
    assert connect.endswith(b"\x00\x07gateway\x00\x05wrong")


async def test_a_broker_that_stops_answering_pings_is_taken_for_gone_and_reconnected(
    outbox: InMemoryOutbox, clock: ManualClock, start_relay: Any
) -> None:
    async with FakeBroker(answer_pings=False) as broker:
        relay = start_relay(broker.url, keepalive=1)
        await async_wait_until(lambda: broker.connections >= 2, 10, "the relay to reconnect")
    assert broker.pings >= 1
    assert any("lost: keep alive timeout" in message for message, _, _ in outbox.errors)
    assert relay.stats.errors >= 1


@pytest.mark.parametrize("size", [0, 10_001])
def test_a_batch_size_outside_1_to_10000_is_refused(size: int, outbox: InMemoryOutbox, clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        OutboxRelay(outbox, url="mqtt://127.0.0.1:1883", client_id="x", clock=clock, batch_size=size)
