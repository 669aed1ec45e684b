"""A gateway on a free port and a minimal ISO 8583 client, for integration and end-to-end tests.

The client encodes with pyiso8583's own built-in specs (``default`` / ``default_ascii``), not with
the gateway's codec, so that a codec bug cannot cancel itself out.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import iso8583
import iso8583.specs

from gateway.adapters.ledger import SqliteLedger
from gateway.app import GatewayApp
from gateway.config import Settings, load_settings
from gateway.core.policy import Policy
from gateway.protocol.message import Message
from gateway.protocol.profile import load_profile
from gateway.service import GatewayService, Ledger, Recorder, ServiceConfig

CARD = "4761739001010119"
OTHER_CARD = "4111111111111111"
MERCHANT = "MERCHANT0000001"
TERMINAL = "TERM0001"


def purchase(stan: str) -> Message:
    """A 0200 purchase of 10.00 from TERMINAL, as the service receives it once decoded."""
    return Message(
        "0200",
        {2: CARD, 3: "000000", 4: "000000001000", 7: "1122101010", 11: stan, 12: "101010", 13: "1122",
         41: TERMINAL, 42: MERCHANT, 49: "840"},
    )  # fmt: skip


def service_on(ledger: Ledger, recorder: Recorder | None = None) -> GatewayService:
    """The gateway's service over ``ledger``, without a server around it (answered records are marked
    only when the test calls ``flush_answered``: the ledger runs no job the test did not ask for)."""
    config = ServiceConfig("test", "test/corrections", b"test-key", Policy())
    return GatewayService(load_profile("iso87-binary"), ledger, config, recorder=recorder, answered_flush_s=3600)


async def on_connection(ledger: SqliteLedger, fn: Any) -> Any:
    """``fn(connection)`` on the SQLite ledger's connection, in a transaction of the writer's."""

    async def work(db: Any) -> Any:
        return fn(db.conn)

    return await ledger.run(work)


def hold_commits(ledger: SqliteLedger, patch: Any) -> tuple[threading.Event, threading.Event]:
    """Make each of ``ledger``'s commits wait, on the commit thread, until ``release`` is set;
    ``committing`` is set once one waits. ``patch`` is pytest's ``monkeypatch``. Returns
    ``(committing, release)``."""
    committing, release = threading.Event(), threading.Event()
    on_thread = ledger._on_thread

    def held(fn: Any, *args: Any) -> Any:
        if args != ("COMMIT",):
            return on_thread(fn, *args)

        def commit() -> Any:
            committing.set()
            assert release.wait(10)
            return fn(*args)

        return on_thread(commit)

    patch.setattr(ledger, "_on_thread", held)
    return committing, release


_STANS = itertools.count(1)


class IsoClient:
    """One terminal connection. ``send`` one request and read its answer; STANs count up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, profile: str) -> None:
        self.reader = reader
        self.writer = writer
        self.profile = profile
        self.spec = iso8583.specs.default if profile == "iso87-binary" else iso8583.specs.default_ascii
        self._stan = _STANS  # shared by every client of the test run: no two requests reuse a STAN

    @classmethod
    async def connect(cls, port: int, profile: str = "iso87-binary", host: str = "127.0.0.1") -> IsoClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, profile)

    def next_stan(self) -> str:
        return f"{next(self._stan) % 1_000_000:06d}"

    def frame(self, mti: str, fields: dict[int, str]) -> bytes:
        doc: dict[str, str] = {"t": mti, **{str(k): v for k, v in fields.items()}}
        raw, _ = iso8583.encode(doc, self.spec)
        if self.profile == "iso87-ascii":
            return f"{len(raw):04d}".encode() + bytes(raw)
        return struct.pack(">H", len(raw)) + bytes(raw)

    async def read(self, timeout: float = 10.0) -> tuple[str, dict[int, str]]:
        if self.profile == "iso87-ascii":
            size = int(await asyncio.wait_for(self.reader.readexactly(4), timeout))
        else:
            size = struct.unpack(">H", await asyncio.wait_for(self.reader.readexactly(2), timeout))[0]
        body = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        doc, _ = iso8583.decode(body, self.spec)
        fields = {int(k): v for k, v in doc.items() if k not in ("t", "p", "1", "h")}
        return doc["t"], fields

    async def send(self, mti: str, fields: dict[int, str], timeout: float = 10.0) -> tuple[str, dict[int, str]]:
        self.writer.write(self.frame(mti, fields))
        await self.writer.drain()
        return await self.read(timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()

    # ------------------------------------------------------------ requests by meaning

    def base(
        self,
        amount: int | None,
        *,
        stan: str | None = None,
        pan: str | None = CARD,
        terminal: str = TERMINAL,
        merchant: str = MERCHANT,
        currency: str = "840",
    ) -> dict[int, str]:
        now = datetime.now(UTC)
        fields: dict[int, str] = {
            7: now.strftime("%m%d%H%M%S"),
            11: stan or self.next_stan(),
            12: now.strftime("%H%M%S"),
            13: now.strftime("%m%d"),
            41: terminal,
            42: merchant,
            49: currency,
        }
        if amount is not None:
            fields[4] = f"{amount:012d}"
        if pan is not None:
            fields[2] = pan
        return fields

    async def sale(self, amount: int, **kw: Any) -> dict[int, str]:
        return (await self.send("0200", {3: "000000", **self.base(amount, **kw)}))[1]

    async def preauth(self, amount: int, **kw: Any) -> dict[int, str]:
        return (await self.send("0100", {3: "000000", **self.base(amount, **kw)}))[1]

    async def void(self, rrn: str, amount: int, **kw: Any) -> dict[int, str]:
        return (await self.send("0200", {3: "020000", 37: rrn, **self.base(amount, **kw)}))[1]

    async def refund(self, rrn: str | None, amount: int, **kw: Any) -> dict[int, str]:
        fields = {3: "200000", **self.base(amount, **kw)}
        if rrn is not None:
            fields[37] = rrn
        return (await self.send("0200", fields))[1]

    async def complete(self, preauth: dict[int, str], amount: int, **kw: Any) -> dict[int, str]:
        de90 = "0100" + preauth[11] + preauth[7] + "0" * 22
        return (await self.send("0220", {3: "000000", 90: de90, **self.base(amount, **kw)}))[1]

    async def reverse(
        self,
        original: dict[int, str],
        *,
        mti: str = "0400",
        original_mti: str = "0200",
        partial: int | None = None,
        **kw: Any,
    ) -> dict[int, str]:
        de90 = original_mti + original[11] + original[7] + "0" * 22
        fields = {3: original.get(3, "000000"), 90: de90, **self.base(int(original.get(4, "0")), **kw)}
        if partial is not None:
            fields[95] = f"{partial:012d}" + "0" * 30
        return (await self.send(mti, fields))[1]

    async def settle(self, credits: tuple[int, int], debits: tuple[int, int], **kw: Any) -> dict[int, str]:
        fields = {3: "920000", **self.base(None, pan=None, **kw)}
        fields.update(
            {74: f"{credits[0]:010d}", 86: f"{credits[1]:016d}", 76: f"{debits[0]:010d}", 88: f"{debits[1]:016d}"}
        )
        return (await self.send("0500", fields))[1]


def gateway_settings(tmp_path: Path, mqtt_url: str = "embedded", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}",
        "mqtt_url": mqtt_url,
        "mqtt": {"embedded_listen": "127.0.0.1:0"},
        "instance_id": "test-gw",
        "pan_hmac_key": "test-key",
    }
    values.update(overrides)
    return load_settings(**values)


class LogCapture(io.StringIO):
    """Collects the gateway's JSON log lines."""

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, logs: LogCapture | None = None, clock: Any = None
) -> AsyncIterator[GatewayApp]:
    from gateway.logs import configure_logging

    configure_logging("info", "json", stream=logs if logs is not None else io.StringIO())
    app = GatewayApp(settings, clock=clock)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> None:
        from datetime import timedelta

        self.current += timedelta(**delta)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """``python -m gateway serve`` on a free port; ``env`` adds or overrides environment variables."""

    def __init__(
        self, tmp_path: Path, mqtt_url: str, profile: str = "iso87-binary", env: dict[str, str] | None = None
    ) -> None:
        self.port = _free_port()
        self.log_path = tmp_path / f"gateway-{profile}.log"
        self.db = tmp_path / "ledger.db"
        self.env = {
            **os.environ,
            "GATEWAY_LISTEN": f"127.0.0.1:{self.port}",
            "GATEWAY_PROFILE": profile,
            "GATEWAY_LEDGER_URL": f"sqlite:///{self.db}",
            "GATEWAY_MQTT_URL": mqtt_url,
            "GATEWAY_MQTT_TOPIC_PREFIX": f"e2e/{tmp_path.name}",
            "GATEWAY_PAN_HMAC_KEY": "e2e-key",
            "GATEWAY_LOG_FORMAT": "json",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("gateway did not start listening")

    def run_to_exit(self, env: dict[str, str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``iso-gateway serve`` with these extra variables until it exits by itself (a start that
        fails); stdout and stderr are captured apart."""
        return subprocess.run(
            [sys.executable, "-m", "gateway", "serve"],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def signal(self, sig: int) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=20)

    def kill(self) -> None:
        """Stop the process at once if it still runs (test clean-up)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def logs(self) -> str:
        return self.log_path.read_text()
