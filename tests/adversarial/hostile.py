"""What the adversarial tests share: raw frames, hostile sockets, and what the gateway process shows
from outside (its RSS, its ledger file, its log, its command line).

Everything here talks to ``127.0.0.1`` only, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import iso8583
import iso8583.specs
import pytest
from harness import CARD, MERCHANT, TERMINAL, GatewayProcess, IsoClient

SPEC = iso8583.specs.default  # iso87-binary: ASCII data, binary bitmap, 2-byte length header

#: a frame whose message type cannot be read: length 4, then four 0xFF bytes
UNREADABLE_FRAME = struct.pack(">H", 4) + b"\xff" * 4
#: a length header above max_frame_bytes (8 KiB): a framing error
OVERSIZE_HEADER = struct.pack(">H", 0xFFFF)

# Linux TCP states (tcpi_state, the first byte of TCP_INFO)
_TCP_ESTABLISHED = 1
_TCP_CLOSE = 7
_TCP_CLOSE_WAIT = 8


# --------------------------------------------------------------------------- frames


def stamp(moment: datetime | None = None) -> str:
    """DE7 (MMDDhhmmss, UTC)."""
    return (moment or datetime.now(UTC)).strftime("%m%d%H%M%S")


def sale_fields(
    stan: str,
    *,
    amount: int = 1_000,
    terminal: str = TERMINAL,
    merchant: str = MERCHANT,
    pan: str = CARD,
    transmission_time: str | None = None,
) -> dict[int, str]:
    """A 0200 purchase's data elements."""
    now = datetime.now(UTC)
    return {
        2: pan, 3: "000000", 4: f"{amount:012d}", 7: transmission_time or stamp(now), 11: stan,
        12: now.strftime("%H%M%S"), 13: now.strftime("%m%d"), 41: terminal, 42: merchant, 49: "840",
    }  # fmt: skip


def frame(mti: str, fields: dict[int, str]) -> bytes:
    """A framed iso87-binary message, encoded with pyiso8583's own spec (not the gateway's codec)."""
    raw, _ = iso8583.encode({"t": mti, **{str(k): v for k, v in fields.items()}}, SPEC)
    return struct.pack(">H", len(raw)) + bytes(raw)


def sale_frame(stan: str, **kw: Any) -> bytes:
    return frame("0200", sale_fields(stan, **kw))


def echo_frame(stan: str) -> bytes:
    return frame("0800", {7: stamp(), 11: stan, 70: "301"})


class SaleTemplate:
    """Sale frames made fast: one encoded frame whose STAN and terminal id are patched in place
    (a flood needs tens of thousands a second; encoding each with pyiso8583 costs ~20 µs)."""

    def __init__(self, *, amount: int = 100) -> None:
        fields = sale_fields("000000", amount=amount, terminal="FLD00000")
        raw, parts = iso8583.encode({"t": "0200", **{str(k): v for k, v in fields.items()}}, SPEC)
        self.frame = bytearray(struct.pack(">H", len(raw)) + bytes(raw))
        offset, positions = 2, {}
        for key, part in parts.items():
            positions[key] = offset + len(part["len"])
            offset += len(part["len"]) + len(part["data"])
        self.stan_at = positions["11"]
        self.terminal_at = positions["41"]

    def make(self, number: int) -> bytes:
        """The ``number``-th sale: STAN ``number % 10**6``, terminal ``FLD`` + ``number // 10**6``."""
        data = self.frame
        data[self.stan_at : self.stan_at + 6] = b"%06d" % (number % 1_000_000)
        data[self.terminal_at : self.terminal_at + 8] = b"FLD%05d" % (number // 1_000_000)
        return bytes(data)


def split_frames(data: bytes) -> list[tuple[str, dict[int, str]]]:
    """Every complete framed answer in ``data``, decoded (mti, fields)."""
    answers, at = [], 0
    while at + 2 <= len(data):
        (size,) = struct.unpack_from(">H", data, at)
        if at + 2 + size > len(data):
            break
        doc, _ = iso8583.decode(data[at + 2 : at + 2 + size], SPEC)
        answers.append((doc["t"], {int(k): v for k, v in doc.items() if k not in ("t", "p", "1", "h")}))
        at += 2 + size
    return answers


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """Everything the gateway sends until it closes the connection: (data, closed within ``timeout``)."""
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        return bytes(data), False
    except (ConnectionResetError, BrokenPipeError):
        pass
    return bytes(data), True


# --------------------------------------------------------------------------- raw sockets


def raise_open_file_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (gateways started later inherit it);
    skip the test when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def connect(port: int, timeout: float = 5.0, *, receive_buffer: int | None = None) -> socket.socket:
    """A connection to the gateway; ``receive_buffer`` sets SO_RCVBUF before connecting (a small one
    makes a client that does not read show at once, instead of after megabytes of kernel buffers)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def open_connections(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """``count`` connections that send ``first_bytes`` (maybe nothing) and then nothing more."""
    socks = []
    try:
        for _ in range(count):
            sock = connect(port)
            if first_bytes:
                with contextlib.suppress(OSError):
                    sock.sendall(first_bytes)
            socks.append(sock)
    except BaseException:
        close_all(socks)
        raise
    return socks


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the gateway sees the connection die at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        reset(sock)


def tcp_state(sock: socket.socket) -> int:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return _TCP_CLOSE


def closed_by_gateway(sock: socket.socket) -> bool:
    """Whether the gateway closed (FIN) or reset (RST) this connection, without reading from it."""
    return tcp_state(sock) in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


def count_closed(socks: list[socket.socket]) -> int:
    return sum(closed_by_gateway(sock) for sock in socks)


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


async def async_wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


async def settled(pid: int, timeout: float = 5.0) -> int:
    """The gateway's socket count once it stopped changing (it has accepted or closed what it will)."""
    last, stable, deadline = -1, 0, time.monotonic() + timeout
    while stable < 3 and time.monotonic() < deadline:
        now = socket_count(pid)
        stable = stable + 1 if now == last else 0
        last = now
        await asyncio.sleep(0.2)
    return last


def socket_count(pid: int) -> int:
    """Sockets the gateway process holds open (its listeners, its broker link and its connections)."""
    count = 0
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(entry).startswith("socket:")
    return count


# --------------------------------------------------------------------------- a real terminal


@dataclass
class Attempt:
    """What a terminal connecting afresh got: the answer's DE39 (None: no answer) and how long it took."""

    code: str | None
    seconds: float
    error: str | None = None


async def fresh_sale(port: int, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 3.0,
                     terminal: str = TERMINAL, amount: int = 1_500) -> Attempt:
    """Connect afresh (TLS when ``ssl_context``), make one sale, close. Never raises."""
    started = time.perf_counter()
    pos: IsoClient | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
            )
            pos = IsoClient(reader, writer, "iso87-binary")
            answer = await pos.sale(amount, terminal=terminal)
        return Attempt(answer.get(39), time.perf_counter() - started)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
        return Attempt(None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:200])
    finally:
        if pos is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pos.close(), 2)


# --------------------------------------------------------------------------- the gateway from outside


def rss_mb(pid: int) -> float:
    """The process's resident set size in MB (``VmRSS`` of ``/proc/<pid>/status``)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None, text
    return int(match.group(1)) / 1024


def pid_of(proc: GatewayProcess) -> int:
    assert proc.process is not None
    return proc.process.pid


def ledger_rows(db: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    """Rows of the gateway's SQLite ledger file (read-only; works beside a running gateway in WAL mode)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def run_cli(proc: GatewayProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``iso-gateway ARGS`` with the gateway's environment (its ledger file)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env or proc.env, capture_output=True, text=True, timeout=60
    )


def unanswered(proc: GatewayProcess) -> list[dict[str, Any]]:
    """``iso-gateway transactions --unanswered --json``: the records decided but never delivered.

    The agreed interface: a JSON list of objects (or one list inside an object), each with at least
    ``rrn``, ``stan``, ``terminal_id`` and ``status``.
    """
    listed = run_cli(proc, "transactions", "--unanswered", "--json")
    assert listed.returncode == 0, (
        f"`iso-gateway transactions --unanswered --json` exited {listed.returncode}: "
        f"{(listed.stderr or listed.stdout)[-1500:]}"
    )
    data = json.loads(listed.stdout)
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        assert len(lists) == 1, data
        data = lists[0]
    assert isinstance(data, list) and all(isinstance(item, dict) for item in data), data
    for item in data:
        missing = {"rrn", "stan", "terminal_id", "status"} - item.keys()
        assert not missing, f"an unanswered record without {sorted(missing)}: {item}"
    return data


def log_lines(proc: GatewayProcess) -> list[str]:
    return proc.logs().splitlines()


def json_lines(proc: GatewayProcess) -> Iterator[dict[str, Any]]:
    for line in log_lines(proc):
        with contextlib.suppress(ValueError):
            document = json.loads(line)
            if isinstance(document, dict):
                yield document


def start_failure(proc: GatewayProcess, timeout: float = 20.0) -> tuple[int | None, str]:
    """Start ``iso-gateway serve`` expecting it to refuse: (exit code, its output). When it starts
    listening instead, it is killed at once and the exit code is None."""
    log = proc.log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"], env=proc.env, stdout=log, stderr=subprocess.STDOUT
    )
    proc.process = process
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                return code, proc.logs()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", proc.port), timeout=0.2):
                return None, proc.logs()  # it started
            time.sleep(0.05)
        return None, proc.logs()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()


# --------------------------------------------------------------------------- certificates


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr[-1000:]}"


@dataclass(frozen=True)
class Pki:
    """A private CA, a server certificate for ``localhost`` / ``127.0.0.1`` and client certificates."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def client(self, common_name: str) -> tuple[Path, Path]:
        return self.folder / f"{common_name}.pem", self.folder / f"{common_name}.key"

    def client_context(self, common_name: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if common_name is not None:
            cert, key = self.client(common_name)
            context.load_cert_chain(str(cert), str(key))
        return context


def make_pki(folder: Path, clients: tuple[str, ...] = ()) -> Pki:
    """A private CA, a server certificate and client certificates (subject CN = each of ``clients``),
    made with the ``cryptography`` package when the venv has it, else with the ``openssl`` command;
    skips the test when neither is available."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        _make_pki_with_openssl(folder, clients)
    else:
        _make_pki_with_cryptography(folder, clients)
    return Pki(folder)


def _make_pki_with_openssl(folder: Path, clients: tuple[str, ...]) -> None:
    days = "2"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", days, "-subj", "/CN=adversarial test CA", cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=folder)  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", days, "-extfile", "server.ext", cwd=folder)  # fmt: skip
    for name in clients:
        (folder / f"{name}.ext").write_text("extendedKeyUsage=clientAuth\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", days, "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


def _make_pki_with_cryptography(folder: Path, clients: tuple[str, ...]) -> None:
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write(stem: str, key: Any, cert: Any) -> None:
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("adversarial test CA")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)

    def issue(stem: str, common_name: str, extension: Any) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
            .add_extension(extension, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, key, cert)

    issue("server", "localhost", x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    for client in clients:
        issue(client, client, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))
