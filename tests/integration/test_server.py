"""The gateway over real TCP: profiles, bad input, concurrency and limits (issue 2)."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import CARD, IsoClient, LogCapture, gateway_settings, running_gateway

from gateway.app import GatewayApp

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


@pytest.fixture
async def logs() -> LogCapture:
    return LogCapture()


@pytest.fixture
async def gateway(tmp_path: Path, mqtt_broker_url: str, logs: LogCapture) -> AsyncIterator[GatewayApp]:
    settings = gateway_settings(tmp_path, mqtt_broker_url, mqtt_topic_prefix=f"test/{tmp_path.name}",
                                idle_timeout_s=1.0, max_connections=5)
    async with running_gateway(settings, logs) as app:
        yield app


async def test_the_binary_profile_answers_0810_0110_and_0210_echoing_the_request(gateway: GatewayApp) -> None:
    pos = await IsoClient.connect(gateway.port)
    mti, echo = await pos.send("0800", {7: "1122103015", 11: "000001", 70: "301"})
    assert (mti, echo[39], echo[11], echo[7]) == ("0810", "00", "000001", "1122103015")
    request = {3: "000000", **pos.base(1_234)}
    mti, answer = await pos.send("0100", request)
    assert mti == "0110" and answer[39] == "00"
    for field in (3, 4, 7, 11, 12, 13, 41, 42, 49):
        assert answer[field] == request[field]
    assert 2 not in answer  # the PAN is never echoed
    assert len(answer[37]) == 12 and answer[37].isdigit() and len(answer[38]) == 6
    mti, sale = await pos.send("0200", {3: "000000", **pos.base(1_234)})
    assert mti == "0210" and sale[39] == "00" and sale[37] != answer[37]
    await pos.close()


async def test_a_decline_sets_37_and_39_but_no_approval_code(gateway: GatewayApp) -> None:
    pos = await IsoClient.connect(gateway.port)
    declined = await pos.sale(100, pan="4761739001010118")
    assert declined[39] == "14" and 37 in declined and 38 not in declined
    await pos.close()


async def test_a_non_numeric_amount_gets_30_and_the_next_purchase_is_approved(gateway: GatewayApp) -> None:
    pos = await IsoClient.connect(gateway.port)
    fields = {3: "000000", **pos.base(100)}
    fields[4] = "00000000ABCD"
    mti, answer = await pos.send("0200", fields)
    assert (mti, answer[39], answer[11]) == ("0210", "30", fields[11])
    assert (await pos.sale(100))[39] == "00"
    await pos.close()


async def test_a_request_missing_a_mandatory_field_gets_30(gateway: GatewayApp) -> None:
    pos = await IsoClient.connect(gateway.port)
    fields = {3: "000000", **pos.base(100)}
    del fields[41]
    assert (await pos.send("0200", fields))[1][39] == "30"
    await pos.close()


async def test_garbage_and_a_lying_length_close_only_their_own_connection(gateway: GatewayApp) -> None:
    bystander = await IsoClient.connect(gateway.port)
    for garbage in (os.urandom(64), b"\x00\x05hello", struct.pack(">H", 60_000) + b"x" * 10):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(struct.pack(">H", len(garbage)) + garbage if garbage[:2] != b"\xea\x60" else garbage)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway, no answer
        writer.close()
    assert (await bystander.sale(100))[39] == "00"
    await bystander.close()


async def test_a_header_announcing_more_than_the_maximum_frame_closes_the_connection(gateway: GatewayApp) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(struct.pack(">H", 9_000))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_many_requests_in_flight_on_one_connection_all_get_answers(gateway: GatewayApp) -> None:
    pos = await IsoClient.connect(gateway.port)
    requests = [{3: "000000", **pos.base(100 + i)} for i in range(50)]
    frames = [pos.frame("0200", fields) for fields in requests]
    pos.writer.write(b"".join(frames))
    await pos.writer.drain()
    answers = [await pos.read() for _ in frames]
    assert sorted(fields[11] for _, fields in answers) == sorted(fields[11] for fields in requests)
    assert {fields[39] for _, fields in answers} == {"00"}
    await pos.close()


async def test_a_frame_split_into_single_bytes_is_understood(gateway: GatewayApp) -> None:
    pos = await IsoClient.connect(gateway.port)
    frame = pos.frame("0200", {3: "000000", **pos.base(100)})
    for byte in frame:
        pos.writer.write(bytes([byte]))
        await pos.writer.drain()
    assert (await pos.read())[1][39] == "00"
    await pos.close()


async def test_idle_connections_are_closed(gateway: GatewayApp) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_connections_over_the_limit_are_closed_at_once(gateway: GatewayApp) -> None:
    clients = [await IsoClient.connect(gateway.port) for _ in range(5)]
    await asyncio.gather(*(client.sale(100) for client in clients))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    for client in clients:
        await client.close()


async def test_every_binary_vector_request_gets_an_answer_with_its_response_mti(gateway: GatewayApp) -> None:
    vectors = [json.loads(line) for line in (VECTORS / "iso87-binary.jsonl").read_text().splitlines()]
    requests = [v for v in vectors if int(v["mti"][2]) % 2 == 0]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    pos = IsoClient(reader, writer, "iso87-binary")
    for vector in requests:
        writer.write(bytes.fromhex(vector["frame_hex"]))
        await writer.drain()
        mti, answer = await pos.read()
        assert mti == f"{vector['mti'][:2]}{int(vector['mti'][2]) + 1}0"
        assert answer[11] == vector["fields"]["11"]
        assert answer[39] in {"00", "12", "25", "58", "95"}
    await pos.close()


async def test_logs_have_one_processed_line_per_request_with_a_masked_pan_only(
    gateway: GatewayApp, logs: LogCapture
) -> None:
    pos = await IsoClient.connect(gateway.port)
    sale = await pos.sale(700)
    await pos.refund(sale[37], 100)
    await pos.close()
    processed = [json.loads(line) for line in logs.lines() if '"message.processed"' in line]
    assert len(processed) == 2
    for line in processed:
        for key in ("mti", "kind", "merchant", "terminal", "stan", "rrn", "response_code", "reason", "latency_ms"):
            assert key in line
        assert line["pan"] == "476173******0119"
    assert CARD not in logs.getvalue()
