"""The bench in the cup-pos profile: the bare codec server answers UnionPay frames (TPDU swapped, header
kept) and load mode drives it with cup requests whose references patch 37, 61 and a reversal's trace."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from benchmarks.bare_server import reply_tpdu, serve
from terminal_emulator import load_profile
from terminal_emulator.codec import IsoMessage, decode_message, encode_message
from terminal_emulator.dialects import Card, LoadReference, Station
from terminal_emulator.dialects.cup import CUP
from terminal_emulator.framing import FrameDecoder, frame
from terminal_emulator.load import LoadConfig, Template, run_load
from terminal_emulator.messages import Stamp

PROFILE = load_profile("cup-pos")
TPDU = bytes.fromhex("6000030000")


@pytest.fixture
async def bare_cup_port() -> AsyncIterator[int]:
    server = await serve("127.0.0.1", 0, PROFILE)
    async with server:
        yield server.sockets[0].getsockname()[1]


def test_an_answers_tpdu_swaps_destination_and_source() -> None:
    assert reply_tpdu(bytes.fromhex("6000030000")) == bytes.fromhex("6000000003")
    assert reply_tpdu(bytes.fromhex("6012345678")) == bytes.fromhex("6056781234")
    assert reply_tpdu(None) is None


async def test_the_bare_server_answers_a_cup_sale_with_the_tpdu_swapped_and_the_header_kept(bare_cup_port: int) -> None:
    sale = IsoMessage("0200", {2: "6217001234567890122", 3: "000000", 4: "000000010000", 11: "000002",
                               25: "00", 41: "POS00001", 42: "898310048990001", 49: "156", 60: "22000002000601"})
    reader, writer = await asyncio.open_connection("127.0.0.1", bare_cup_port)
    writer.write(frame(encode_message(PROFILE, sale), PROFILE.framing, TPDU))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert data[2:7] == bytes.fromhex("6000000003")
    assert data[7:13] == bytes.fromhex("603100000000")
    decoder = FrameDecoder(PROFILE.framing)
    answer = decode_message(PROFILE, decoder.feed(data)[0])
    assert (answer.mti, answer.fields[39], answer.fields[11], answer.fields[60]) == ("0210", "00", "000002",
                                                                                      "22000002000601")


def test_cup_load_templates_patch_references_to_the_bytes_the_dialect_would_build() -> None:
    placeholder = Stamp("000000", "0000000000", "000000", "0000")
    templates = CUP.load_templates(placeholder, Station("L0000001", "MERCHANT0000001", 1), Card(CUP.default_pan),
                                   1000, "156")
    ref = LoadReference(stan="000123", transmitted="1207103015", rrn="120710000123", date="1207")
    for kind in ("void", "refund", "reversal"):
        template = Template(PROFILE, templates[kind])
        patch = {11: "000777"} | CUP.load_reference(kind, ref, 1)
        rendered = template.render({n: template.value(n, patch[n]) for n in template.fields})
        expected = IsoMessage(templates[kind].mti, {**templates[kind].fields, **patch})
        assert rendered == frame(encode_message(PROFILE, expected), PROFILE.framing), kind


async def test_load_mode_in_cup_pos_gets_every_answer_back_from_the_bare_server(bare_cup_port: int) -> None:
    config = LoadConfig(port=bare_cup_port, connections=2, pipeline=8, duration=None, count=2000,
                        mix={"purchase": 70, "refund": 10, "void": 10, "reversal": 10}, seed=3, tpdu=TPDU)
    summary = (await run_load(config, PROFILE)).summary(config)
    assert summary["sent"] == summary["received"] == 2000
    assert summary["response_codes"] == {"00": 2000}
    assert summary["timeouts"] == summary["errors"] == summary["late"] == 0
    assert set(summary["sent_by_kind"]) == {"purchase", "refund", "void", "reversal"}
