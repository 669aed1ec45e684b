"""The acquirer host simulator over real TCP, driven by a client that is not the simulator: the
tests' IsoClient encodes with pyiso8583's own built-in specs, not with ``specs/`` or the emulator."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest
from brokers import missing_service
from harness import CARD, TERMINAL, IsoClient

from terminal_emulator import ResponseTimeout, Terminal
from terminal_emulator.host import HostSimulator, Rule, Then, When

TRACK2 = f"{CARD}=29121011234500000"
PIN_BLOCK = "1A2B3C4D5E6F7081"


async def test_a_purchase_is_approved_by_default_with_an_rrn_and_an_approval_code() -> None:
    async with HostSimulator() as host:
        client = await IsoClient.connect(host.port)
        mti, answer = await client.send("0200", {3: "000000", **client.base(1000)})
        await client.close()
    assert (mti, answer[39]) == ("0210", "00")
    assert len(answer[37]) == 12 and answer[37].isdigit() and len(answer[38]) == 6
    assert answer[41] == TERMINAL and answer[4] == "000000001000"
    [record] = host.received
    assert (record.mti, record.response_code, record.rrn, record.pan) == ("0200", "00", answer[37], "476173******0119")


async def test_a_rules_file_declines_by_amount(tmp_path: Path) -> None:
    rules = tmp_path / "host.toml"
    rules.write_text('[[rule]]\nname = "limit"\nwhen = { amount_over = 100000 }\nthen = { code = "51" }\n')
    async with HostSimulator("iso87-binary", rules) as host:
        client = await IsoClient.connect(host.port)
        over = await client.sale(100001)
        limit = await client.preauth(100000)
        await client.close()
    assert (over[39], 38 in over) == ("51", False)
    assert (limit[39], 38 in limit) == ("00", True)
    assert [(r.rule, r.rule_name) for r in host.received] == [(1, "limit"), (None, None)]


async def test_many_requests_in_flight_on_one_connection_are_answered_in_the_order_their_delays_give() -> None:
    stans = [f"{900000 + i:06d}" for i in range(12)]
    rules = [Rule(When(stan=(stan,)), Then(delay_ms=(12 - i) * 20)) for i, stan in enumerate(stans)]
    async with HostSimulator(rules=rules) as host:
        client = await IsoClient.connect(host.port)
        started = time.monotonic()
        for stan in stans:
            client.writer.write(client.frame("0200", {3: "000000", **client.base(500, stan=stan)}))
        await client.writer.drain()
        answers = [await client.read(timeout=5) for _ in stans]
        elapsed = time.monotonic() - started
        await client.close()
    assert [fields[11] for _, fields in answers] == stans[::-1]
    assert all(mti == "0210" and fields[39] == "00" for mti, fields in answers)
    assert 0.24 <= elapsed < 2.0  # the slowest was held 240 ms; the others were not queued behind it


async def test_a_delay_holds_only_its_own_answer() -> None:
    async with HostSimulator(rules=[Rule(When(amount=(777,)), Then(delay_ms=300))]) as host:
        client = await IsoClient.connect(host.port)
        started = time.monotonic()
        slow, fast = client.base(777), client.base(5)
        client.writer.write(client.frame("0200", {3: "000000", **slow}) + client.frame("0200", {3: "000000", **fast}))
        first = await client.read()
        fast_at = time.monotonic() - started
        second = await client.read()
        slow_at = time.monotonic() - started
        await client.close()
    assert (first[1][11], second[1][11]) == (fast[11], slow[11])
    assert fast_at < 0.25 <= 0.3 <= slow_at
    assert host.received[0].delay_ms == 300


async def test_a_dropped_advice_is_answered_on_the_third_repeat_with_times_2() -> None:
    rules = [Rule(When(mti=("0420", "0421")), Then(drop=True, times=2))]
    async with HostSimulator(rules=rules) as host:
        client = await IsoClient.connect(host.port)
        sale = await client.sale(1200)
        reversal = {3: "000000", 90: "0200" + sale[11] + sale[7] + "0" * 22, **client.base(1200)}
        for mti in ("0420", "0421"):
            # Answers without delay leave in arrival order: an echo answered first proves the drop.
            client.writer.write(client.frame(mti, reversal) + client.frame("0800", {11: client.next_stan(), 70: "301"}))
            assert (await client.read())[0] == "0810"
        mti, answer = await client.send("0421", reversal)
        await client.close()
    assert (mti, answer[39], answer[11]) == ("0430", "00", reversal[11])
    records = [r for r in host.received if r.mti and r.mti.startswith("04")]
    assert [(r.mti, r.action, r.original_found) for r in records] == [
        ("0420", "drop", True), ("0421", "drop", True), ("0421", "answer", True)]


async def test_a_close_rule_hangs_up_and_the_host_keeps_serving_other_connections() -> None:
    async with HostSimulator(rules=[Rule(When(amount=(13,)), Then(close=True))]) as host:
        doomed = await IsoClient.connect(host.port)
        doomed.writer.write(doomed.frame("0200", {3: "000000", **doomed.base(13)}))
        assert await asyncio.wait_for(doomed.reader.read(), 5) == b""  # EOF, no answer
        other = await IsoClient.connect(host.port)
        assert (await other.sale(14))[39] == "00"
        await other.close()
        await doomed.close()
    assert [r.action for r in host.received] == ["close", "answer"]


async def test_sign_on_echo_and_sign_off_are_answered_0810_00() -> None:
    async with HostSimulator() as host:
        client = await IsoClient.connect(host.port)
        answers = [await client.send("0800", {7: "1122101010", 11: client.next_stan(), 41: TERMINAL, 70: code})
                   for code in ("001", "301", "002")]
        await client.close()
    assert [(mti, f[39], f[70], f[41]) for mti, f in answers] == [
        ("0810", "00", "001", TERMINAL), ("0810", "00", "301", TERMINAL), ("0810", "00", "002", TERMINAL)]


async def test_reversals_advices_and_settlement() -> None:
    async with HostSimulator() as host:
        client = await IsoClient.connect(host.port)
        sale = await client.sale(2500)
        preauth = await client.preauth(9000)
        known = await client.reverse(sale)
        unknown = await client.reverse({**sale, 11: "999998"})
        unknown_advice = await client.reverse({**sale, 11: "999997"}, mti="0420")
        completion = await client.complete(preauth, 9500)
        settled = await client.settle((0, 0), (1, 2500))
        await client.close()
    assert (known[39], unknown[39], unknown_advice[39]) == ("00", "25", "00")
    assert completion[39] == "00" and settled[39] == "00"
    assert [r.response_mti for r in host.received] == ["0210", "0110", "0410", "0410", "0430", "0230", "0510"]
    assert [r.original_found for r in host.received if r.kind and r.kind.startswith("reversal")] == [True, False, False]


async def test_many_connections_at_once_each_get_their_own_answers() -> None:
    async with HostSimulator(rules=[Rule(When(), Then(delay_ms=10))]) as host:

        async def terminal(number: int) -> tuple[list[dict[int, str]], list[dict[int, str]]]:
            client = await IsoClient.connect(host.port)
            requests = [client.base(100 + i, terminal=f"T{number:07d}") for i in range(10)]
            client.writer.write(b"".join(client.frame("0200", {3: "000000", **r}) for r in requests))
            answers = [(await client.read())[1] for _ in requests]
            await client.close()
            return requests, answers

        results = await asyncio.gather(*(terminal(n) for n in range(5)))
    for requests, answers in results:
        assert sorted((a[11], a[41], a[4]) for a in answers) == sorted((r[11], r[41], r[4]) for r in requests)
    assert len({answer[37] for _, answers in results for answer in answers}) == 50
    assert len({r.connection for r in host.received}) == 5


async def test_the_journal_holds_one_json_line_per_request_with_masked_pans_only(tmp_path: Path) -> None:
    journal = tmp_path / "received.jsonl"
    async with HostSimulator(journal=journal, rules=[Rule(When(mti=("0400",)), Then(drop=True))]) as host:
        client = await IsoClient.connect(host.port)
        sale = await client.send("0200", {3: "000000", 35: TRACK2, 52: PIN_BLOCK, **client.base(4200)})
        track_only = await client.send("0200", {3: "000000", 35: TRACK2, **client.base(4300, pan=None)})
        client.writer.write(client.frame("0400", {3: "000000", 90: "0200" + sale[1][11] + "0" * 32,
                                                  **client.base(4200)}))
        await host.wait_for(3)
        await client.close()
    text = journal.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert CARD not in text and PIN_BLOCK not in text and "29121011234500000" not in text
    assert [line["pan"] for line in lines] == ["476173******0119"] * 3
    assert [(line["mti"], line["response_code"], line["action"]) for line in lines] == [
        ("0200", "00", "answer"), ("0200", "00", "answer"), ("0400", None, "drop")]
    assert lines[0]["rrn"] == sale[1][37] and lines[1]["rrn"] == track_only[1][37]
    first = lines[0]
    assert {"time", "connection", "stan", "terminal_id", "merchant_id", "amount", "original", "rule"} <= set(first)
    assert (first["amount"], first["terminal_id"], first["stan"]) == (4200, TERMINAL, sale[1][11])
    assert lines[2]["original"].startswith("0200" + sale[1][11])
    assert CARD not in repr(host.received)


async def test_the_host_can_go_down_and_come_back_on_the_same_port_with_new_rules() -> None:
    host = HostSimulator()
    await host.start()
    port = host.port
    client = await IsoClient.connect(port)
    assert (await client.sale(100))[39] == "00"
    await host.stop()
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # connections are cut
    with pytest.raises(OSError):
        await IsoClient.connect(port)
    host.rules = [Rule(When(), Then(code="91"))]
    await host.start()
    try:
        assert host.port == port
        again = await IsoClient.connect(port)
        assert (await again.sale(100))[39] == "91"
        host.rules = []
        assert (await again.sale(100))[39] == "00"
        await again.close()
    finally:
        await host.stop()
    assert [r.response_code for r in host.received] == ["00", "91", "00"]


async def test_disconnect_all_cuts_every_connection_and_keeps_listening() -> None:
    async with HostSimulator() as host:
        clients = [await IsoClient.connect(host.port) for _ in range(3)]
        for client in clients:
            assert (await client.sale(100))[39] == "00"
        assert host.connections == 3
        await host.disconnect_all()
        for client in clients:
            assert await asyncio.wait_for(client.reader.read(), 5) == b""
            await client.close()
        assert host.connections == 0
        again = await IsoClient.connect(host.port)
        assert (await again.sale(100))[39] == "00"
        await again.close()


async def test_the_ascii_profile_is_served_too() -> None:
    async with HostSimulator("iso87-ascii") as host:
        client = await IsoClient.connect(host.port, profile="iso87-ascii")
        answer = await client.sale(321)
        await client.close()
    assert answer[39] == "00" and answer[4] == "000000000321"


async def test_a_frame_that_does_not_decode_gets_30_when_its_mti_is_readable_else_a_hang_up() -> None:
    async with HostSimulator() as host:
        client = await IsoClient.connect(host.port)
        body = b"0200\x40" + bytes(7) + b"12"  # DE2 (bit 2) says 12 digits, none follow: cannot decode
        client.writer.write(struct.pack(">H", len(body)) + body)
        mti, fields = await client.read()
        assert (mti, fields) == ("0210", {39: "30"})
        garbage = b"\xff\xfe" + bytes(10)
        client.writer.write(struct.pack(">H", len(garbage)) + garbage)
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()
    assert [(r.action, r.response_code, bool(r.error)) for r in host.received] == [("answer", "30", True),
                                                                                   ("close", None, True)]


async def test_the_emulators_terminal_reverses_a_sale_whose_answer_the_host_dropped() -> None:
    rules = [Rule(When(mti=("0200",)), Then(drop=True, times=1))]
    async with (
        HostSimulator(rules=rules) as host,
        Terminal("127.0.0.1", host.port, journal=None, timeout=0.3) as terminal,
    ):
        with pytest.raises(ResponseTimeout):
            await terminal.sale(1000)
        exchange = await terminal.sale(2000)  # the stored 0400 goes first
    assert exchange.approved
    assert [(r.mti, r.action, r.response_code, r.original_found) for r in host.received] == [
        ("0200", "drop", None, None), ("0400", "answer", "00", True), ("0200", "answer", "00", None)]


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command."""
    if shutil.which("openssl") is None:
        missing_service("the openssl command is not installed")
    cert, key = tmp_path / "host.crt", tmp_path / "host.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


async def test_tls_is_served_when_given_a_certificate(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(cert), str(key))
    async with HostSimulator(ssl=server_context) as host:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", host.port, ssl=ssl.create_default_context(cafile=str(cert)))
        client = IsoClient(reader, writer, "iso87-binary")
        answer = await client.sale(700)
        await client.close()
    assert answer[39] == "00"
