"""What a hostile or broken client can cost (issue 21), in one process over TCP with short limits.

The same findings are shown at full size against the `iso-gateway serve` process in tests/adversarial.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from brokers import missing_service
from harness import IsoClient, LogCapture, gateway_settings, hold_commits, running_gateway

from gateway.adapters.ledger import SqliteLedger
from gateway.app import GatewayApp


async def _gateway(tmp_path: Path, mqtt_broker_url: str, logs: LogCapture | None = None, **overrides: Any
                   ) -> AsyncIterator[GatewayApp]:  # fmt: skip
    settings = gateway_settings(tmp_path, mqtt_broker_url, mqtt_topic_prefix=f"test/{tmp_path.name}", **overrides)
    async with running_gateway(settings, logs) as app:
        yield app


@pytest.fixture
async def gateway(tmp_path: Path, mqtt_broker_url: str) -> AsyncIterator[GatewayApp]:
    limits = {"frame_timeout_s": 0.5, "write_timeout_s": 1.0, "unsent_bytes": 4096}
    async for app in _gateway(tmp_path, mqtt_broker_url, limits=limits, max_connections=20):
        yield app


async def closed_by_gateway(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything the gateway still sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout)


async def test_nothing_after_an_unreadable_frame_is_decided_and_what_came_before_is_answered(
    gateway: GatewayApp,
) -> None:
    pos = await IsoClient.connect(gateway.port)
    first, second = {3: "000000", **pos.base(1_000)}, {3: "000000", **pos.base(2_000)}
    unreadable = struct.pack(">H", 4) + b"\xff" * 4
    pos.writer.write(pos.frame("0200", first) + unreadable + pos.frame("0200", second))
    await pos.writer.drain()
    answer = await pos.read()
    assert (answer[0], answer[1][11], answer[1][39]) == ("0210", first[11], "00")
    assert await closed_by_gateway(pos.reader) == b""
    await pos.close()
    assert gateway.ledger is not None
    assert [t.stan for t in await gateway.ledger.all_txns()] == [first[11]]


async def test_a_request_whose_connection_went_away_before_its_answer_is_listed_as_unanswered(
    gateway: GatewayApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(gateway.ledger, SqliteLedger) and gateway.service is not None
    pos = await IsoClient.connect(gateway.port)
    answered = await pos.sale(500)
    await asyncio.sleep(0.2)  # its delivery is confirmed (acknowledged by this client's TCP)
    await gateway.service.drain_answered()  # its mark is written: the next commit is the lost request's
    committing, release = hold_commits(gateway.ledger, monkeypatch)
    lost = {3: "000000", **pos.base(700)}
    pos.writer.write(pos.frame("0200", lost))
    await pos.writer.drain()
    assert await asyncio.to_thread(committing.wait, 5)  # decided, its commit under way
    sock = pos.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pos.writer.transport.abort()  # the terminal is gone (a reset, not a half-close) before the answer
    await asyncio.sleep(0.2)
    release.set()
    for _ in range(100):
        if lost[11] in {t.stan for t in await gateway.ledger.all_txns()}:
            break
        await asyncio.sleep(0.02)
    await gateway.service.drain_answered()
    unanswered = await gateway.ledger.unanswered(recorded_before=time_now_plus(60))
    assert [t.stan for t in unanswered] == [lost[11]]
    assert answered[11] not in {t.stan for t in unanswered}
    again = await IsoClient.connect(gateway.port)
    assert (await again.reverse({**lost, 3: "000000"}))[39] == "00"  # the terminal's reversal finds it
    await again.close()


def time_now_plus(seconds: float) -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_a_client_that_does_not_read_its_answers_is_no_longer_read_and_then_closed(gateway: GatewayApp) -> None:
    assert gateway.ledger is not None and gateway.server is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.transport.pause_reading()  # never reads: its answers fill the sockets, then the gateway's buffer
    pos = IsoClient(reader, writer, "iso87-binary")
    sent = 60_000  # about 6 MB of requests, more than the sockets between the two ends hold
    writer.write(b"".join(pos.frame("0200", {3: "000000", **pos.base(100)}) for _ in range(sent)))
    decided, previous = 0, -1
    async with asyncio.timeout(20):
        while decided != previous:  # until the gateway stops taking requests from it
            previous = decided
            await asyncio.sleep(1.0)
            decided = len(await gateway.ledger.all_txns())
        while gateway.server.connections:  # then closes it: it took no answer for write_timeout_s  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    # booked but never delivered: at most GATEWAY_LIMITS__UNSENT_BYTES (64 KiB) of answers the client's TCP
    # has not acknowledged, and what its receive buffer (128 KiB) acknowledged: about 1,250 sales here.
    # Counting only the transport's own buffer, the kernel's send queue took 4 MB of answers: 41,000 sales.
    assert 0 < decided <= 3_000
    bystander = await IsoClient.connect(gateway.port)
    assert (await bystander.sale(100))[39] == "00"
    await bystander.close()
    writer.transport.abort()


async def test_a_frame_dripped_byte_by_byte_slower_than_the_frame_deadline_closes_the_connection(
    gateway: GatewayApp,
) -> None:
    pos = await IsoClient.connect(gateway.port)
    frame = pos.frame("0200", {3: "000000", **pos.base(100)})
    started = time.monotonic()
    for byte in frame:
        pos.writer.write(bytes([byte]))
        await pos.writer.drain()
        await asyncio.sleep(0.2)
        if pos.reader.at_eof():
            break
    assert pos.reader.at_eof(), "the gateway waited for the whole dripped frame"
    assert time.monotonic() - started < 5


async def test_a_full_pool_of_idle_connections_makes_room_for_a_terminal_and_keeps_proven_ones(
    gateway: GatewayApp,
) -> None:
    proven = await IsoClient.connect(gateway.port)
    assert (await proven.sale(100))[39] == "00"
    idle = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(30)]  # more than 20 slots
    newcomer = await IsoClient.connect(gateway.port)
    assert (await newcomer.sale(200))[39] == "00"
    assert (await proven.sale(300))[39] == "00"  # never evicted
    evicted = sum(reader.at_eof() for reader, _ in idle)
    assert evicted >= 10
    for _, writer in idle:
        writer.close()
    await proven.close()
    await newcomer.close()


async def test_connections_from_one_address_are_capped(tmp_path: Path, mqtt_broker_url: str) -> None:
    async for app in _gateway(tmp_path, mqtt_broker_url, limits={"per_address": 2}):
        first, second = await IsoClient.connect(app.port), await IsoClient.connect(app.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        assert await closed_by_gateway(reader) == b""
        writer.close()
        assert (await first.sale(100))[39] == "00" and (await second.sale(100))[39] == "00"
        await first.close()
        await second.close()


# -- TLS: handshakes count, and a client certificate names its terminals ----------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate with CN=TERM0001."""
    if shutil.which("openssl") is None:
        missing_service("the openssl command is not installed")
    pki = tmp_path / "pki"
    pki.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA", cwd=pki)
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=TERM0001")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", cwd=pki)  # fmt: skip
    return pki


async def test_a_client_certificate_acts_only_as_the_terminal_it_names(
    tmp_path: Path, mqtt_broker_url: str, pki: Path
) -> None:
    tls = {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"), "client_ca": str(pki / "ca.crt")}
    async for app in _gateway(tmp_path, mqtt_broker_url, tls=tls, limits={"handshake_timeout_s": 0.5}):
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.check_hostname = False
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port, ssl=context)
        pos = IsoClient(reader, writer, "iso87-binary")
        assert (await pos.sale(100))[39] == "00"
        assert (await pos.sale(100, terminal="TERM0002"))[39] == "58"
        # a handshake left half-open counts as a connection and is closed at its deadline
        half_reader, half_writer = await asyncio.open_connection("127.0.0.1", app.port)
        assert await closed_by_gateway(half_reader) == b""
        half_writer.close()
        await pos.close()
