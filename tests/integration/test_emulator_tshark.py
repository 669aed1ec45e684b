"""The emulator's wire output decodes with an ISO 8583 implementation other than pyiso8583.

Wireshark's ISO 8583 dissector (through ``tshark``) reads a capture of exactly the bytes a host
received from the emulator. Skipped where tshark is not installed (``apt-get install tshark``).

Known difference: Wireshark's ISO 8583:1987 table gives DE86-DE89 as n15 where the standard (and
pyiso8583, and the independent vectors) say n16, so settlement frames are not compared here; the
byte-exact comparison with the interop vectors covers them (tests/unit/test_terminal_vectors.py).
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path

import pytest

from terminal_emulator import Terminal, load_profile
from terminal_emulator.testing import StubHost

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark (Wireshark) is not installed")

PROFILE = load_profile("iso87-binary")
FIELDS = (2, 3, 4, 7, 11, 12, 13, 14, 37, 38, 41, 42, 49, 70, 90, 95)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def write_pcap(path: Path, segments: list[bytes], src_port: int = 40000, dst_port: int = 8583) -> None:
    """A minimal pcap: one Ethernet/IPv4/TCP packet per segment, client to server, in sequence."""
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    seq = 1000
    for number, payload in enumerate(segments):
        tcp = struct.pack("!HHIIBBHHH", src_port, dst_port, seq, 1, 5 << 4, 0x18, 65535, 0, 0)
        ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), number, 0, 64, 6, 0,
                                bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
        ip_header = ip_header[:10] + struct.pack("!H", _checksum(ip_header)) + ip_header[12:]
        pseudo = ip_header[12:20] + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp + payload)) + tcp[18:]
        ether = b"\x00" * 12 + b"\x08\x00"
        packet = ether + ip_header + tcp + payload
        out += struct.pack("<IIII", 1_700_000_000 + number, 0, len(packet), len(packet)) + packet
        seq += len(payload)
    path.write_bytes(bytes(out))


def split_frames(stream: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos : pos + 2], "big")
        frames.append(stream[pos : pos + 2 + length])
        pos += 2 + length
    return frames


async def tshark_fields(pcap: Path) -> list[dict[str, str]]:
    assert TSHARK is not None
    columns = ["iso8583.mti"] + [f"iso8583.bit{n}" for n in FIELDS] + ["_ws.expert.message"]
    args = [TSHARK, "-n", "-r", str(pcap), "-d", "tcp.port==8583,iso8583",
            "-o", "iso8583.len_endian:Big endian",
            "-o", "iso8583.charset:Digits represented as ASCII Characters",
            "-o", "iso8583.binencode:Bin data not encoded",
            "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"]
    for column in columns:
        args += ["-e", column]
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    rows = []
    for line in out.decode().splitlines():
        values = line.split("\t")
        rows.append({name: value for name, value in zip(columns, values, strict=False) if value})
    return rows


async def test_wiresharks_dissector_reads_every_field_the_emulator_sent(tmp_path: Path) -> None:
    async with StubHost(PROFILE) as host, Terminal(port=host.port, profile=PROFILE, timeout=2) as terminal:
        await terminal.echo()
        sale = await terminal.sale(1234, expiry="2812")
        assert sale.rrn is not None
        await terminal.refund(sale.rrn, amount=500)
        await terminal.void(sale.rrn)
        auth = await terminal.preauth(10000)
        await terminal.complete(auth.rrn, amount=11000)
        sale2 = await terminal.sale(700)
        await terminal.reverse(sale2.rrn, partial_amount=300)
    frames = split_frames(bytes(host.streams[0]))
    assert len(frames) == len(host.messages) == 8
    pcap = tmp_path / "emulator.pcap"
    write_pcap(pcap, frames)

    rows = await tshark_fields(pcap)

    assert len(rows) == len(frames)
    for row, sent in zip(rows, host.messages, strict=True):
        assert "_ws.expert.message" not in row, (sent.mti, row)
        assert row["iso8583.mti"] == sent.mti
        seen = {int(k.removeprefix("iso8583.bit")): v for k, v in row.items() if k.startswith("iso8583.bit")}
        expected = {n: v for n, v in sent.fields.items() if n in FIELDS}
        assert seen == expected, sent.mti
